"""How a training table reads: ``table.md`` (:func:`render_training_table`: each arm's measures with the relative
change against its model's baseline, and the goals each arm meets) and the validation curves of the trained arms
(:func:`plot_validation_curves`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .training_table_def import OOD_TASKS, TrainingTable


def plot_validation_curves(runs: Path, arms: list[dict], out: Path, title: str = "") -> Path | None:
    """One panel per validation term (``objective``, ``lm``, each penalty: what ``training.json`` recorded on the
    held-back calibration slice), one line per trained arm over its steps; ``None`` when no arm has a finished run.
    The curves show *when* a run changed (a collapse, a plateau), which the table's end-of-run scores cannot."""
    curves = {}
    for arm in arms:
        path = runs / arm["name"] / "training.json"
        if path.is_file():
            history = json.loads(path.read_text()).get("validation") or []
            if len(history) > 1:
                curves[arm["name"]] = history
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    terms = []  # in first-seen order; ppl repeats lm
    for history in curves.values():
        terms += [k for k in history[0] if k not in ("step", "ppl") and k not in terms]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.6 * len(terms) + 2.4, 3.2), squeeze=False)
    palette = plt.get_cmap("tab10")
    # one colour and line style per arm in every panel: ten colours, solid, then dashed, then dotted
    style = {
        name: dict(color=palette(i % 10), ls=("-", "--", ":")[i // 10 % 3]) for i, name in enumerate(curves)
    }
    for ax, term in zip(axes[0], terms):
        for name, history in curves.items():
            points = [(h["step"], h[term]) for h in history if term in h]
            if points:
                ax.plot(*zip(*points), marker=".", lw=1, **style[name])
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    handles = [plt.Line2D([], [], marker=".", lw=1, **style[name]) for name in curves]
    axes[0][-1].legend(handles, list(curves), fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{title}: validation on the held-back calibration slice", fontsize=9)
    return save_figure(fig, out, dpi=110)


def _rel(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0 or not math.isfinite(value):
        return ""
    return f" ({(value - base) / abs(base) * 100:+.0f}%)"


#: table columns: (header, row key, format, relative change vs baseline), shown when the row has the key
_COLUMNS = (
    ("FP ppl", "ppl_fp", "{:.3f}", True),
    ("OOD ppl", "ppl_ood", "{:.3f}", True),
    ("W8A8 ppl", "ppl_w8a8", "{:.1f}", False),
    ("W8A8 gap", "w8a8_gap", "{:.1f}", True),
    ("max kurtosis", "max_kurtosis", "{:.0f}", True),
    ("max inf-norm", "max_inf_norm", "{:.0f}", True),
    ("first-token share (L>=2)", "sink_share", "{:.3f}", True),
)


#: a goal on a column's change against the baseline: "-50% relative" (at most -50%), "within +2%" (at most +2%)
_GOAL = re.compile(r"^\s*(within\s+)?([+-]\d+(?:\.\d+)?)%(\s+relative)?\s*$")


def _goal_checks(table: TrainingTable) -> list[tuple[str, str, float]]:
    """(goal name, row key, largest allowed relative change in %) for each goal that names a column and reads as
    a relative bound; other goals (free text) are shown but not checked."""
    checks = []
    for name, text in table.goals.items():
        column = next((c for c in _COLUMNS if c[0].lower().startswith(str(name).lower())), None)
        match = _GOAL.match(str(text))
        if column is not None and match:
            checks.append((str(name), column[1], float(match.group(2))))
    return checks


def _goals_met(row: dict, base: dict, checks: list[tuple[str, str, float]]) -> str:
    met = 0
    for _, key, bound in checks:
        value, ref = row.get(key), base.get(key)
        if value is None or not ref or not math.isfinite(value):
            return ""
        met += (value - ref) / abs(ref) * 100 <= bound
    return f"{met}/{len(checks)}"


def render_training_table(results: dict, table: TrainingTable) -> str:
    rows = results["rows"]
    columns = [c for c in _COLUMNS if any(c[1] in r for r in rows)]
    checks = _goal_checks(table)
    lines = [
        f"# {table.name}",
        "",
        table.description.strip(),
        "",
        f"Test split of `{table.data}` ({rows[0]['test_windows'] if rows else 0} windows of "
        f"{table.seq_len} tokens; no arm trains on it). Relative changes are against the model's baseline arm.",
        *(
            [
                "",
                "OOD ppl: another domain than the training corpus -- the test prompts of the offline "
                f"multiple-choice tasks ({', '.join(OOD_TASKS)}) with their gold answers "
                f"({table.eval['ood_windows']} windows; no arm trains on them).",
            ]
            if any("ppl_ood" in r for r in rows)
            else []
        ),
        "",
        "| model | arm | "
        + " | ".join(c[0] for c in columns)
        + " | train steps / tokens / min |"
        + (" goals met |" if checks else ""),
        "|---|---|" + "---:|" * len(columns) + "---:|" + ("---:|" if checks else ""),
    ]
    base = {r["model"]: r for r in rows if r["arm"] == "baseline"}
    met = {
        (r["model"], r["arm"]): _goals_met(r, base.get(r["model"], {}), checks)
        for r in rows
        if checks and r["arm"] != "baseline"
    }
    for r in rows:
        b = base.get(r["model"], {})
        cells = []
        for _, key, fmt, rel in columns:
            value = r.get(key)
            text = "" if value is None else fmt.format(value)
            cells.append(text + (_rel(value, b.get(key)) if rel and value is not None else ""))
        lines.append(
            f"| {r['model']} | {r['arm']} | " + " | ".join(cells) + " | "
            f"{r['train_steps']} / {r['train_tokens']:,} / {r['train_minutes']} |"
            + (f" {met.get((r['model'], r['arm']), '')} |" if checks else "")
        )
    if table.tasks:
        lines += [
            "",
            f"Offline tasks ({', '.join(table.tasks)}), every arm on the same documents: `tasks.md` (written once "
            "every arm of a model is trained and scored; absent while that step has not run).",
        ]
    if table.goals:
        lines += ["", "Goals: " + "; ".join(f"{k}: {v}" for k, v in table.goals.items())]
        if checks:
            everything = f"{len(checks)}/{len(checks)}"
            for model in dict.fromkeys(r["model"] for r in rows):
                winners = [arm for (m, arm), got in met.items() if m == model and got == everything]
                lines.append(
                    f"- {model}: every goal met by {', '.join(winners)}"
                    if winners
                    else f"- {model}: no arm meets every goal"
                )
    return "\n".join(lines) + "\n"
