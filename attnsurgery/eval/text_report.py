"""How a text evaluation reads: :func:`write_report` writes an :class:`~.text_results.EvalReport` as JSON, a
markdown table per model (:func:`render_markdown`), the forest plot of paired deltas (:func:`plot_forest`, the
main picture) and a bar chart of each arm's values (:func:`plot_report`), all drawn by :mod:`.report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import Panel, Table, p_label, plot_panels, save_figure, write_files
from .text_results import _LOWER_IS_BETTER, EvalError, EvalReport, paired_delta


def render_markdown(reports: Sequence[EvalReport], published: Sequence[dict[str, Any]] = ()) -> str:
    """A markdown table per model: value ± stderr per arm, then delta (paired stderr, p) per patched arm."""
    out: list[str] = []
    limits = sorted({r.settings.get("limit") for r in reports if r.settings.get("limit")})
    if limits:  # a quick look must not pass for the full table
        out += [
            f"**Limited run: {', '.join(f'{x:g}' for x in limits)} documents per task (--limit), not the full "
            "table.**",
            "",
        ]
    for report in reports:
        pub = [p for p in published if p.get("model") == report.model]
        rows = [
            (
                [row["task"], row["metric"]],
                row["arms"],
                [
                    p
                    for p in pub
                    if p.get("task") == row["task"] and p.get("metric", row["metric"]) == row["metric"]
                ],
            )
            for row in report.rows()
        ]
        out.append(f"### {report.model}\n")
        out += Table([a.arm for a in report.arms], ["task", "metric"], rows, published=bool(pub)).lines()
        n = {t: report.baseline.n_docs.get(t) for t in report.tasks}
        secs = ", ".join(f"{a.arm} {a.seconds:.0f} s" for a in report.arms)
        out.append("")
        out.append(f"docs per task: {n}; wall time: {secs}.")
        quant = report.settings.get("quant")
        if quant:
            out.append(f"\nquantisation: {describe_quant(quant)}.")
        for arm in report.arms:
            if not arm.valid:
                out.append(f"\n**{arm.arm} is INVALID**: " + "; ".join(arm.problems))
        out.append("")
    return "\n".join(out)


def _plotted_metrics(reports: Sequence[EvalReport], primary: dict[str, str] | None):
    """(report, task, metric) for each task a report scored: the table's primary metric, else the first one."""
    for report in reports:
        for task in report.tasks:
            metrics = [m for m in report.baseline.metrics.get(task, {}) if not m.endswith("_stderr")]
            if metrics:
                yield report, task, (primary or {}).get(task) or metrics[0]


def plot_forest(
    reports: Sequence[EvalReport], out: str | Path, primary: dict[str, str] | None = None
) -> Path:
    """The main picture of a report: each patched arm's paired delta against the baseline with its 95% interval
    (delta +- 1.96 paired standard errors), one row per (model, task, arm), a zero line, the baseline's value in the
    row label. Independent error bars on absolute values overlap even where the paired test is significant; the
    paired interval is the one that says whether an arm moved the score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []  # (label, delta, half-width, valid, significant, lower-is-better)
    for report, task, metric in _plotted_metrics(reports, primary):
        base_value = report.baseline.metrics.get(task, {}).get(metric)
        lower = metric.split(" (")[0] in _LOWER_IS_BETTER
        for arm in report.arms[1:]:
            d = paired_delta(metric, report.baseline.per_doc.get(task, {}), arm.per_doc.get(task, {}))
            if d["delta"] is None:
                continue
            half = 1.96 * d["delta_stderr"] if d["delta_stderr"] else 0.0
            base_text = f"{base_value:.3g}" if isinstance(base_value, (int, float)) else "?"
            label = (
                f"{report.model} · {task} · {arm.arm}\n{metric} {'↓' if lower else '↑'}, baseline {base_text}"
            )
            rows.append((label, d["delta"], half, arm.valid, (d["p"] or 1.0) < 0.05, lower))
    if not rows:
        return plot_report(reports, out, primary)  # a baseline alone: nothing paired to draw
    fig, ax = plt.subplots(figsize=(10, 0.62 * len(rows) + 1.6))
    for y, (_, delta, half, valid, significant, lower) in enumerate(reversed(rows)):
        better = (delta < 0) if lower else (delta > 0)
        color = "0.55" if not significant else ("tab:green" if better else "tab:red")
        ax.errorbar(delta, y, xerr=half, fmt="o", color=color, capsize=4, alpha=1.0 if valid else 0.35)
        if not valid:
            ax.annotate(
                "INVALID", (delta, y), textcoords="offset points", xytext=(6, 6), fontsize=7, color="red"
            )
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=7)
    ax.set_xlabel(
        "paired delta vs baseline, 95% interval\n(green: better, red: worse, grey: p >= 0.05)", fontsize=8
    )
    limits = sorted({r.settings.get("limit") for r in reports if r.settings.get("limit")})
    if limits:
        ax.set_title(f"Limited run: {', '.join(f'{x:g}' for x in limits)} documents per task", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, out, dpi=110)


def plot_report(
    reports: Sequence[EvalReport], out: str | Path, primary: dict[str, str] | None = None
) -> Path:
    """Values with stderr error bars: one panel per (model, task), one bar per arm (points on a fitted axis for
    perplexity-like metrics, whose 0 is far off)."""
    panels = []
    for report, task, metric in _plotted_metrics(reports, primary):
        labels = []
        for arm in report.arms:
            label = arm.arm
            if arm is not report.baseline:
                # the paired delta under the name: small effects (perplexity) are invisible in bar heights
                d = paired_delta(metric, report.baseline.per_doc.get(task, {}), arm.per_doc.get(task, {}))
                if d["delta"] is not None:
                    label += f"\nΔ{d['delta']:+.3g} ({p_label(d['p'])})"
            labels.append(label)
        panels.append(
            Panel(
                title=f"{report.model}\n{task}"
                + (f" (limit {report.settings['limit']:g})" if report.settings.get("limit") else ""),
                ylabel=f"{metric} {'↓' if metric.split(' (')[0] in _LOWER_IS_BETTER else '↑'}",
                values=[a.metrics.get(task, {}).get(metric) or 0.0 for a in report.arms],
                errors=[a.metrics.get(task, {}).get(f"{metric}_stderr") or 0.0 for a in report.arms],
                valid=[a.valid for a in report.arms],
                labels=labels,
                from_zero=metric.split(" (")[0] not in _LOWER_IS_BETTER,  # perplexity: an axis fitted to it
            )
        )
    if not panels:
        raise EvalError("nothing to plot: the reports have no metrics.")
    most_arms = max(len(r.arms) for r in reports)
    # panels widen with the arm count so each bar's two-line label (name, delta and p) stays readable
    width = max(4.4, 1.45 * most_arms + 0.8)
    return plot_panels(panels, out, panel_size=(width, 3.2), title_size=8, tick_style={"fontsize": 7})


def describe_quant(setting: dict[str, Any]) -> str:
    """One line for reports: which quantisation ran."""
    if setting.get("scheme") == "w8a8":
        cal = setting.get("calibration", {})
        return (
            "w8a8 -- simulated static per-tensor W8A8 (Bondarenko et al. 2023; LM head in full precision) in "
            f"every arm after its surgery, activation ranges calibrated per arm on {cal.get('windows')} windows of "
            f"{cal.get('seq_len')} tokens of {cal.get('data')}:calibration"
        )
    if setting.get("scheme") == "int8":
        return f"int8 -- bitsandbytes LLM.int8 (threshold {setting.get('threshold')}) for every arm"
    return str(setting)


def write_report(
    reports: Sequence[EvalReport],
    out_dir: str | Path,
    published: Sequence[dict] = (),
    primary: dict[str, str] | None = None,
    name: str = "results",
    run: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """``<name>.json`` (our table plus lm-eval's results per arm; ``run``: the settings that made it), ``<name>.md``
    and ``<name>.png``."""
    payload = {"reports": [r.to_json() for r in reports], "published": list(published)}
    if run is not None:
        payload["run"] = run
    markdown = render_markdown(reports, published)
    paths = write_files(out_dir, name, payload, markdown, lambda png: plot_forest(reports, png, primary))
    # the absolute values per arm, beside the main picture
    paths["bars"] = plot_report(reports, Path(out_dir) / f"{name}-values.png", primary)
    return paths
