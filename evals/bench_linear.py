"""Hedgehog / LoLCATs linear attention against stock SDPA: prefill time and peak memory, decode time per token
and cache memory, in the same run (issue 13's speed and memory goals; a benchmark, never a unit test).

    python evals/bench_linear.py                                    # small CPU defaults (minutes)
    python evals/bench_linear.py --prefill 2048 8192 16384 32768 --decode 1024 8192 32768   # the issue's grid
    python evals/bench_linear.py --device cuda --dtype bfloat16 ...  # on a GPU (memory from the CUDA allocator)

Arms: ``sdpa`` (the stock model), ``hybrid`` (hedgehog, window ``--window``), ``linear`` (hedgehog
``linear_only``). The feature maps are the identity init: speed and memory do not depend on trained values.

* Prefill: one forward of L tokens with ``logits_to_keep=1`` (what generate does), timed ``--repeats`` times
  with the arms interleaved (machine drift hits all alike; the best run is reported). Peak memory is measured
  in a fresh process per (arm, L): on CPU the rise of the resident set during the prefill over the resident set
  just before it (VmHWM reset through /proc/self/clear_refs), on CUDA ``max_memory_allocated`` minus the memory
  held before.
* Decode: prefill a context of C tokens with a cache, then ``--decode-steps`` single-token steps; reports the
  median seconds per step and the bytes the cache holds (keys/values; for hedgehog layers the kept window tail
  plus the linear state). Goals (issue 13): prefill faster than SDPA from 8k (<= 0.5x at 32k); decode time and
  state memory flat in context length.

Writes ``--out``/bench_linear.json, bench_linear.png and README.md (the table, with the command that rewrites it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ARMS = {
    "sdpa": None,
    "hybrid": {"window": 64},
    "linear": {"linear_only": True},
}


def _load(model_name: str, dtype: str, device: str):
    from attnsurgery import load_model

    model, tokenizer = load_model(model_name, dtype=dtype)
    return model.to(device).eval(), tokenizer


def _patch(model, arm: str, window: int):
    from attnsurgery import patch

    args = ARMS[arm]
    if args is None:
        return None
    args = {**args, "window": window} if "window" in args else args
    return patch(model, "hedgehog", **args)


def _ids(vocab: int, length: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab - 100, (1, length), generator=gen).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cache_bytes(cache) -> int:
    from attnsurgery.patches.hedgehog.cache import HedgehogCacheLayer

    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, HedgehogCacheLayer):
            total += layer.nbytes()
        else:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def peak_worker(args: argparse.Namespace) -> None:
    """In a fresh process: MiB one prefill of ``--length`` tokens adds (printed as JSON)."""
    import ctypes

    if not args.device.startswith("cuda"):
        # every large tensor gets its own mmap, returned to the OS on free: the high-water mark counts what the
        # arm holds at once, not what the allocator kept from earlier work
        ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    torch.set_num_threads(args.threads)
    model, tokenizer = _load(args.model, args.dtype, args.device)
    ids = _ids(tokenizer.vocab_size, args.length, args.device)
    _patch(model, args.arm, args.window)
    with torch.no_grad():
        model(ids[:, :16], logits_to_keep=1, use_cache=False)  # warm-up: one-time allocations are not the arm's
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            model(ids, logits_to_keep=1, use_cache=False)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
            before = _kib("VmRSS")
            model(ids, logits_to_keep=1, use_cache=False)
            peak = max(0, _kib("VmHWM") - before) / 1024
    print(json.dumps({"peak_mib": peak}))


def _peak(args: argparse.Namespace, arm: str, length: int) -> float | None:
    cmd = [
        sys.executable, __file__, "--worker", "--arm", arm, "--length", str(length), "--model", args.model,
        "--dtype", args.dtype, "--device", args.device, "--window", str(args.window), "--threads", str(args.threads),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["peak_mib"]
    print(f"  peak-memory worker failed ({arm}, {length}): {done.stderr.strip()[-300:]}", file=sys.stderr)
    return None


def bench_prefill(args, model, vocab: int) -> list[dict]:
    rows = []
    for length in args.prefill:
        ids = _ids(vocab, length, args.device)
        best = {arm: float("inf") for arm in args.arms}
        for _ in range(args.repeats):
            for arm in args.arms:  # interleaved
                handle = _patch(model, arm, args.window)
                try:
                    with torch.no_grad():
                        _sync(args.device)
                        start = time.perf_counter()
                        model(ids, logits_to_keep=1, use_cache=False)
                        _sync(args.device)
                        best[arm] = min(best[arm], time.perf_counter() - start)
                finally:
                    if handle is not None:
                        handle.remove()
        for arm in args.arms:
            peak = _peak(args, arm, length) if not args.no_memory else None
            rows.append({"length": length, "arm": arm, "seconds": best[arm], "peak_mib": peak})
            ratio = best[arm] / best["sdpa"] if "sdpa" in best else float("nan")
            print(f"prefill {length:>6} {arm:>7}: {best[arm]:8.3f} s ({ratio:.2f}x sdpa), peak {peak} MiB", flush=True)
    return rows


def bench_decode(args, model, vocab: int) -> list[dict]:
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rows = []
    for context in args.decode:
        ids = _ids(vocab, context, args.device)
        for arm in args.arms:
            handle = _patch(model, arm, args.window)
            try:
                with torch.no_grad():
                    out = model(ids, logits_to_keep=1, use_cache=True)
                    cache = getattr(out, name, None) or out.past_key_values
                    tok = out.logits[:, -1:].argmax(-1)
                    times, sizes = [], []
                    for _ in range(args.decode_steps):
                        _sync(args.device)
                        start = time.perf_counter()
                        out = model(tok, use_cache=True, **{name: cache})
                        _sync(args.device)
                        times.append(time.perf_counter() - start)
                        cache = getattr(out, name, None) or out.past_key_values
                        tok = out.logits[:, -1:].argmax(-1)
                        sizes.append(_cache_bytes(cache))
            finally:
                if handle is not None:
                    handle.remove()
            row = {
                "context": context,
                "arm": arm,
                "seconds_per_token": statistics.median(times),
                "cache_mib": sizes[-1] / 2**20,
                "cache_mib_first_step": sizes[0] / 2**20,
            }
            rows.append(row)
            print(
                f"decode  {context:>6} {arm:>7}: {row['seconds_per_token'] * 1e3:8.2f} ms/token, cache "
                f"{row['cache_mib']:.2f} MiB",
                flush=True,
            )
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = [
        ("prefill", "length", "seconds", "prefill time (s)"),
        ("prefill", "length", "peak_mib", "prefill peak memory (MiB)"),
        ("decode", "context", "seconds_per_token", "decode time per token (s)"),
        ("decode", "context", "cache_mib", "cache memory (MiB)"),
    ]
    for ax, (kind, x, y, title) in zip(axes, panels):
        for arm in result["arms"]:
            pts = [(r[x], r[y]) for r in result[kind] if r["arm"] == arm and r.get(y) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens" if kind == "prefill" else "context tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{result['model']}: hedgehog (window {result['window']}) vs SDPA, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render_markdown(result: dict) -> str:
    """The benchmark as a document: its command (which rewrites it), ratios vs SDPA and the goals."""
    sdpa = {r["length"]: r for r in result["prefill"] if r["arm"] == "sdpa"}
    lines = [
        f"# Hedgehog / LoLCATs linear attention vs stock SDPA ({result['model']})",
        "",
        f"`{result['command']}` rewrites this file, `bench_linear.json` and `bench_linear.png` (the curves).",
        "",
        f"Device: {result['device']}, {result['dtype']}, torch {result['torch']}; hybrid window {result['window']}; "
        f"feature maps at their identity init (speed and memory do not depend on trained values). Prefill: one "
        f"forward with `logits_to_keep=1`, best of {result.get('repeats', '?')} interleaved run(s); peak memory in "
        "a fresh process per (arm, length), the rise of the resident set over the loaded model (CPU) or "
        "`max_memory_allocated` (CUDA).",
        "",
        "Goals (issue 13): prefill faster than SDPA from 8k tokens, <= 0.5x at 32k; decode time and state memory "
        "flat in context length.",
        "",
        "| prefill tokens | arm | seconds | x SDPA | peak MiB | x SDPA memory |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in result["prefill"]:
        base = sdpa.get(row["length"])
        ratio = f"{row['seconds'] / base['seconds']:.2f}x" if base else "-"
        peak = row.get("peak_mib")
        mem = f"{peak / base['peak_mib']:.2f}x" if base and peak and base.get("peak_mib") else "-"
        lines.append(
            f"| {row['length']:,} | {row['arm']} | {row['seconds']:.2f} | {ratio} | "
            f"{'-' if peak is None else f'{peak:.0f}'} | {mem} |"
        )
    lines += [
        "",
        "| context tokens | arm | ms / decoded token | cache MiB |",
        "|---:|---|---:|---:|",
    ]
    for row in result["decode"]:
        lines.append(
            f"| {row['context']:,} | {row['arm']} | {row['seconds_per_token'] * 1e3:.1f} | {row['cache_mib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prefill", type=int, nargs="*", default=[512, 2048], help="prefill lengths")
    p.add_argument("--decode", type=int, nargs="*", default=[256, 1024], help="decode context lengths")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the per-arm peak-memory processes")
    p.add_argument("--out", default="evals/results/bench_linear")
    # internal: the peak-memory worker
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--arm", default="sdpa", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        peak_worker(args)
        return 0
    torch.set_num_threads(args.threads)
    model, tokenizer = _load(args.model, args.dtype, args.device)
    vocab = tokenizer.vocab_size
    result = {
        "model": args.model,
        "device": args.device if args.device != "cpu" else f"cpu ({args.threads} threads, {platform.processor() or platform.machine()})",
        "dtype": args.dtype,
        "window": args.window,
        "arms": args.arms,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "command": "python evals/bench_linear.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "prefill": bench_prefill(args, model, vocab) if args.prefill else [],
        "decode": bench_decode(args, model, vocab) if args.decode else [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_linear.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "bench_linear.png")
    (out / "README.md").write_text(render_markdown(result))
    print(f"wrote {out / 'bench_linear.json'}, {out / 'bench_linear.png'} and {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
