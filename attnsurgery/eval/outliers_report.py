"""What :func:`~.outliers.outlier_stats` returns (:class:`OutlierStats`: per decoder layer the kurtosis, inf-norm
and first-token share, and the largest activation) and how it reads: a markdown table
(:func:`render_outlier_table`) and a per-layer PNG (:func:`plot_outliers`), one arm or several side by side.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LayerOutliers:
    """One decoder layer: kurtosis and inf-norm of the attention output, MLP output and residual stream."""

    layer: int
    attn_kurtosis: float
    attn_inf_norm: float
    mlp_kurtosis: float
    mlp_inf_norm: float
    residual_kurtosis: float
    residual_inf_norm: float
    #: mean attention on the first real token (None: no sequence had a second real token)
    sink_share: float | None = None


@dataclass
class MaxActivation:
    """The largest ``|x|`` over every hooked site: its signed value and where it was."""

    value: float
    layer: int
    site: str  # "attn" | "mlp" | "residual"
    sequence: int  # index over all sequences passed, in order
    position: int  # column in that batch's input (padding included)
    token_index: int  # index among the sequence's real tokens
    channel: int
    token_id: int


@dataclass
class OutlierStats:
    """What :func:`outlier_stats` returns; ``to_dict()`` / ``to_json()`` give plain JSON."""

    model: str
    num_sequences: int
    num_tokens: int
    layers: list[LayerOutliers]
    max_activation: MaxActivation | None
    label: str | None = None
    #: max over layers and the three sites of the per-layer averages (the paper's "max kurtosis")
    max_kurtosis: float = 0.0
    max_kurtosis_at: str = ""
    #: mean over layers and sites (the paper's "avg kurtosis", over our hooked modules)
    avg_kurtosis: float = 0.0
    max_inf_norm: float = 0.0
    max_inf_norm_at: str = ""
    #: mean first-token share over layers >= 2 (the early layers rarely sink); None if there are none
    mean_sink_share: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutlierStats:
        data = dict(data)
        data["layers"] = [LayerOutliers(**row) for row in data["layers"]]
        if data.get("max_activation") is not None:
            data["max_activation"] = MaxActivation(**data["max_activation"])
        return cls(**data)


# ----------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------


def _labelled(stats: Any) -> list[tuple[str, OutlierStats]]:
    if isinstance(stats, OutlierStats):
        return [(stats.label or stats.model, stats)]
    if isinstance(stats, Mapping):
        return [(str(k), v) for k, v in stats.items()]
    if isinstance(stats, Sequence):
        return [(s.label or f"{s.model} #{i}", s) for i, s in enumerate(stats)]
    raise TypeError(
        f"expected OutlierStats, a list of them or {{label: OutlierStats}}; got {type(stats).__name__}"
    )


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def render_outlier_table(stats: Any) -> str:
    """Markdown: a summary row per stats object, then a per-layer table for each.

    ``stats``: an :class:`OutlierStats`, a list of them, or ``{label: OutlierStats}`` (baseline vs patched).
    """
    items = _labelled(stats)
    lines = [
        "| arm | max kurtosis | where | avg kurtosis | max inf-norm | where | sink share (layers ≥ 2) | largest activation |",
        "|---|---:|---|---:|---:|---|---:|---|",
    ]
    for name, s in items:
        big = s.max_activation
        where = (
            f"{_fmt(big.value)} (layer {big.layer} {big.site}, seq {big.sequence} token {big.token_index}, "
            f"channel {big.channel})"
            if big
            else "–"
        )
        lines.append(
            f"| {name} | {_fmt(s.max_kurtosis)} | {s.max_kurtosis_at} | {_fmt(s.avg_kurtosis)} | "
            f"{_fmt(s.max_inf_norm)} | {s.max_inf_norm_at} | {_fmt(s.mean_sink_share, 3)} | {where} |"
        )
    for name, s in items:
        lines += [
            "",
            f"**{name}** ({s.model}, {s.num_sequences} sequences, {s.num_tokens} tokens)",
            "",
            "| layer | kurt attn | kurt mlp | kurt resid | inf attn | inf mlp | inf resid | sink share |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in s.layers:
            lines.append(
                f"| {row.layer} | {_fmt(row.attn_kurtosis)} | {_fmt(row.mlp_kurtosis)} | "
                f"{_fmt(row.residual_kurtosis)} | {_fmt(row.attn_inf_norm)} | {_fmt(row.mlp_inf_norm)} | "
                f"{_fmt(row.residual_inf_norm)} | {_fmt(row.sink_share, 3)} |"
            )
        lines += [f"_{note}_" for note in s.notes]
    return "\n".join(lines) + "\n"


def plot_outliers(stats: Any, path: str | Path, title: str = "") -> Path:
    """A per-layer PNG: kurtosis, inf-norm (log scale; solid attn, dashed MLP, dotted residual) and sink share;
    several labelled stats (``{label: OutlierStats}`` or a list) are overlaid in one colour each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    items = _labelled(stats)
    styles = {"attn": "-", "mlp": "--", "residual": ":"}
    # with two or more arms a second row shows each arm against the first, per layer: arms that nearly coincide on
    # the absolute axes (a patched model drawn exactly over its baseline) still read as two
    compare = len(items) >= 2
    fig, grid = plt.subplots(2 if compare else 1, 3, figsize=(15, 8.2 if compare else 4.2), squeeze=False)
    axes = grid[0]
    for c, (name, s) in enumerate(items):
        # the default cycle repeats after 10 arms; tab20 keeps up to 20 apart
        color = f"C{c}" if len(items) <= 10 else plt.get_cmap("tab20")(c % 20)
        x = [row.layer for row in s.layers]
        for site, style in styles.items():
            for ax, metric in zip(axes[:2], ("kurtosis", "inf_norm")):
                y = [getattr(row, f"{site}_{metric}") for row in s.layers]
                ax.plot(x, y, style, color=color, marker=".", label=f"{name} {site}")
        shares = [(row.layer, row.sink_share) for row in s.layers if row.sink_share is not None]
        if shares:
            axes[2].plot(*zip(*shares), "-", color=color, marker="o", label=name)
    for ax, name in zip(
        axes, ("kurtosis (non-excess; Gaussian = 3)", "inf-norm  max|x|", "first-token attention share")
    ):
        ax.set_title(name)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[:2]:
        ax.set_yscale("log")  # a value of 0 (e.g. a silenced block) is left off the log axis
    axes[2].set_ylim(0, 1)
    if compare:
        base_name, base = items[0]
        for c, (name, s) in enumerate(items[1:], start=1):
            color = f"C{c}" if len(items) <= 10 else plt.get_cmap("tab20")(c % 20)
            pairs = list(zip(base.layers, s.layers))
            x = [row.layer for _, row in pairs]
            for site, style in styles.items():
                for ax, metric in zip(grid[1][:2], ("kurtosis", "inf_norm")):
                    ratio = []
                    for b, row in pairs:
                        old_value, new_value = (
                            getattr(b, f"{site}_{metric}"),
                            getattr(row, f"{site}_{metric}"),
                        )
                        ok = old_value and new_value and old_value > 0 and new_value > 0
                        ratio.append(new_value / old_value if ok else float("nan"))
                    ax.plot(x, ratio, style, color=color, marker=".")
            diff = [
                (row.layer, row.sink_share - b.sink_share)
                for b, row in pairs
                if row.sink_share is not None and b.sink_share is not None
            ]
            if diff:
                grid[1][2].plot(*zip(*diff), "-", color=color, marker="o", label=f"{name} - {base_name}")
        for ax, what in zip(grid[1], ("kurtosis", "inf-norm")):
            ax.set_yscale("log")
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_title(f"{what}: each arm / {base_name} (1 = unchanged)")
        grid[1][2].axhline(0.0, color="black", lw=0.8)
        grid[1][2].set_title(f"first-token share: each arm - {base_name}")
        grid[1][2].legend(fontsize=7)
        for ax in grid[1]:
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # line style = site (one small legend), colour = stats label (the sink-share panel's legend): with many
    # labelled stats a legend entry per (label, site) would not fit the figure
    from matplotlib.lines import Line2D

    site_handles = [
        Line2D([], [], color="0.3", linestyle=style, label=site) for site, style in styles.items()
    ]
    axes[0].legend(handles=site_handles, fontsize=7)
    if len(items) > 1:
        axes[2].legend(fontsize=7, ncol=1 + len(items) // 8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
