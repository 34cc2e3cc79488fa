"""Plots people look at instead of reading: attention heatmap grids (layers x heads)."""

from __future__ import annotations

from pathlib import Path

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
