"""evals/bench.py runs end to end (a tiny random-weight shape, no timing assertions: timings belong to the
benchmark, never to tests) and writes its JSON and table after every length."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "evals"))

import bench  # noqa: E402


def test_bench_writes_ratios_per_length(tmp_path, monkeypatch):
    out = tmp_path / "b.json"
    written = []
    report = bench._report

    def spy(args, argv, results):  # the files are rewritten after each length, not only at the end
        written.append(sorted({r["tokens"] for r in results}))
        return report(args, argv, results)

    monkeypatch.setattr(bench, "_report", spy)
    argv = ["--model", "shape:tiny-llama", "--lengths", "32", "48", "--repeats", "1", "--no-memory"]
    assert bench.main([*argv, "--arms", "head_scale", "gated_attention headwise", "--out", str(out)]) == 0
    assert written[:2] == [[32], [32, 48]]
    data = json.loads(out.read_text())
    arms = {(r["arm"], r["tokens"]) for r in data["results"]}
    assert arms == {
        (a, n)
        for a in (
            "stock sdpa",
            "head_scale 0.5 (head-output stage)",
            "gated_attention headwise (head-output stage)",
        )
        for n in (32, 48)
    }
    assert all(r["time_ratio"] == 1.0 for r in data["results"] if r["arm"] == "stock sdpa")
    table = out.with_suffix(".md").read_text()
    assert "Regenerate: `python evals/bench.py" in table and "| 48 | head_scale 0.5" in table


def test_bench_rowblock_times_every_pass_on_real_qkv(tmp_path):
    """evals/bench_rowblock.py end to end on the packaged SmolLM2 (one short prefill, one repeat): a row per pass with
    its loop's thread count, the table beside the JSON; a wrong --out is refused before any model loads."""
    import subprocess

    script = str(ROOT / "evals" / "bench_rowblock.py")
    bad = subprocess.run([sys.executable, script, "--out", str(tmp_path / "x.txt")], capture_output=True, text=True)
    assert bad.returncode != 0 and "must end in .json" in bad.stderr
    out = tmp_path / "r.json"
    argv = ["--lengths", "64", "--threads", "1", "--repeats", "1", "--out", str(out)]
    done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["tokens"] == 64 and row["threads"] == 1 and row["loop_threads"] == 1
    assert set(row["seconds"]) == {
        "stock sdpa (flash)",
        "whole rows + column sums",
        "whole rows, clipped",
        "key tiles",
        "key tiles, MoH 7/9",
    }
    assert all(0 < s < 60 for s in row["seconds"].values())
    assert "| 64 | openmp loop | 1 | key tiles, MoH 7/9 |" in out.with_suffix(".md").read_text()
