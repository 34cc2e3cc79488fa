"""Budget curves, reported: ``curve.md`` (every point, and where each arm's curve leads) and ``curve.png``.

:func:`extrapolate` fits a power law to an arm's points; :func:`render_curve` and :func:`plot_curve` draw the curve
that :mod:`attnsurgery.eval.budget` grows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .budget import BudgetTable


def training_rate(point: dict[str, Any]) -> tuple[float | None, str | None]:
    """Training tokens per second of the runs behind a point, and what the figure is. From each stage's median step
    where its run kept step times ("median step": a pause, a resume or a busy minute does not move it); else from
    the runs' wall time over every session ("wall time": other jobs and pauses included, so it reads slow). Stage 1
    is one run continued across budgets, so its time at this budget covers all its steps; later stages run afresh.
    The point's own ``seconds`` is no rate: it covers only the process that finished it."""
    steps = point["steps"]
    medians, seconds = point.get("step_seconds") or [], point.get("train_seconds") or []
    if len(medians) == len(steps) and all(m for m in medians):
        return point["tokens"] / sum(n * m for n, m in zip(steps, medians)), "median step"
    if len(seconds) == len(steps) and all(t for t in seconds):
        return point["tokens"] / sum(seconds), "wall time"
    return None, None


def extrapolate(
    points: list[dict[str, Any]], goal_pct: float, min_tokens: int = 20_000
) -> dict[str, Any] | None:
    """Where an arm's curve leads: a power law ``rel_pct = a * tokens ** b`` fitted (least squares in log-log) to
    its CPU points of at least ``min_tokens`` tokens (the first steps are warm-up, not the trend), and the tokens
    it would need to reach ``goal_pct``; with the arm's measured training rate, the hours that would take here.

    None with fewer than two such points. ``tokens_to_goal`` is None when the fit does not fall (b >= 0) and 0 when
    the goal is met already. An extrapolation, not a promise: curves of this kind flatten."""
    usable = sorted(
        (
            p
            for p in points
            if p.get("device", "cpu") == "cpu" and p["tokens"] >= min_tokens and p["rel_pct"] > 0
        ),
        key=lambda p: p["tokens"],
    )
    if len(usable) < 2:
        return None
    xs = [math.log(p["tokens"]) for p in usable]
    ys = [math.log(p["rel_pct"]) for p in usable]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    last = usable[-1]
    if last["rel_pct"] <= goal_pct:
        tokens = 0
    elif b >= 0:
        tokens = None
    else:
        tokens = int(math.exp((math.log(goal_pct) - a) / b))
    rate, rate_from = training_rate(last)
    return {
        "fit_points": [p["tokens"] for p in usable],
        "per_x4": 4**b,  # the relative change multiplies by this per x4 tokens
        "tokens_to_goal": tokens,
        "tokens_per_second": rate,
        "rate_from": rate_from,
        "hours_to_goal": (tokens / rate / 3600.0) if tokens and rate else (0.0 if tokens == 0 else None),
    }


def render_curve(curve: dict[str, Any], table: BudgetTable | None = None) -> str:
    lines = [f"# {table.name if table else 'budget'}", ""]
    if table is not None and table.description:
        lines += [table.description.strip(), ""]
    source = "evals/budget.yaml"
    if table is not None and table.path is not None:
        try:
            source = Path(table.path).resolve().relative_to(Path.cwd()).as_posix()
        except ValueError:  # a table outside the working folder: its own path
            source = str(table.path)
    lines += [
        "Test-split perplexity of each arm's state after the given number of training tokens, relative to the "
        f"unpatched model on the same windows. Regenerate: `attnsurgery reproduce {source}`.",
        "",
        "| arm | model | device | goal | tokens | ppl | baseline | change | met |",
        "|---|---|---|---:|---:|---:|---:|---:|:-:|",
    ]
    for name, arm in curve["arms"].items():
        for p in arm["points"]:
            met = "yes" if p["rel_pct"] <= arm["goal_pct"] else "no"
            lines.append(
                f"| {name} | {arm['model']} | {p.get('device', 'cpu')} | +{arm['goal_pct']:g}% | {p['tokens']:,} | "
                f"{p['ppl']:.3f} | "
                f"{p['baseline_ppl']:.3f} | {p['rel_pct']:+.1f}% | {met} |"
            )
    scored = [(name, p) for name, arm in curve["arms"].items() for p in arm["points"] if "ppl_w8a8" in p]
    if scored:
        lines += [
            "",
            "Simulated static W8A8 (`attnsurgery.eval.quant`, ranges calibrated with the surgeries on) for the arms "
            "that score it: the gap is W8A8 minus FP perplexity on the same test windows, and its change is against "
            "the unpatched model's gap.",
            "",
            "| arm | device | tokens | FP ppl | W8A8 ppl | W8A8 gap | baseline gap | gap change |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, p in scored:
            change = "n/a" if p["w8a8_gap_pct"] is None else f"{p['w8a8_gap_pct']:+.1f}%"
            lines.append(
                f"| {name} | {p.get('device', 'cpu')} | {p['tokens']:,} | {p['ppl']:.3f} | {p['ppl_w8a8']:,.3f} | "
                f"{p['ppl_w8a8'] - p['ppl']:,.3f} | {p['baseline_ppl_w8a8'] - p['baseline_ppl']:,.3f} | {change} |"
            )
    rows = []
    for name, arm in curve["arms"].items():
        ex = extrapolate(arm["points"], arm["goal_pct"])
        if ex is None:
            continue
        if ex["tokens_to_goal"] == 0:
            where = "met"
        elif ex["tokens_to_goal"] is None:
            where = "not falling: more of the same training will not reach it"
        else:
            hours = f"{ex['hours_to_goal']:,.0f} h" if ex["hours_to_goal"] is not None else "?"
            where = f"~{ex['tokens_to_goal']:,.0f} tokens (~{hours} at this machine's rate)"
        rate = f"{ex['tokens_per_second']:.0f} ({ex['rate_from']})" if ex["tokens_per_second"] else "?"
        fit = ", ".join(f"{t:,}" for t in ex["fit_points"])
        rows.append(f"| {name} | +{arm['goal_pct']:g}% | {fit} | x{ex['per_x4']:.2f} | {rate} | {where} |")
    if rows:
        lines += [
            "",
            "Where each curve leads: a power law in tokens fitted to its points from 20k tokens on (log-log least "
            "squares), extrapolated to the goal; the rate is the training tokens per second of the runs behind the "
            "arm's latest fitted point on this CPU: from their median step time where the runs kept step times, "
            "else from their wall time over every session (pauses and other jobs on the cores included, so it "
            "reads slow). An extrapolation, not a promise: such curves flatten.",
            "",
            "| arm | goal | fitted on (tokens) | change per x4 tokens | tokens/s | goal reached at |",
            "|---|---:|---|---:|---:|---|",
            *rows,
        ]
    return "\n".join(lines) + "\n"


def plot_curve(curve: dict[str, Any], path: Path, title: str = "") -> Path | None:
    """Relative perplexity change against training tokens (log x; symlog y, linear below 1%, so +2% and +300% both
    read), one colour per arm, its goal as a dashed line of the same colour, each arm's latest point labelled."""
    arms = {k: v for k, v in curve["arms"].items() if v["points"]}
    if not arms:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, arm) in enumerate(arms.items()):
        c = colours[i % len(colours)]
        for device, style in (("cpu", "o-"), ("cuda", "s--")):
            points = [p for p in arm["points"] if p.get("device", "cpu") == device]
            if points:
                xs = [p["tokens"] for p in points]
                ys = [p["rel_pct"] for p in points]
                ax.plot(xs, ys, style, color=c, label=f"{name} ({arm['model']}, {device})")
                ax.annotate(
                    f"{ys[-1]:+.1f}%",
                    (xs[-1], ys[-1]),
                    textcoords="offset points",
                    xytext=(6, 4),
                    fontsize=7,
                    color=c,
                )
        ax.axhline(arm["goal_pct"], color=c, ls="--", lw=1, alpha=0.8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    tokens = [p["tokens"] for arm in arms.values() for p in arm["points"]]
    ax.set_xlim(min(tokens) / 1.5, max(tokens) * 2.5)  # room for the last point's label
    values = [p["rel_pct"] for arm in arms.values() for p in arm["points"]] + [
        a["goal_pct"] for a in arms.values()
    ]
    ax.set_yscale("symlog", linthresh=1)
    # percent ticks at 1-2-5 steps, as far as the data reach (a symlog axis labels only its decades by itself)
    steps = [m * 10**e for e in range(5) for m in (1, 2, 5)]
    ticks = [0.0] + [t for t in steps if t <= max(values) * 2] + [-t for t in steps if -t >= min(values) * 2]
    ax.yaxis.set_major_locator(FixedLocator(sorted(ticks)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+g}%" if v else "0"))
    low = min(values)
    ax.set_ylim(bottom=low * 2 if low < 0 else 0.0, top=max(values) * 2)  # no empty negative half
    ax.set_xlabel("training tokens")
    ax.set_ylabel("test perplexity vs unpatched (%)")
    ax.set_title(title or "budget curves", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title="dashed: each arm's goal", title_fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
