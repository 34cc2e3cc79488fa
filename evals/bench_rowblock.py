"""The CPU row-block kernel alone, at 1 and 2 threads, against PyTorch's flash kernel on the same inputs.

    python evals/bench_rowblock.py --out docs/benchmarks-rowblock.json   # rewrites docs/benchmarks-rowblock.{json,md}

Inputs are one layer's real query, key and value of SmolLM2-135M on real text (the views transformers hands an
attention function: (B, H, T, D) over (B, T, H, D) memory), so sinks, outliers and subnormal tails are the model's.
Each pass a surgery uses is timed (best of ``--repeats``) in a fresh process per thread count, beside stock SDPA
(flash) in the same process:

* ``whole rows + column sums``: ACT's detection pass (output, lse and each key's received attention);
* ``whole rows, clipped``: clipped softmax on every head;
* ``key tiles``: plain rows with an online softmax (every head);
* ``key tiles, MoH 7/9``: the query-norm router's pairs (2 shared heads + the 5 of 7 routed heads with the largest
  query norms per token), the others never computed.

``--serial-loop`` also times the kernel built without ``-fopenmp`` (how attnsurgery built it before: its
``at::parallel_for`` then runs on one thread and only MKL's GEMMs use the others), to show what the flag is worth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PASSES = (
    "stock sdpa (flash)",
    "whole rows + column sums",
    "whole rows, clipped",
    "key tiles",
    "key tiles, MoH 7/9",
)


def capture(model_name: str, length: int, layer: int, path: Path) -> None:
    """Save layer ``layer``'s (query, key, value, scaling) of a ``length``-token prefill of real text."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from attnsurgery import load_model

    model, tokenizer = load_model(model_name)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    ids = tokenizer(text * (1 + 6 * length // len(text)), return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise SystemExit(f"bench_rowblock: only {ids.shape[1]} tokens of text for --lengths {length}")
    saved = {}
    stock = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def record(module, query, key, value, mask, **kwargs):
        if module.layer_idx == layer:
            saved.update(query=query.clone(), key=key.clone(), value=value.clone(), scaling=module.scaling)
        return stock(module, query, key, value, mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS._local_mapping["sdpa"] = record
    try:
        with torch.no_grad():
            model(ids, logits_to_keep=1, use_cache=False)
    finally:
        ALL_ATTENTION_FUNCTIONS._local_mapping.pop("sdpa", None)
    torch.save(saved, path)


def _serial_module():
    """The kernel built without -fopenmp, under another name (a build of its own)."""
    from torch.utils.cpp_extension import load as build

    from attnsurgery import rowblock

    return build(
        name="attnsurgery_rowblock_serial_loop",
        sources=[str(rowblock.SOURCE)],
        extra_cflags=rowblock._flags(openmp=False),
    )


def child(path: Path, threads: int, repeats: int, serial: bool) -> dict:
    """{pass: best seconds} at ``threads`` threads."""
    import torch.nn.functional as F

    from attnsurgery import rowblock

    torch.set_num_threads(threads)
    if serial:
        rowblock._module = _serial_module()
    else:
        rowblock.load()
    saved = torch.load(path)
    q, k, v, scale = saved["query"], saved["key"], saved["value"], saved["scaling"]
    bsz, heads, length, _ = q.shape
    shared, routed_kept = 2, 5  # SmolLM2's 9 heads at active=0.75: 2 shared + 5 of the 7 routed
    norms = q[:, shared:].norm(dim=-1)
    keep = torch.zeros_like(norms, dtype=torch.bool).scatter_(1, norms.topk(routed_kept, dim=1).indices, True)
    active = torch.ones(bsz, heads, length, dtype=torch.bool)
    active[:, shared:] = keep
    weights = torch.ones(bsz, length)
    calls = {
        "stock sdpa (flash)": lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True
        ),
        "whole rows + column sums": lambda: rowblock.attention(
            q, k, v, None, scale, True, column_weights=weights
        ),
        "whole rows, clipped": lambda: rowblock.attention(
            q, k, v, None, scale, True, clip=(None, 1.03, -0.03)
        ),
        "key tiles": lambda: rowblock.attention(q, k, v, None, scale, True),
        "key tiles, MoH 7/9": lambda: rowblock.attention(q, k, v, None, scale, True, active=active),
    }
    best = {name: float("inf") for name in calls}
    with torch.no_grad():
        for call in calls.values():
            call()  # warm-up
        for _ in range(repeats):  # interleaved: a slow moment of the machine touches every pass alike
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
    best["loop threads"] = (
        rowblock.load().worker_threads() if hasattr(rowblock.load(), "worker_threads") else 1
    )
    return best


def _table(results: list[dict], command: str) -> str:
    lines = [
        f"Regenerate: `{command}` (rewrites this file and its JSON).",
        "",
        f"One layer's real q/k/v of {results[0]['model']} (layer {results[0]['layer']}), fp32, torch "
        f"{torch.__version__}, {platform.machine()}; best of {results[0]['repeats']} interleaved calls per pass, one "
        "fresh process per thread count. `x flash`: against stock SDPA in the same process; `scaling`: 1 thread's "
        "time over this one's.",
        "",
        "| tokens | build | threads | pass | ms | x flash | scaling |",
        "|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        one = next(
            (
                x
                for x in results
                if x["tokens"] == r["tokens"] and x["build"] == r["build"] and x["threads"] == 1
            ),
            None,
        )
        for name in PASSES:
            if r["build"] != "openmp loop" and name == PASSES[0]:
                continue  # flash is the same op in both builds
            scaling = f"{one['seconds'][name] / r['seconds'][name]:.2f}x" if one else ""
            lines.append(
                f"| {r['tokens']} | {r['build']} | {r['threads']} | {name} | {1000 * r['seconds'][name]:.1f} | "
                f"{r['seconds'][name] / r['seconds'][PASSES[0]]:.2f} | {scaling} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--serial-loop", action="store_true", help="also time the kernel built without -fopenmp"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serial", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads[0], args.repeats, args.serial)))
        return
    if args.out and args.out.suffix != ".json":
        raise SystemExit(
            f"bench_rowblock: --out {args.out} must end in .json (a .md table is written beside it)"
        )
    command = "python evals/bench_rowblock.py " + " ".join(sys.argv[1:])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in args.lengths:
            path = Path(tmp) / f"qkv{length}.pt"
            print(f"capturing layer {args.layer} at {length} tokens...", flush=True)
            capture(args.model, length, args.layer, path)
            for build in ["openmp loop"] + (["serial loop (no -fopenmp)"] if args.serial_loop else []):
                for threads in args.threads:
                    cmd = [sys.executable, __file__, "--child", str(path), "--threads", str(threads)]
                    cmd += ["--repeats", str(args.repeats)] + (["--serial"] if build != "openmp loop" else [])
                    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if done.returncode:
                        raise SystemExit(
                            f"bench_rowblock: the {threads}-thread child failed:\n{done.stderr[-2000:]}"
                        )
                    seconds = json.loads(done.stdout.strip().splitlines()[-1])
                    loop = seconds.pop("loop threads")
                    row = dict(model=args.model, layer=args.layer, repeats=args.repeats, tokens=length, build=build,
                               threads=threads, loop_threads=loop, seconds=seconds)  # fmt: skip
                    results.append(row)
                    print(
                        f"  {length} tokens, {build}, {threads} threads: "
                        + ", ".join(f"{k} {1000 * s:.0f} ms" for k, s in seconds.items()),
                        flush=True,
                    )
    table = _table(results, command)
    print(table)
    if args.out:
        args.out.write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
