"""What a text evaluation produced: the arms (baseline and one per recipe), each arm's result reduced from
lm-eval's output to per-metric values and per-doc values, and the paired deltas between arms that
:class:`EvalReport` tabulates. Runs are in :mod:`.text`, rendering in :mod:`.text_report`.

The arms of one report saw identical docs, so the per-doc differences are what carries the signal
(:func:`paired_delta`); an unpaired comparison of two stderrs is far too cautious.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AttnSurgeryError, RecipeError
from ..recipe import Recipe, find_recipe

# Per-doc values of these metrics are (log-likelihood, weight) pairs aggregated over the whole corpus.
_WEIGHTED = {
    "word_perplexity": lambda ll, w: math.exp(-ll / w),
    "byte_perplexity": lambda ll, w: math.exp(-ll / w),
    "bits_per_byte": lambda ll, w: -ll / w / math.log(2),
}
_LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"}


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
        from .text_report import render_markdown

        return render_markdown([self], published)
