"""The one report renderer of baseline-vs-patched tables, text (lm-eval, :mod:`.text`) and vision (POPE/CHAIR,
:mod:`.vision`) alike: a markdown table, a PNG bar chart and the JSON beside them.

A table is rows of ``{"arms": {arm: entry}}`` where an entry has ``value``, ``stderr`` and ``valid`` and, for
every arm after the baseline, the paired ``delta``, ``delta_stderr`` and ``p``. Each runner turns its report into
a :class:`Table` (plus the lines around it) and a list of :class:`Panel`, and this module draws them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Number = Callable[[Any], str]


def fmt_value(value: float | None, digits: int = 4) -> str:
    """Text tables' numbers: ``digits`` decimals, one above 1000, ``–`` for None, ``nan``/``inf`` as they are."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–" if value is None else str(value)
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.1f}"


def fmt_percent(value: float | None, digits: int = 2) -> str:
    """Vision tables' numbers (percentages): ``digits`` decimals, ``–`` for None and non-finite values."""
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def p_label(p: float) -> str:
    """``p=0.03`` or ``p<0.001``."""
    text = "<0.001" if p < 0.001 else f"{p:.2g}"
    return f"p{text}" if text.startswith("<") else f"p={text}"


def published_cell(rows: Sequence[dict[str, Any]]) -> str:
    """``arm: value [± std]; ...`` of the published numbers that match a row, or ``–``."""
    hits = [
        f"{p['arm']}: {p['value']}" + (f" ± {p['std']}" if p.get("std") is not None else "") for p in rows
    ]
    return "; ".join(hits) or "–"


@dataclass
class Table:
    """One markdown table: ``lead`` columns, then each arm's value ± stderr, then each patched arm's delta."""

    arms: list[str]  # baseline first
    lead: list[str]  # names of the columns before the arms, e.g. ["task", "metric"]
    rows: list[
        tuple[list[str], dict[str, dict[str, Any]], list[dict[str, Any]] | None]
    ]  # (lead, arms, published)
    num: Number = fmt_value  # how values and stderrs print
    delta_digits: int = 4
    published: bool = False  # a last column with published numbers
    extra: Callable[[dict[str, Any]], str] = lambda entry: ""  # appended to a value cell (e.g. seed spread)

    def value_cell(self, entry: dict[str, Any]) -> str:
        cell = self.num(entry["value"]) + (
            f" ± {self.num(entry['stderr'])}" if entry.get("stderr") is not None else ""
        )
        cell += self.extra(entry)
        return cell if entry["valid"] else f"**INVALID** ({cell})"

    def delta_cell(self, entry: dict[str, Any]) -> str:
        if entry.get("delta") is None:
            return "–"
        se = f" ± {self.num(entry['delta_stderr'])}" if entry.get("delta_stderr") is not None else ""
        return f"{entry['delta']:+.{self.delta_digits}f}{se} ({p_label(entry['p'])})"

    def lines(self) -> list[str]:
        header = [*self.lead, *self.arms, *[f"Δ {n}" for n in self.arms[1:]]]
        if self.published:
            header.append("published")
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for lead, entries, published in self.rows:
            cells = [*lead, *(self.value_cell(entries[n]) for n in self.arms)]
            cells += [self.delta_cell(entries[n]) for n in self.arms[1:]]
            if self.published:
                cells.append(published_cell(published or []))
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
        return out


@dataclass
class Panel:
    """One bar chart panel: a bar per arm with its stderr, invalid arms hatched, published values as ticks."""

    title: str
    ylabel: str
    values: list[float]
    errors: list[float]
    valid: list[bool]
    labels: list[str]  # tick label per bar
    marks: list[tuple[int, float]] = field(default_factory=list)  # (bar index, published value)
    # bars measure from 0 (accuracies, rates); a scale without a meaningful 0 in view (perplexity ~30, where a
    # significant +1.4 would look flat) is drawn as points with error bars on an axis fitted to the values
    from_zero: bool = True


def plot_panels(
    panels: Sequence[Panel],
    out: str | Path,
    *,
    panel_size: tuple[float, float],
    title_size: int,
    tick_style: dict[str, Any],
    suptitle: str | None = None,
) -> Path:
    """Up to four panels a row, saved as a PNG at ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels):
        n = len(panel.values)
        if panel.from_zero:
            bars = ax.bar(range(n), panel.values, yerr=panel.errors, capsize=3, color=colors[:n])
            for bar, valid in zip(bars, panel.valid):
                if not valid:
                    bar.set_hatch("//")
                    bar.set_alpha(0.4)
        else:
            for i, (value, error, valid) in enumerate(zip(panel.values, panel.errors, panel.valid)):
                ax.errorbar(
                    i,
                    value,
                    yerr=error,
                    fmt="o",
                    ms=7,
                    capsize=4,
                    color=colors[i % len(colors)],
                    alpha=1.0 if valid else 0.35,
                )
            low = min(v - e for v, e in zip(panel.values, panel.errors))
            high = max(v + e for v, e in zip(panel.values, panel.errors))
            pad = 0.15 * (high - low) or 0.05 * abs(high) or 1.0
            ax.set_ylim(low - pad, high + pad)
            ax.set_xlim(-0.6, n - 0.4)
            ax.grid(axis="y", alpha=0.3)
        for i, value in panel.marks:
            ax.plot([i - 0.4, i + 0.4], [value] * 2, color="black", lw=2)
        ax.set_xticks(range(n), panel.labels, **tick_style)
        ax.set_title(panel.title, fontsize=title_size)
        ax.set_ylabel(panel.ylabel, fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if suptitle is not None:
        fig.suptitle(suptitle, fontsize=9)
    return save_figure(fig, out, dpi=110)


def save_figure(fig: Any, out: str | Path, dpi: int) -> Path:
    """Lay out, save (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def write_files(
    out_dir: str | Path, name: str, payload: Any, markdown: str, plot: Callable[[Path], Any]
) -> dict[str, Path]:
    """``<name>.json`` (``payload``), ``<name>.md`` and ``<name>.png`` (drawn by ``plot(path)``) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md", "png": out_dir / f"{name}.png"}
    paths["json"].write_text(json.dumps(payload, indent=1, default=str))
    paths["md"].write_text(markdown)
    plot(paths["png"])
    return paths
