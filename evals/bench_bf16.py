"""Training steps on a CPU under bf16 autocast and with the heap kept: how much faster, and is bf16 still faithful.

    python evals/bench_bf16.py --out docs/benchmarks-bf16.json      # rewrites docs/benchmarks-bf16.{json,md}

CPUs with AMX or AVX-512 BF16 (Sapphire Rapids and later Xeons) multiply bf16 matrices several times faster than
fp32 ones, and a training step is mostly matrix products: the teacher's and the student's forward, the student's
backward, and on Gemma-3 a 262k-word output layer that alone is most of the step. ``mixed_precision: bf16``
(accelerate's autocast, a training setting of ``attnsurgery train`` and of budget tables) runs them in bf16 with
fp32 weights, optimiser and loss. Both precisions also run with glibc's heap kept between steps
(:mod:`attnsurgery.train.heap`, what the trainer does): the same arithmetic without a fresh mmap for every large
tensor of every step.

Speed alone says nothing about whether the run learns the same thing. For each trained recipe below (a shipped
state: gradients at an untrained identity init are about zero and compare nothing), on the same batches and the
same weights, this measures:

* the objective's value in bf16 against fp32 (relative difference);
* the cosine between the bf16 and the fp32 gradient of the trainable parameters;
* as the scale those are judged on, the cosine between the fp32 gradients of two different batches (what the
  optimiser sees from one step to the next anyway): bf16 is harmless when its gradient sits much closer to the fp32
  one than another batch's gradient does;
* the time of one full step (objective, backward) each way, best of ``--repeats`` interleaved runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

from attnsurgery import load_model, patch
from attnsurgery.recipe import find_recipe
from attnsurgery.train import prepare_data
from attnsurgery.train.heap import keep_freed_memory
from attnsurgery.train.objectives import parse_objective
from attnsurgery.train.trainer import _Trainee

# (model, shipped recipe, objective it trains on, tokens per window): the trained arms of evals/budget.yaml
CASES = {
    "gates-gemma-soft": ("gemma3-270m", "gated_attention/gemma3-270m-soft", "kd+0.3*sink+0.1*outlier", 256),
    "moh-learned-75+lora": ("smollm2-135m", "moh/smollm2-135m-learned-75-lora", "kd", 256),
    "hedgehog-linear (LoRA stage)": ("smollm2-135m", "hedgehog/smollm2-135m-linear", "kd", 256),
}


def _step(trainee: _Trainee, params: list[torch.Tensor], ids: torch.Tensor, bf16: bool):
    """(objective, flat gradient, seconds) of one objective + backward."""
    for p in params:
        p.grad = None
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        total, _ = trainee(ids)
    total.backward()
    seconds = time.perf_counter() - start
    grad = torch.cat([p.grad.reshape(-1).float() for p in params])
    return float(total.detach()), grad, seconds


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def measure(name: str, batch: int, batches: int, repeats: int) -> dict:
    model_name, recipe, objective, seq_len = CASES[name]
    model, tokenizer = load_model(model_name, dtype="float32")
    for p in model.parameters():
        p.requires_grad_(False)
    handle = patch(model, find_recipe(recipe))
    surgeries = list(handle.surgeries)
    for s in surgeries:  # a later stage trains only its own surgery: the frozen feature maps stay frozen
        for p in s.parameters():
            p.requires_grad_(s.name != "hedgehog" or len(surgeries) == 1)
    params = [p for s in surgeries for p in s.parameters() if p.requires_grad]
    # the training split (never a reported test split), first windows in order
    data = prepare_data(tokenizer, "gutenberg_ppl", seq_len, max_context=model.config.max_position_embeddings)
    windows = [data.train[i * batch : (i + 1) * batch] for i in range(batches)]
    trainee = _Trainee(model, surgeries, parse_objective(objective), 1.0)
    model.eval()
    trainee.open()
    try:
        rows, grads32 = [], []
        for ids in windows:
            loss32, g32, _ = _step(trainee, params, ids, bf16=False)
            loss16, g16, _ = _step(trainee, params, ids, bf16=True)
            grads32.append(g32)
            rows.append({"loss_fp32": loss32, "loss_bf16": loss16, "grad_cos_bf16_fp32": _cos(g16, g32)})
        across = [_cos(grads32[i], grads32[i + 1]) for i in range(len(grads32) - 1)]
        # (bf16, heap kept) -> best seconds, peak resident MiB
        best = {arm: float("inf") for arm in ARMS}
        peak = dict.fromkeys(ARMS, 0.0)
        for _ in range(repeats):  # interleaved: machine noise hits every arm alike
            for bf16, keep in ARMS:
                with keep_freed_memory(keep) as kept:
                    if keep and not kept:
                        raise SystemExit("bench_bf16: keeping the heap needs glibc (Linux); run without it")
                    _reset_peak_rss()
                    _step(trainee, params, windows[0], bf16)  # the first step fills the kept heap
                    seconds = _step(trainee, params, windows[0], bf16)[2]
                    peak[bf16, keep] = max(peak[bf16, keep], _peak_rss_mib())
                best[bf16, keep] = min(best[bf16, keep], seconds)
    finally:
        trainee.close()
        handle.remove()
    tokens = batch * seq_len
    return {
        "case": name,
        "model": model_name,
        "recipe": recipe,
        "objective": objective,
        "tokens_per_step": tokens,
        "batches": rows,
        "loss_rel_diff_max": max(abs(r["loss_bf16"] / r["loss_fp32"] - 1) for r in rows),
        "grad_cos_bf16_fp32_min": min(r["grad_cos_bf16_fp32"] for r in rows),
        "grad_cos_between_batches_fp32_max": max(across) if across else None,
        "arms": [
            {
                "bf16": bf16,
                "heap_kept": keep,
                "step_seconds": best[bf16, keep],
                "speedup": best[False, False] / best[bf16, keep],
                "peak_rss_mib": peak[bf16, keep],
            }
            for bf16, keep in ARMS
        ],
    }


# (bf16 autocast, heap kept): the default first, the ratios are against it
ARMS = [(False, False), (False, True), (True, False), (True, True)]


def _reset_peak_rss() -> None:
    """Reset the process's peak resident set (Linux: /proc/self/clear_refs, 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _arm_name(arm: dict) -> str:
    return ("bf16" if arm["bf16"] else "fp32") + (", heap kept" if arm["heap_kept"] else "")


def _cpu_flags() -> list[str]:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0].split()
    except (OSError, IndexError):
        return []
    return sorted(f for f in flags if f.startswith("amx") or f == "avx512_bf16")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--batches", type=int, default=3, help="batches compared (gradients of consecutive ones too)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed steps each way (best counts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write results JSON here (and a .md beside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for name in args.cases:
        results.append(measure(name, args.batch, args.batches, args.repeats))
        r = results[-1]
        times = ", ".join(
            f"{_arm_name(a)} {a['step_seconds']:.2f} s ({a['speedup']:.2f}x)" for a in r["arms"]
        )
        print(
            f"{name}: {times}; grad cos {r['grad_cos_bf16_fp32_min']:.4f} (batches apart "
            f"{r['grad_cos_between_batches_fp32_max']:.4f}), objective {100 * r['loss_rel_diff_max']:.2f}%",
            file=sys.stderr,
            flush=True,
        )
    command = "python evals/bench_bf16.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = [
        "# Training steps under bf16 autocast, with the heap kept (CPU)",
        "",
        f"`{command}` — {args.threads} threads, {platform.machine()}, CPU flags {', '.join(_cpu_flags()) or 'none'}, "
        f"torch {torch.__version__}. Each case: a shipped trained state, batch {args.batch}, its real objective; one "
        "step = objective + backward (no optimiser), best of the timed runs, each after one untimed step; peak "
        "resident memory of the process during that arm. 'heap kept': attnsurgery.train.heap.keep_freed_memory, "
        "which the trainer uses.",
        "",
        "| case | fp32, default heap s | fp32, heap kept | bf16, default heap | bf16, heap kept | peak MiB (the same "
        "four) |",
        "|---|---:|---:|---:|---:|---|",
        *[
            f"| {r['case']} | {r['arms'][0]['step_seconds']:.2f} | "
            + " | ".join(f"{a['step_seconds']:.2f} s ({a['speedup']:.2f}x)" for a in r["arms"][1:])
            + " | "
            + " / ".join(f"{a['peak_rss_mib']:.0f}" for a in r["arms"])
            + " |"
            for r in results
        ],
        "",
        f"Does bf16 follow the fp32 gradient? Same weights, the same {args.batches} batches; 'batches apart' is the "
        "largest cosine between the fp32 gradients of consecutive batches (the noise a step sees anyway).",
        "",
        "| case | grad cos bf16 vs fp32 (min) | grad cos batches apart (max) | objective bf16 vs fp32 (max) |",
        "|---|---:|---:|---:|",
        *[
            f"| {r['case']} | {r['grad_cos_bf16_fp32_min']:.4f} | {r['grad_cos_between_batches_fp32_max']:.4f} | "
            f"{100 * r['loss_rel_diff_max']:.2f}% |"
            for r in results
        ],
    ]
    print("\n".join(md))
    if args.out:
        out = Path(args.out)
        out.write_text(
            json.dumps({"command": command, "cpu_flags": _cpu_flags(), "cases": results}, indent=2) + "\n"
        )
        out.with_suffix(".md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
