"""Plots people look at instead of reading: attention heatmap grids (layers x heads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def plot_attention_grid(
    maps: dict[int, torch.Tensor], tokens: list[str], out: str | Path, heads: int = 4, title: str = ""
) -> Path:
    """Save a grid of attention heatmaps, one row per layer and one column per head (batch row 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(maps)
    n_heads = min(heads, next(iter(maps.values())).shape[1])
    fig, axes = plt.subplots(
        len(layers), n_heads, figsize=(2.6 * n_heads + 1, 2.4 * len(layers) + 0.8), squeeze=False
    )
    short = [t.replace("Ġ", " ").replace("▁", " ")[:8] for t in tokens]
    for r, layer in enumerate(layers):
        probs = maps[layer][0]
        for c in range(n_heads):
            ax = axes[r][c]
            # sqrt scale: sink columns hold most of the mass and would wash out everything else
            ax.imshow(
                probs[c].float().clamp(min=0).sqrt().numpy(),
                cmap="magma",
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {c}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=9)
            if r == len(layers) - 1 and len(short) <= 24:
                ax.set_xticks(range(len(short)))
                ax.set_xticklabels(short, rotation=90, fontsize=6)
    fig.suptitle(
        (title + "\n" if title else "") + "attention probabilities (sqrt scale; rows: queries)", fontsize=10
    )
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_head_sweep(result: Any, out: str | Path, label: str = "") -> Path:
    """Heatmap of an ACT head sweep: each swept (layer, head)'s mean delta, kept heads boxed, unswept blank.

    ``result`` is a :class:`attnsurgery.calibrate.CalibrationResult`. The colour scale is symmetric around 0
    (red helps, blue hurts), so noise looks like a speckle of both colours and a real effect stands out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = result.table()
    if not rows:
        raise ValueError("the sweep has no scored heads to plot.")
    layers = sorted({r.layer for r in rows})
    grid = torch.full((len(layers), result.num_heads), float("nan"))
    for r in rows:
        grid[layers.index(r.layer), r.head] = r.delta
    limit = float(grid.nan_to_num(0).abs().max()) or 1.0
    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 0.45 * result.num_heads), 1.6 + 0.28 * len(layers)))
    image = ax.imshow(grid.numpy(), cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto")
    for r in rows:
        if r.kept:
            ax.add_patch(
                Rectangle((r.head - 0.5, layers.index(r.layer) - 0.5), 1, 1, fill=False, lw=1.8, ec="black")
            )
    ax.set_xticks(range(result.num_heads))
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label=f"mean delta {result.metric}")
    kept = sum(r.kept for r in rows)
    ax.set_title(
        f"{label + ': ' if label else ''}ACT head sweep on {result.n_records} records\n"
        f"{kept}/{len(rows)} heads kept (boxed; rule {result.rule})",
        fontsize=9,
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
