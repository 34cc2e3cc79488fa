"""Baseline vs patched, scored by lm-evaluation-harness, side by side.

:func:`evaluate_arms` runs one model under several *arms* (the unpatched baseline and one per recipe) on the
same tasks and the same examples, and returns an :class:`EvalReport`: per metric the value and stderr of each
arm, the delta against the baseline and a *paired* significance estimate (the arms saw identical docs, so the
per-doc differences are what carries the signal; an unpaired comparison of two stderrs is far too cautious).

Every finished arm is cached as JSON keyed by a fingerprint of everything that changes its numbers (model,
recipe content and state file, tasks, shots, limit, dtype, quantisation, library versions), so a re-run skips it. ``quant="w8a8"`` scores every arm (the baseline too) under simulated static
W8A8 (:func:`.quant.quantize_w8a8`), its activation ranges calibrated with the arm's surgery active;
``quant="int8"`` loads the model through bitsandbytes LLM.int8 for all arms. Results are
checked for NaN/inf logits and degenerate choices (all log-likelihoods tied, which lm-eval silently scores as
"first choice") and such arms are marked INVALID in every table.

:func:`reproduce` runs a table definition (``evals/*.yaml``: models x arms x tasks, optional published numbers
to print beside ours; :mod:`.text_tables`) and writes JSON, markdown and a PNG bar chart with error bars
(:mod:`.report`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AttnSurgeryError, RecipeError, did_you_mean
from ..recipe import Recipe, find_recipe
from .report import Panel, Table, p_label, plot_panels, write_files

CACHE_FORMAT = 1
# Per-doc values of these metrics are (log-likelihood, weight) pairs aggregated over the whole corpus.
_WEIGHTED = {
    "word_perplexity": lambda ll, w: math.exp(-ll / w),
    "byte_perplexity": lambda ll, w: math.exp(-ll / w),
    "bits_per_byte": lambda ll, w: -ll / w / math.log(2),
}
_LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"}

#: ``quant=`` values: simulated static W8A8 after each arm's surgery, or bitsandbytes LLM.int8 for every arm
QUANT_CHOICES = ("w8a8", "int8")
#: what ``quant="w8a8"`` calibrates its activation ranges on, per arm with the arm's surgery active: the first
#: windows of an offline task's *calibration* split (never a split the tables report), in small batches
W8A8_CALIBRATION = {"data": "gutenberg_ppl", "windows": 8, "seq_len": 256, "batch_size": 2}
INT8_THRESHOLD = 6.0


class EvalError(AttnSurgeryError):
    """Bad evaluation input: unknown task or metric, malformed table definition, missing data."""


# --------------------------------------------------------------------------------------------------- arms
@dataclass
class Arm:
    """One column of a table: ``recipe=None`` is the unpatched baseline."""

    name: str
    recipe: Recipe | None = None

    def fingerprint(self) -> Any:
        if self.recipe is None:
            return None
        specs = []
        for spec in self.recipe.surgeries:
            state = None
            if spec.state is not None:
                state = hashlib.sha256(Path(spec.state).read_bytes()).hexdigest()
            specs.append([spec.surgery, spec.args, _jsonable(spec.layers), _jsonable(spec.heads), state])
        return specs


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def arm_mappings(arms: Any, fail: Callable[[str], Exception]) -> Iterator[dict[str, Any]]:
    """Each entry of a table's ``arms:`` as a mapping with a ``name`` (the shorthands ``- baseline`` and
    ``- <recipe>`` expanded), checked as it is reached; ``fail(problem)`` builds the error to raise."""
    if not isinstance(arms, list) or not arms:
        raise fail("`arms` must be a non-empty list; start with `- name: baseline`.")
    for i, arm in enumerate(arms):
        if isinstance(arm, str):
            arm = {"name": arm} if arm == "baseline" else {"name": arm, "recipe": arm}
        if not isinstance(arm, dict) or "name" not in arm:
            raise fail(f"arm #{i + 1} must be a mapping with `name` (and `recipe` unless baseline).")
        yield arm


def make_arms(recipes: Sequence[str | Recipe], model: str | None = None, baseline: bool = True) -> list[Arm]:
    """Arms for a baseline plus each recipe (names, YAML paths or :class:`Recipe`); names must be unique."""
    arms = [Arm("baseline")] if baseline else []
    for item in recipes:
        recipe = item if isinstance(item, Recipe) else find_recipe(item, model=model)
        arms.append(Arm(recipe.name, recipe))
    names = [a.name for a in arms]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise RecipeError(f"two arms are both called {sorted(dupes)}: give each recipe its own `name:`.")
    return arms


# ------------------------------------------------------------------------------------------------ results
@dataclass
class ArmResult:
    arm: str
    metrics: dict[str, dict[str, float | None]]  # task -> {metric: value, metric_stderr: value}
    per_doc: dict[str, dict[str, dict[str, Any]]]  # task -> doc_id -> {metric: value | [ll, weight]}
    n_docs: dict[str, int]
    valid: bool = True
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    fingerprint: str = ""
    lm_eval: dict[str, Any] = field(default_factory=dict)  # lm-eval's own results/configs/versions
    quant: dict[str, Any] = field(default_factory=dict)  # what quantisation this arm ran under ({}: none)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArmResult:
        return cls(**data)


def _metric_items(task_results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm-eval's ``{"acc,none": .5, "acc_stderr,none": .1}`` -> ``{"acc": {"value": .5, "stderr": .1}}``."""
    out: dict[str, dict[str, float | None]] = {}
    for key, value in task_results.items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric} ({filt})"
        stderr = task_results.get(f"{metric}_stderr,{filt}")
        out[name] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
        }
    return out


def _arm_from_lm_eval(arm: Arm, raw: dict[str, Any], lm: Any, seconds: float, fp: str) -> ArmResult:
    from .lmeval import degenerate_fraction

    metrics: dict[str, dict[str, float | None]] = {}
    per_doc: dict[str, dict[str, dict[str, Any]]] = {}
    n_docs: dict[str, int] = {}
    problems: list[str] = []
    for task, task_results in raw["results"].items():
        items = _metric_items(task_results)
        metrics[task] = {}
        for name, item in items.items():
            metrics[task][name] = item["value"]
            metrics[task][f"{name}_stderr"] = item["stderr"]
            if not math.isfinite(item["value"]):
                problems.append(f"{task}: {name} is {item['value']}")
        samples = raw.get("samples", {}).get(task, [])
        n_docs[task] = len(samples)
        docs: dict[str, dict[str, Any]] = {}
        for sample in samples:
            values = {}
            for metric in items:
                v = sample.get(metric.split(" (")[0])
                if isinstance(v, (int, float, bool)):
                    values[metric] = float(v)
                elif isinstance(v, (list, tuple)) and len(v) == 2:
                    values[metric] = [float(v[0]), float(v[1])]
            resps = sample.get("filtered_resps") or []
            if len(resps) > 1 and all(isinstance(r, (list, tuple)) and r for r in resps):
                # the choices' log-likelihoods: what an arm actually changed, even when no argmax flipped
                values["_choice_lls"] = [float(r[0]) for r in resps]
            docs[str(sample["doc_id"])] = values
        per_doc[task] = docs
        frac = degenerate_fraction(samples)
        if frac is not None and frac > 0.5:
            problems.append(
                f"{task}: {frac:.0%} of docs have all choice log-likelihoods tied or non-finite "
                "(lm-eval scores those as the first choice)"
            )
    if not lm.outputs_finite:
        problems.append(f"NaN/inf logits in {lm.nonfinite_batches} of {lm.forward_batches} forward batches")
    keep = {k: raw[k] for k in ("results", "configs", "versions", "n-shot", "higher_is_better") if k in raw}
    return ArmResult(
        arm=arm.name,
        metrics=metrics,
        per_doc=per_doc,
        n_docs=n_docs,
        valid=not problems,
        problems=problems,
        seconds=seconds,
        fingerprint=fp,
        lm_eval=json.loads(json.dumps(keep, default=str)),
    )


# ------------------------------------------------------------------------------------------ paired stats
def _aggregate(metric: str, values: list[Any]) -> float:
    base = metric.split(" (")[0]
    if values and isinstance(values[0], list):
        ll = sum(v[0] for v in values)
        w = sum(v[1] for v in values)
        fn = _WEIGHTED.get(base)
        if fn is None or w == 0:
            return float("nan")
        return fn(ll, w)
    return sum(values) / len(values) if values else float("nan")


def paired_delta(
    metric: str, base: dict[str, Any], other: dict[str, Any], iters: int = 2000
) -> dict[str, Any]:
    """Delta of ``other`` vs ``base`` over the docs both scored, with a paired standard error and p-value.

    Per-doc metrics (accuracy, exact match): the mean of per-doc differences, its standard error and a
    normal-approximation two-sided p-value. Corpus metrics (perplexities, bits per byte) are ratios of sums, so
    their delta gets a paired bootstrap over docs (fixed seed; ``iters`` resamples).
    """
    import numpy as np

    docs = sorted(set(base) & set(other), key=lambda d: (len(d), d))
    a = [base[d] for d in docs if metric in base[d] and metric in other[d]]
    b = [other[d] for d in docs if metric in base[d] and metric in other[d]]
    a_vals = [x[metric] for x in a]
    b_vals = [x[metric] for x in b]
    n = len(a_vals)
    if n == 0:
        return {"delta": None, "delta_stderr": None, "p": None, "n": 0}
    delta = _aggregate(metric, b_vals) - _aggregate(metric, a_vals)
    if isinstance(a_vals[0], list):
        rng = np.random.default_rng(0)
        A = np.asarray(a_vals, dtype=np.float64)
        B = np.asarray(b_vals, dtype=np.float64)
        idx = rng.integers(0, n, size=(iters, n))
        fn = _WEIGHTED[metric.split(" (")[0]]
        deltas = np.array([fn(B[i, 0].sum(), B[i, 1].sum()) - fn(A[i, 0].sum(), A[i, 1].sum()) for i in idx])
        se = float(deltas.std(ddof=1)) if n > 1 else None
        # resolution of a bootstrap p-value is 1/iters: never report 0
        p = float(min(1.0, max(2 * min((deltas <= 0).mean(), (deltas >= 0).mean()), 1.0 / iters)))
        return {"delta": delta, "delta_stderr": se, "p": p, "n": n}
    diffs = np.asarray(b_vals, dtype=np.float64) - np.asarray(a_vals, dtype=np.float64)
    se = float(diffs.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    if not se:
        p = 1.0 if abs(delta) < 1e-12 else 0.0
    else:
        p = math.erfc(abs(delta / se) / math.sqrt(2))
    return {"delta": delta, "delta_stderr": se, "p": p, "n": n}


# ---------------------------------------------------------------------------------------------- reports
@dataclass
class EvalReport:
    model: str
    tasks: list[str]
    arms: list[ArmResult]
    settings: dict[str, Any]

    @property
    def baseline(self) -> ArmResult:
        return self.arms[0]

    def rows(self) -> list[dict[str, Any]]:
        """One row per (task, metric): each arm's value and stderr, and delta/p against the first arm."""
        rows = []
        base = self.baseline
        for task in self.tasks:
            names = [m for m in base.metrics.get(task, {}) if not m.endswith("_stderr")]
            for metric in names:
                row: dict[str, Any] = {"task": task, "metric": metric, "arms": {}}
                for arm in self.arms:
                    value = arm.metrics.get(task, {}).get(metric)
                    entry = {"value": value, "stderr": arm.metrics.get(task, {}).get(f"{metric}_stderr")}
                    if arm is not base:
                        entry.update(
                            paired_delta(metric, base.per_doc.get(task, {}), arm.per_doc.get(task, {}))
                        )
                    entry["valid"] = arm.valid
                    row["arms"][arm.arm] = entry
                rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tasks": self.tasks,
            "settings": self.settings,
            "table": self.rows(),
            "arms": {
                a.arm: {
                    "valid": a.valid,
                    "problems": a.problems,
                    "seconds": a.seconds,
                    "n_docs": a.n_docs,
                    "fingerprint": a.fingerprint,
                    "lm_eval": a.lm_eval,
                }
                for a in self.arms
            },
        }

    def markdown(self, published: Sequence[dict[str, Any]] = ()) -> str:
        return render_markdown([self], published)


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
    from .report import save_figure

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


# --------------------------------------------------------------------------------------------- running
def task_manager(extra: Sequence[str | Path] = ()):
    """lm-eval's TaskManager with the offline suite, ``extra`` folders and ``$ATTNSURGERY_INCLUDE_PATH``
    (``os.pathsep``-separated folders of your own task YAMLs)."""
    from lm_eval.tasks import TaskManager

    from .lmeval import include_path

    paths = [str(p) for p in extra]
    paths += [p for p in os.environ.get("ATTNSURGERY_INCLUDE_PATH", "").split(os.pathsep) if p]
    if include_path():
        paths.append(include_path())
    for p in paths:
        if not Path(p).is_dir():
            raise EvalError(
                f"task folder {p} does not exist (from --include-path / ATTNSURGERY_INCLUDE_PATH)."
            )
    key = tuple(paths)
    if key not in _MANAGERS:  # indexing lm-eval's few thousand task YAMLs takes seconds: do it once
        _MANAGERS[key] = TaskManager(include_path=paths or None)
    return _MANAGERS[key]


_MANAGERS: dict[tuple[str, ...], Any] = {}


def load_tasks(names: list[str], manager: Any) -> dict[str, Any]:
    """lm-eval task objects by name (for their configs and metrics)."""
    if hasattr(manager, "load"):  # lm-eval >= 0.4.10
        return manager.load(names)["tasks"]
    from lm_eval.tasks import get_task_dict

    return get_task_dict(names, manager)


def check_tasks(tasks: Sequence[str], manager: Any = None) -> list[str]:
    """Expand and validate task names before any model is loaded (unknown names get "did you mean")."""
    if not tasks:
        raise EvalError(
            "no tasks given: pass --tasks (e.g. `--tasks offline` for the shipped offline suite)."
        )
    manager = manager or task_manager()
    known = set(manager.all_tasks)
    out: list[str] = []
    for name in tasks:
        if name == "offline":
            from ..tasks import offline_tasks

            out.extend(offline_tasks())
            continue
        if name not in known:
            raise EvalError(
                f"unknown lm-eval task {name!r}.{did_you_mean(name, sorted(known))} "
                "Offline tasks shipped with attnsurgery: `attnsurgery lm-eval ls tasks`; standard lm-eval tasks "
                "(hellaswag, arc_easy, mmlu, ...) need the Hugging Face Hub or a local datasets cache."
            )
        out.append(name)
    return list(dict.fromkeys(out))


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    from .. import __version__

    return {
        "attnsurgery": __version__,
        "lm_eval": version("lm_eval"),
        "transformers": version("transformers"),
    }


def quant_setting(quant: str | None) -> dict[str, Any] | None:
    """The settings a ``quant=`` choice runs with (they enter the arm fingerprint: FP and quantised results, or
    two quantisation setups, never share a cache entry); None for full precision."""
    if quant is None:
        return None
    if quant == "w8a8":
        import inspect

        from .quant import quantize_w8a8

        defaults = {
            name: p.default
            for name, p in inspect.signature(quantize_w8a8).parameters.items()
            if p.kind is p.KEYWORD_ONLY
        }
        return {"scheme": "w8a8", "calibration": dict(W8A8_CALIBRATION), "setup": defaults}
    if quant == "int8":
        return {"scheme": "int8", "threshold": INT8_THRESHOLD}
    raise EvalError(f"unknown quantisation {quant!r}; choose one of {', '.join(QUANT_CHOICES)}.")


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


def calibration_windows(tokenizer: Any, source: str, windows: int, seq_len: int) -> Any:
    """The first ``windows`` packed windows (``(N, seq_len)`` token ids) of ``source``'s texts: an offline task's
    *calibration* split (test splits are refused by :func:`attnsurgery.train.data.load_texts`) or a local file.
    Texts are tokenised only until enough windows are packed."""
    from ..train.data import load_texts
    from ..windows import pack_windows

    texts = load_texts(source)
    used = min(len(texts), 1)
    packed = pack_windows(tokenizer, texts[:used], seq_len)
    while used < len(texts) and len(packed) < windows:
        used = min(len(texts), 2 * used)
        packed = pack_windows(tokenizer, texts[:used], seq_len)
    if len(packed) == 0:
        raise EvalError(
            f"{source}: its text gives no window of {seq_len} tokens; use a shorter sequence length."
        )
    return packed[:windows]


def _w8a8_batches(model: Any, tokenizer: Any) -> list[Any]:
    cal = W8A8_CALIBRATION
    seq_len = min(cal["seq_len"], getattr(model.config, "max_position_embeddings", None) or cal["seq_len"])
    windows = calibration_windows(tokenizer, cal["data"], cal["windows"], seq_len)
    return list(windows.split(cal["batch_size"]))


def _fingerprint(model: str, arm: Arm, settings: dict[str, Any]) -> str:
    key = {"format": CACHE_FORMAT, "model": model, "arm": arm.fingerprint(), **settings, **_versions()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    """``text`` as a safe file name (cache entries, result folders)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


def evaluate_arms(
    model: str,
    arms: Sequence[Arm],
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    force: bool = False,
    loaded: tuple[Any, Any] | None = None,
    on_arm: Callable[[str, str], None] | None = None,
    quant: str | None = None,
) -> EvalReport:
    """Run every arm on the same docs; cached arms (same fingerprint under ``cache_dir``) are read back.

    ``loaded`` passes an already loaded ``(model, tokenizer)`` (otherwise ``model`` is loaded with
    :func:`attnsurgery.load_model` only if some arm is not cached). ``on_arm(arm_name, status)`` reports
    progress ("cached", "running", "done"). ``quant``: None (full precision), ``"w8a8"`` (simulated static
    W8A8 in every arm after its surgery, calibrated with the surgery active; :data:`W8A8_CALIBRATION`) or
    ``"int8"`` (the model loaded through bitsandbytes LLM.int8; a ``loaded`` model must already be).
    """
    if not arms or arms[0].recipe is not None:
        raise EvalError("the first arm must be the unpatched baseline (make_arms() puts it there).")
    manager = task_manager()
    tasks = check_tasks(tasks, manager)
    settings: dict[str, Any] = {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot, "dtype": dtype}
    quant_set = quant_setting(quant)
    if quant_set is not None:  # only when set, so full-precision fingerprints (and caches) stay as they were
        settings["quant"] = quant_set
    if quant == "int8" and loaded is not None and not getattr(loaded[0], "is_loaded_in_8bit", False):
        raise EvalError(
            "quant='int8' with a loaded model: load it with attnsurgery.eval.quant.load_int8 first."
        )
    cache = Path(cache_dir) / slug(model) if cache_dir else None
    results: list[ArmResult] = []
    for arm in arms:
        fp = _fingerprint(model, arm, settings)
        path = cache / f"{slug(arm.name)}-{fp}.json" if cache else None
        if path is not None and path.is_file() and not force:
            results.append(ArmResult.from_json(json.loads(path.read_text())))
            if on_arm:
                on_arm(arm.name, "cached")
            continue
        if loaded is None:
            if quant == "int8":
                from .quant import load_int8

                loaded = load_int8(model, threshold=INT8_THRESHOLD, dtype=dtype)
            else:
                from ..models import load_model

                loaded = load_model(model, dtype=dtype)
        if on_arm:
            on_arm(arm.name, "running")
        result = run_arm(
            loaded,
            arm,
            tasks,
            manager,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            quant=quant,
        )
        if quant_set is not None:
            result.quant = {**quant_set, **result.quant}
        result.fingerprint = fp
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result.to_json()))
            os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written cache entry
        results.append(result)
        if on_arm:
            on_arm(arm.name, "done")
    return EvalReport(model=model, tasks=tasks, arms=results, settings=settings)


@contextmanager
def _quiet_int8_casts() -> Iterator[None]:
    """bitsandbytes LLM.int8 logs a warning on every float32 matmul that it casts the inputs to float16 (expected
    here): silence that one message while an arm runs."""
    import logging

    log = logging.getLogger("bitsandbytes.autograd._functions")

    def keep(record: logging.LogRecord) -> bool:
        return "MatMul8bitLt" not in record.getMessage()

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def run_arm(
    loaded: tuple[Any, Any],
    arm: Arm,
    tasks: Sequence[str],
    manager: Any,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    quant: str | None = None,
) -> ArmResult:
    """One lm-eval run of ``arm`` on the loaded model; the surgery (and, with ``quant="w8a8"``, the simulated
    W8A8 calibrated on top of it) is removed again afterwards."""
    import lm_eval

    from ..api import patch
    from .lmeval import SurgeryLM

    model, tokenizer = loaded
    handle = patch(model, arm.recipe) if arm.recipe is not None else None
    quantized = None
    quant_info: dict[str, Any] = {}
    try:
        if quant == "w8a8":  # after the surgery: it changes the activations the ranges are calibrated on
            from .quant import quantize_w8a8

            batches = _w8a8_batches(model, tokenizer)
            quantized = quantize_w8a8(model, batches)
            quant_info = {
                "num_quantized_linears": len(quantized.weight_ranges),
                "num_act_quantizers": len(quantized.act_quantizers),
                "calibration_windows": int(sum(b.shape[0] for b in batches)),
                "calibration_seq_len": int(batches[0].shape[1]),
            }
        lm = SurgeryLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        start = time.perf_counter()
        with _quiet_int8_casts():
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=True,
                random_seed=0,
                numpy_random_seed=1234,
                torch_random_seed=1234,
                fewshot_random_seed=1234,
            )
        seconds = time.perf_counter() - start
    finally:
        if quantized is not None:
            quantized.remove()
        if handle is not None:
            handle.remove()
    result = _arm_from_lm_eval(arm, raw, lm, seconds, "")
    result.quant = quant_info
    return result


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
