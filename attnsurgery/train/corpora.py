"""Training corpora beyond the offline tasks, built from registry packages (no Hub), for budgets past what
``gutenberg_ppl``'s calibration split holds (~124k tokens of SmolLM2's tokenizer).

``pydocs``: the reStructuredText sources of the Python 3.11 documentation (497 files, ~11 MB of English technical
prose and code; PSF licence), from Debian's ``python3.11-doc`` package, pinned by version and sha256. It is in no
split that a table reports and shares no text with BIG-bench or the Gutenberg books. Built once into
``$ATTNSURGERY_CACHE/corpora/pydocs.jsonl`` (else ``~/.cache/attnsurgery/corpora``)::

    python -m attnsurgery.train.corpora pydocs      # download (apt-get download), check, extract, write

A training source may join corpora with ``+`` (``gutenberg_ppl+pydocs``): see :func:`attnsurgery.train.data.load_texts`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
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


CORPORA: dict[str, DebianCorpus] = {
    "pydocs": DebianCorpus(
        package="python3.11-doc",
        version="3.11.2-6+deb12u8",
        sha256="50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
        members="usr/share/doc/python3.11/html/_sources",
        suffix=".rst.txt",
        licence="PSF-2.0 (Python documentation)",
    )
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
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".jsonl.partial")
        with partial.open("w", encoding="utf-8") as f:
            for path in files:
                text = path.read_text(encoding="utf-8", errors="replace").strip()
                if text:
                    doc = str(path.relative_to(root))
                    f.write(json.dumps({"doc": doc, "text": text}, ensure_ascii=False, sort_keys=True) + "\n")
        partial.replace(out)  # whole or absent: never a half-written corpus
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
