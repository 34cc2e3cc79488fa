"""Tune the tiled attention's block size on a GPU: seconds per call for each block of query rows.

    python evals/gpu_tiles.py --out docs/gpu-tiles.json

The tiled pass (clipped softmax, ACT without its fused kernel, probability stages) loops over blocks of query
rows; on a GPU a block must be large enough to fill the device yet keep its fp32 scores (block x keys x heads)
small. The kernel's default is ``TILE_ROWS_CUDA`` rows within ``TILE_BYTES_CUDA`` of scores
(``ATTNSURGERY_TILE_ROWS_CUDA`` / ``ATTNSURGERY_TILE_MB_CUDA`` override them); this script measures the choice.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

from attnsurgery import kernels


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator growth is not the block size's cost
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows_out = []
    for length in args.lengths:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(
                1, args.heads, length, args.head_dim, device="cuda", generator=g, dtype=torch.bfloat16
            )
            for _ in range(3)
        )
        scale = args.head_dim**-0.5
        sdpa = seconds(
            functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v, is_causal=True),
            args.repeats,
        )
        default = max(
            16,
            min(kernels.TILE_ROWS_CUDA, kernels.TILE_BYTES_CUDA // (4 * args.heads * length)),
        )
        for rows in args.rows:
            tiled = functools.partial(
                kernels.tiled_attention, q, k, v, None, scale, is_causal=True, block_rows=rows
            )
            t = seconds(tiled, args.repeats)
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            tiled()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            row = dict(tokens=length, block_rows=rows, seconds=t, x_sdpa=t / sdpa, peak_mib=peak,
                       default=rows == default)  # fmt: skip
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows_out}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
