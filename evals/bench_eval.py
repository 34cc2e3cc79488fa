"""Wall time of a patched lm-eval run vs the unpatched one, on the offline suite (target: <= 1.2x).

    python evals/bench_eval.py                       # SmolLM2, every offline task, limit 100 docs per task
    python evals/bench_eval.py --recipes act/smollm2-135m temperature --limit 50 --repeats 2

Arms run interleaved (A B C A B C ...) on the same loaded model and the best time of each is kept, so
machine noise hits every arm alike. Results: docs/benchmarks-eval.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from attnsurgery.eval.text import check_tasks, run_arm, task_manager
from attnsurgery.eval.text_results import make_arms
from attnsurgery.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", nargs="+", default=["act/smollm2-135m", "temperature", "clipped_softmax"])
    ap.add_argument("--tasks", nargs="+", default=["offline"])
    ap.add_argument("--limit", type=float, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-eval"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    manager = task_manager()
    tasks = check_tasks(args.tasks, manager)
    arms = make_arms(args.recipes, model=args.model)
    loaded = load_model(args.model)
    best: dict[str, float] = {}
    for rep in range(args.repeats):
        for arm in arms:
            result = run_arm(loaded, arm, tasks, manager, limit=args.limit, batch_size=args.batch_size)
            best[arm.name] = min(best.get(arm.name, float("inf")), result.seconds)
            print(
                f"repeat {rep + 1}: {arm.name:<32} {result.seconds:7.1f} s  valid={result.valid}", flush=True
            )
    base = best["baseline"]
    rows = [(name, secs, secs / base) for name, secs in best.items()]
    lines = [
        f"# Patched vs unpatched lm-eval wall time ({args.model})",
        "",
        f"`python evals/bench_eval.py --limit {args.limit:g} --repeats {args.repeats}`: tasks {', '.join(tasks)}, "
        f"limit {args.limit:g} docs per task, batch {args.batch_size}, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}. Best of {args.repeats}, "
        "arms interleaved. Target: every patched arm <= 1.2x the baseline.",
        "",
        "| arm | seconds | x baseline | within 1.2x |",
        "|---|---|---|---|",
        *[f"| {n} | {s:.1f} | {r:.2f} | {'yes' if r <= 1.2 else 'NO'} |" for n, s, r in rows],
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(
        json.dumps(
            {"args": vars(args), "tasks": tasks, "seconds": best, "ratio": {n: r for n, _, r in rows}},
            indent=1,
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
