"""Figures the README quotes come from committed result files: the mini-table deltas must match table.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_rows():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("`attnsurgery reproduce evals/mini.yaml`") :]
    rows = re.findall(
        r"^\| (\S+) \| (\S+) \| (\S+) \| (\S+) \| ([+-]\d+\.\d+) \| (<?[\d.]+) \|$", block, re.M
    )
    assert rows, "the README's mini-table block is missing"
    return rows


def test_readme_mini_deltas_match_table_json():
    reports = {
        r["model"]: r for r in json.loads((ROOT / "evals/results/mini/table.json").read_text())["reports"]
    }
    for model, arm, task, metric, delta, p in _readme_rows():
        row = next(r for r in reports[model]["table"] if r["task"] == task and r["metric"] == metric)
        got = row["arms"][arm]
        assert f"{got['delta']:+.3f}" == delta, (model, arm, task, metric)
        want_p = "<0.001" if got["p"] < 0.001 else f"{got['p']:.2g}"
        assert want_p == p, (model, arm, task, metric, got["p"])
