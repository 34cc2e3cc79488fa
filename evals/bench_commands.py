"""How long the main commands take on the packaged model (the README's "how long does it take" table).

    python evals/bench_commands.py            # writes docs/benchmarks-commands.json and .md

Each command runs as a user would run it (a fresh process, a fresh output folder) with the smallest settings that
still give a useful answer, one after another on an otherwise quiet machine; wall time includes the model load.
Run it alone: anything else on the cores (a training run, the tests) slows every figure.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"

# (name, what it gives, argv after `attnsurgery`); {out} is a fresh folder per command
COMMANDS = [
    (
        "apply",
        "patch, generate 20 tokens",
        [
            "apply",
            "temperature",
            MODEL,
            "--arg",
            "tau=0.9",
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "20",
        ],
    ),
    (
        "inspect",
        "attention maps of one prompt, plotted",
        [
            "inspect",
            MODEL,
            "--recipe",
            "act/smollm2-135m",
            "--prompt",
            "The capital of France is",
            "--out",
            "{out}",
        ],
    ),
    (
        "eval",
        "baseline vs ACT, 1 task x 50 docs (lm-eval)",
        [
            "eval",
            MODEL,
            "--recipe",
            "act",
            "--tasks",
            "bb_general_knowledge",
            "--limit",
            "50",
            "--out",
            "{out}",
        ],
    ),
    (
        "calibrate",
        "ACT head sweep, 50 records",
        [
            "calibrate",
            "act",
            MODEL,
            "--data",
            "bb_general_knowledge",
            "--limit",
            "50",
            "--out",
            "{out}/act.yaml",
        ],
    ),
    (
        "train",
        "gated attention, 20 kd steps of 4 x 256 tokens",
        ["train", MODEL, "gated_attention", "--objective", "kd", "--steps", "20", "--out", "{out}"],
    ),
    (
        "linearize",
        "Hedgehog hybrid, 10 + 10 steps of 4 x 256 tokens",
        ["linearize", MODEL, "--stage1-steps", "10", "--stage2-steps", "10", "--out", "{out}"],
    ),
    (
        "reproduce",
        "the mini table on SmolLM2, 5 docs per task",
        ["reproduce", "evals/mini.yaml", "--model", MODEL, "--limit", "5", "--out", "{out}"],
    ),
]


def shown(argv: list[str], name: str) -> str:
    """The command as a user types it (the scratch folder shown as ``out/<command>``), arguments quoted."""
    import shlex

    return " ".join(shlex.quote(a.replace("{out}", f"out/{name}")) for a in argv)


def render(result: dict) -> str:
    machine = result["machine"]
    lines = [
        f"# How long the main commands take ({result['model']}, CPU)",
        "",
        "`python evals/bench_commands.py`: each command in a fresh process and output folder, one after another, "
        f"wall time including the model load; {machine['cpu_count']} cores, {machine['machine']}, torch "
        f"{machine['torch']}.",
        "",
        "| command | what | seconds |",
        "|---|---|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| `{shown(r['argv'], r['command'])}` | {r['what']} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    import torch

    exe = str(Path(sys.executable).with_name("attnsurgery"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "ATTNSURGERY_CACHE": str(Path(tmp) / "cache"), "HF_HUB_OFFLINE": "1"}
        for name, what, argv in COMMANDS:
            out = Path(tmp) / name
            args = [a.replace("{out}", str(out)) for a in argv]
            started = time.perf_counter()
            done = subprocess.run([exe, *args], cwd=ROOT, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            rows.append(
                {
                    "command": name,
                    "what": what,
                    "argv": ["attnsurgery", *argv],
                    "seconds": round(seconds, 1),
                    "rc": done.returncode,
                }
            )
            print(f"{name:10s} {seconds:7.1f} s  rc {done.returncode}", flush=True)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
    machine = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    result = {"model": MODEL, "machine": machine, "rows": rows}
    docs = ROOT / "docs"
    (docs / "benchmarks-commands.json").write_text(json.dumps(result, indent=2) + "\n")
    (docs / "benchmarks-commands.md").write_text(render(result))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
