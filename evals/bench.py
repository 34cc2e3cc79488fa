"""Prefill speed and peak memory of patched models, as ratios against stock SDPA in the same run.

    python evals/bench.py                              # SmolLM2-135M, 512/2048/8192 tokens, 2 threads
    python evals/bench.py --lengths 512 2048 --eager   # also the stock eager path (what reference code uses)
    python evals/bench.py --check                      # exit 1 if a target is missed

Arms: stock SDPA; identity-configured temperature + head_scale + clipped_softmax on every layer; active
temperature (fused kernel, query stage); active head_scale (head-output stage); clipped_softmax on the tiled
path; optionally stock eager. Each forward is a prefill with ``logits_to_keep=1`` (what generate does), timed
``--repeats`` times with the arms interleaved so machine drift hits all of them alike; the median is reported.
Peak memory is the rise of the process's resident set (VmHWM reset through /proc/self/clear_refs) during the
forward, over the resident set just before it, so weights are not counted. Timing targets live here, never in
unit tests.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from attnsurgery import load_model, patch

TARGETS = {
    # (arm, length): (metric, limit)
    ("identity (all surgeries, every layer)", 512): ("time", 1.03),
    ("identity (all surgeries, every layer)", 2048): ("time", 1.03),
    ("identity (all surgeries, every layer)", 8192): ("time", 1.03),
    ("clipped_softmax (tiled)", 2048): ("time", 1.5),
    ("clipped_softmax (tiled)", 8192): ("memory", 1.2),
}


def _arms(eager: bool):
    """name -> context manager factory applied to the model for that arm."""

    def identity(model):
        stack = contextlib.ExitStack()
        for name in ("temperature", "head_scale", "clipped_softmax"):
            stack.enter_context(patch(model, name))
        return stack

    arms = {
        "stock sdpa": lambda model: contextlib.nullcontext(),
        "identity (all surgeries, every layer)": identity,
        "temperature tau=0.9 (query stage)": lambda model: patch(model, "temperature", tau=0.9, c=0.02),
        "head_scale 0.5 (head-output stage)": lambda model: patch(model, "head_scale", scale=0.5),
        "clipped_softmax (tiled)": lambda model: patch(model, "clipped_softmax", gamma=-12 / 512),
    }
    if eager:
        arms["stock eager"] = "eager"
    return arms


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _libc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    # fixed mmap threshold: big tensors are mmapped and returned to the OS on free, so each arm's peak is its own
    libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    return libc


LIBC = _libc()


def _reset_peak() -> bool:
    if LIBC is not None:
        LIBC.malloc_trim(0)  # hand freed heap back, so the next peak counts fresh pages
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_one(model, ids, arm) -> tuple[float, float]:
    """(seconds, peak MiB above the pre-forward resident set) for one prefill."""
    gc.collect()
    if arm == "eager":
        ctx = contextlib.nullcontext()
        model.set_attn_implementation("eager")
    else:
        ctx = arm(model)
    try:
        with ctx, torch.no_grad():
            gc.collect()
            _reset_peak()
            before = _rss_kib("VmRSS")
            start = time.perf_counter()
            model(ids, logits_to_keep=1, use_cache=False)
            elapsed = time.perf_counter() - start
            peak = _rss_kib("VmHWM")
    finally:
        if arm == "eager":
            model.set_attn_implementation("sdpa")
    return elapsed, max(0, peak - before) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="also time stock eager attention")
    parser.add_argument("--out", default=None, help="write results JSON here (and a .md beside it)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype="float32")
    arms = _arms(args.eager)
    results = []
    for length in args.lengths:
        ids = torch.randint(
            100, tokenizer.vocab_size - 100, (1, length), generator=torch.Generator().manual_seed(0)
        )
        run_one(model, ids[:, :64], arms["stock sdpa"])  # warm-up
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
        repeats = max(1, args.repeats if length < 8192 else min(args.repeats, 2))
        for r in range(repeats):
            for name, arm in arms.items():
                if name == "stock eager" and length > 4096:
                    continue  # O(n^2) memory per layer; the point is made at 2048
                samples[name].append(run_one(model, ids, arm))
                print(
                    f"  {length:>5} tokens  {name:<40} run {r + 1}/{repeats}: "
                    f"{samples[name][-1][0]:.2f}s, {samples[name][-1][1]:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
        base_t = statistics.median(t for t, _ in samples["stock sdpa"])
        base_m = statistics.median(m for _, m in samples["stock sdpa"])
        for name, runs in samples.items():
            if not runs:
                continue
            t = statistics.median(x for x, _ in runs)
            m = statistics.median(x for _, x in runs)
            results.append(
                {
                    "arm": name,
                    "tokens": length,
                    "seconds": t,
                    "time_ratio": t / base_t,
                    "peak_mib": m,
                    "memory_ratio": m / base_m if base_m > 0 else float("nan"),
                }
            )

    failures = []
    lines = [
        f"Model {args.model}, fp32, {args.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}; "
        f"median of {args.repeats} interleaved prefills (2 at 8192), logits_to_keep=1.",
        "",
        "| tokens | arm | seconds | x stock SDPA | peak MiB over weights | x stock SDPA | target |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in results:
        target = TARGETS.get((row["arm"], row["tokens"]))
        verdict = ""
        if target:
            metric, limit = target
            value = row["time_ratio"] if metric == "time" else row["memory_ratio"]
            ok = value <= limit
            verdict = f"{metric} <= {limit}x: {'ok' if ok else 'MISSED'}"
            if not ok:
                failures.append(f"{row['arm']} at {row['tokens']}: {metric} {value:.2f}x > {limit}x")
        lines.append(
            f"| {row['tokens']} | {row['arm']} | {row['seconds']:.2f} | {row['time_ratio']:.2f} | "
            f"{row['peak_mib']:.0f} | {row['memory_ratio']:.2f} | {verdict} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"results": results, "failures": failures}, indent=2))
        out.with_suffix(".md").write_text(table + "\n")
    if failures:
        print("\nmissed targets:\n  " + "\n  ".join(failures), file=sys.stderr)
    return 1 if (failures and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
