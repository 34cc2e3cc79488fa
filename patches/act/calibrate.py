"""ACT head calibration: the paper's single-head sweep on multiple-choice calibration data.

:func:`calibrate_act_heads` applies ACT to one head at a time, scores every head on multiple-choice calibration
records (:mod:`attnsurgery.eval.scoring`) and keeps the heads that help beyond noise (:mod:`.selection`);
:func:`write_act_recipe` turns the selection into a recipe. The sweep is resumable (``state_path``, :mod:`.state`)
and has an exact fast mode (:mod:`.sweep`). ``attnsurgery calibrate act`` is :func:`add_arguments` + :func:`run`;
:func:`auto_recipe` is what ``attnsurgery apply --recipe act MODEL`` runs for a model without a recipe (the shipped
``act/smollm2-135m`` sweep's data and settings; :mod:`.auto`).

>>> from attnsurgery.patches.act.calibrate import calibrate_act_heads, write_act_recipe
>>> result = calibrate_act_heads(model, tokenizer, load_split("bb_general_knowledge", "calibration"))
>>> write_act_recipe(result, "recipes/act/my-model.yaml", "my-model")
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from attnsurgery.discovery import discover
from attnsurgery.errors import AttnSurgeryError
from attnsurgery.eval.scoring import (
    METRICS,
    ChoiceScorer,
    check_choice_records,
    choice_lls,
    record_scores,
)
from attnsurgery.recipe import write_calibrated_recipe
from attnsurgery.targeting import LayerHeads, compact_ranges, resolve_targets

from .config import ActConfig
from .selection import NOTHING_KEPT, SELECTION_RULES, CalibrationResult, check_selection, plot_head_sweep
from .state import StateFile, model_fingerprint
from .sweep import sweep_fast, sweep_slow

if TYPE_CHECKING:
    from attnsurgery.plugins import CalibrateTools

    from .auto import AutoSettings


# ----------------------------------------------------------------------------------------------------------
# ACT head calibration
# ----------------------------------------------------------------------------------------------------------


def _act_args(beta: float, threshold: float | None, alpha: float | None) -> dict[str, Any]:
    """Validated ACT arguments as a recipe writes them (the effective threshold made explicit)."""
    config = ActConfig.from_kwargs(
        "act",
        {k: v for k, v in {"beta": beta, "threshold": threshold, "alpha": alpha}.items() if v is not None},
    )
    if config.alpha is not None:
        return {"beta": config.beta, "alpha": config.alpha}
    return {"beta": config.beta, "threshold": config.absolute_threshold}


def calibrate_act_heads(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    beta: float = 0.4,
    threshold: float | None = None,
    alpha: float | None = None,
    layers: Any = None,
    heads: Any = None,
    fast: bool = True,
    batch_size: int = 16,
    head_batch: int | None = None,
    max_length: int | None = None,
    metric: str = "choice_logprob",
    min_delta: float = 0.0,
    confidence: float = 0.95,
    rule: str = "bootstrap",
    n_boot: int = 2000,
    state_path: str | Path | None = None,
    progress: bool = True,
    data: str | None = None,
) -> CalibrationResult:
    """The ACT paper's offline head sweep: ACT on one (layer, head) at a time, keep the heads that help.

    **Scoring.** Every choice of every record is scored by its summed continuation log-likelihood (lm-eval's
    ``loglikelihood``: context and continuation encoded separately, trailing context whitespace moved to the
    continuation; right-padded batches). The per-record score is ``metric``:

    * ``choice_logprob`` (default): ``log softmax(choice lls)[gold]``, the log-probability the model gives the
      right answer among the choices. Unlike accuracy it moves when a head shifts confidence without flipping an
      argmax, so on ~50 records it separates helpful from harmful heads where accuracy deltas are mostly 0 or
      +-1/50; it is a proper scoring rule, so it cannot be gamed by overconfidence, and a gain in it is a gain in
      the probability of the gold answer, which is what accuracy thresholds. Accuracy is reported beside it.
    * ``acc`` (the paper's criterion) and ``margin`` (``ll[gold] - max other``) are available.

    **Selection.** A head is kept when its mean per-record delta over the baseline exceeds ``min_delta`` *and* a
    paired bootstrap over records (``n_boot`` resamples, fixed seed) finds a positive mean delta in at least
    ``confidence`` of resamples. Sweeping 270 heads, ~(1 - confidence) x heads pass by chance even if none helps
    (the summary prints that number); the paper's rule (any accuracy gain) has no such guard. ``rule="fdr"``
    controls the false discovery rate over all swept heads instead (Benjamini-Hochberg at ``1 - confidence``).
    Re-select without rerunning via ``result.select(...)``; :meth:`CalibrationResult.score_selection` scores the
    kept heads together.

    **ACT detection** uses every query token of the input, including the choice tokens, so each choice sees a
    slightly different sink set: the paper's behaviour (it scores prompts in one forward). Inputs are fed
    without their last token, as lm-eval does.

    **Fast mode** (default) is exact, not an approximation: ACT on layer ``l`` leaves layers below ``l``
    untouched, so the hidden states entering layer ``l`` are computed once per batch and only layers ``l..L-1``
    run per head; and the batch is stacked once per head of the layer with copy ``j`` applying ACT on head ``j``
    only. The first batch of each layer carries one extra copy with no ACT, checked against the baseline, so a
    decoder the cache shortcut does not fit fails loudly instead of scoring wrongly. ``fast=False`` patches one
    head at a time and runs the full model (the reference procedure; same scores to float rounding).

    **Resuming.** With ``state_path`` the baseline and every finished head are appended to a JSON-lines file as
    they finish; running again with the same model weights, data, tokenizer and ACT arguments skips them, and a
    different fingerprint is refused. ``layers``/``heads`` may differ between runs (the sweep just grows).

    ``layers``/``heads`` choose the heads to sweep with the usual targeting (the paper sweeps layers 2..30 of 32:
    ``layers="2:-1"``); ``beta``/``threshold``/``alpha`` are ACT's own (validated like ``patch``). ``batch_size``
    sequences per forward; ``head_batch`` heads stacked per forward in fast mode (default: all heads of a layer).
    The model is scored as it is: surgeries already on it stay active during the sweep.
    """
    started = time.perf_counter()
    act_args = _act_args(beta, threshold, alpha)
    check_selection(metric, min_delta, confidence, rule)
    check_choice_records(records)
    info = discover(model)
    targets: LayerHeads = resolve_targets(layers, heads, info.num_layers, info.num_heads)
    pairs = [
        (layer, h)
        for layer in sorted(targets.layers)
        for h in (targets.heads_of(layer) or range(info.num_heads))
    ]
    if not pairs:
        raise AttnSurgeryError(f"layers={layers!r}, heads={heads!r} select no head to calibrate.")
    if head_batch is not None and head_batch < 1:
        raise AttnSurgeryError(f"head_batch must be at least 1, got {head_batch}.")
    scorer = ChoiceScorer(tokenizer, records, batch_size, max_length)
    fingerprint = {
        "model": model_fingerprint(model),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "data": scorer.digest(),
        "n_records": scorer.n_records,
        "act": act_args,
    }
    state = StateFile(state_path, fingerprint)
    todo = [p for p in pairs if p not in state.heads]

    from tqdm import tqdm

    bar = tqdm(
        total=len(todo) + (state.baseline is None),
        disable=not progress or not todo and state.baseline is not None,
        desc="ACT calibration",
        unit="head",
        bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} heads [{elapsed}<{remaining}{postfix}]",
    )
    was_training = model.training
    model.eval()
    try:
        if state.baseline is None:
            bar.set_description("ACT calibration: baseline")
            state.add_baseline(scorer.per_record(choice_lls(model, scorer, bar.update)))
        base_scores = record_scores(state.baseline, scorer.golds, metric)
        best = [-math.inf]

        def done(layer: int, head: int, values: torch.Tensor, seconds: float) -> None:
            ll = scorer.per_record(values)
            state.add_head(layer, head, ll, seconds)
            delta = float((record_scores(ll, scorer.golds, metric) - base_scores).mean())
            if delta > best[0]:
                best[0] = delta
                bar.set_postfix_str(f"best L{layer} H{head} {delta:+.4f}", refresh=False)

        if todo:
            sweep = sweep_fast if fast else sweep_slow
            sweep(model, scorer, todo, act_args, head_batch or info.num_heads, state.baseline, bar, done)
    finally:
        bar.close()
        model.train(was_training)
    return CalibrationResult(
        act_args=act_args,
        num_layers=info.num_layers,
        num_heads=info.num_heads,
        golds=scorer.golds,
        baseline_ll=state.baseline,
        head_ll={p: state.heads[p] for p in pairs},
        metric=metric,
        min_delta=min_delta,
        confidence=confidence,
        rule=rule,
        n_boot=n_boot,
        model_name=fingerprint["model"]["name"],
        data=data,
        fast=fast,
        seconds=time.perf_counter() - started,
        fingerprint=fingerprint,
    )


# ----------------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------------


def write_act_recipe(
    result: CalibrationResult,
    path: str | Path,
    model_alias: str,
    *,
    name: str | None = None,
    description: str | None = None,
    data: str | None = None,
    notes: str | None = None,
    eval_tasks: Sequence[str] | None = None,
    heads: Mapping[int, Sequence[int]] | None = None,
) -> Path:
    """Write an ``act`` recipe (the schema of ``recipes/act/llama2-7b-chat.yaml``) for the selected heads.

    ``calibration:`` records the data, record count, metric, selection rule, the baseline and each swept head's
    delta (``scores: {layer: [delta per head]}``, null for heads not swept). Loads with
    ``patch(model, path)`` / ``find_recipe``; save it as ``recipes/act/<model_alias>.yaml`` to ship it (then
    ``patch(model, "act")`` picks it for that model alias via ``find_recipe("act", model=...)``).
    """
    heads = {
        int(k): sorted(int(h) for h in v) for k, v in (result.heads if heads is None else heads).items() if v
    }
    if not heads:
        raise AttnSurgeryError(NOTHING_KEPT.format(n=len(result.head_ll)))
    table = result.table()
    scores: dict[int, list[float | None]] = {}
    for row in table:
        scores.setdefault(row.layer, [None] * result.num_heads)[row.head] = round(row.delta, 5)
    n_pairs = sum(len(v) for v in heads.values())
    data_name = data or result.data or "unspecified"
    calibration: dict[str, Any] = {
        "data": data_name,
        "n": result.n_records,
        "metric": result.metric,
        "selection": {
            "rule": (
                "mean delta > min_delta and Benjamini-Hochberg (paired z-test p-values) at FDR 1 - confidence"
                if result.rule == "fdr"
                else "mean delta > min_delta and paired-bootstrap P(mean delta > 0) >= confidence"
            ),
            "min_delta": result.min_delta,
            "confidence": result.confidence,
            "n_boot": result.n_boot,
        },
        "baseline": {"score": round(result.baseline_score(), 5), "acc": round(result.baseline_acc, 5)},
        "swept": len(table),
        "kept": n_pairs,
        "scores": scores,
    }
    c = result.combined()
    if c and result.combined_heads == heads:
        calibration["together"] = {
            k: round(c[k], 5) for k in ("score", "delta", "stderr", "p_improve", "acc")
        }
    return write_calibrated_recipe(
        path,
        model_alias,
        {"surgery": "act", "args": dict(result.act_args), "layers": sorted(heads), "heads": heads},
        calibration,
        name=name,
        description=description
        or f"ACT on {model_alias} with {n_pairs} calibrated heads (layers {compact_ranges(sorted(heads))}), "
        + ", ".join(f"{k} {v:g}" for k, v in result.act_args.items())
        + ".",
        notes=notes
        or (
            f"Heads from `attnsurgery calibrate act` on {data_name} ({result.n_records} records): ACT on one head "
            f"at a time, per-record {result.metric} delta over the unpatched model; `scores` lists every swept "
            "head's mean delta (per layer, by head index)."
        ),
        eval_tasks=eval_tasks,
    )


# ----------------------------------------------------------------------------------------------------------
# ``attnsurgery calibrate act``
# ----------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``attnsurgery calibrate act`` (the CLI adds MODEL, --dtype and --device-map)."""
    parser.add_argument("--data", action="append", help="offline task(s) (their calibration split) or .jsonl")
    parser.add_argument(
        "--beta", type=float, default=0.4, help="ACT beta (default 0.4, the reference code's)"
    )
    parser.add_argument("--threshold", type=float, default=None, help="absolute sink threshold (default 0.1)")
    parser.add_argument("--alpha", type=float, default=None, help="sink threshold as alpha / N instead")
    parser.add_argument("--layers", default=None, help="layers to sweep, e.g. 2:-1 (default all)")
    parser.add_argument("--heads", default=None, help="heads to sweep, e.g. '[0, 3]' or '{10: [0, 3]}'")
    parser.add_argument("--slow", action="store_true", help="full forward per head (the reference procedure)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default 16)")
    parser.add_argument(
        "--head-batch", type=int, default=None, help="heads stacked per forward (default all)"
    )
    parser.add_argument("--max-length", type=int, default=None, help="truncate sequences from the left")
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="choice_logprob",
        help="per-record score",
    )
    parser.add_argument(
        "--min-delta", type=float, default=0.0, help="keep heads whose mean delta exceeds this"
    )
    parser.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="bootstrap P(delta > 0) needed to keep (--rule fdr: false discovery rate 1 - confidence)",
    )
    parser.add_argument(
        "--rule",
        choices=SELECTION_RULES,
        default="bootstrap",
        help="per-head bootstrap test, or Benjamini-Hochberg over all swept heads (default bootstrap)",
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N calibration records")
    parser.add_argument("--state", default=None, help="JSON-lines state file: resume an interrupted sweep")
    parser.add_argument("--out", default=None, help="write the recipe YAML here")
    parser.add_argument("--plot", default=None, help="save a layer x head heatmap of the deltas (PNG) here")


def run(args: argparse.Namespace, tools: CalibrateTools) -> int:
    """Sweep, print the summary, and optionally plot (--plot) and write the recipe (--out)."""
    import yaml

    _act_args(args.beta, args.threshold, args.alpha)  # a bad --beta costs a second, not a model load
    records, data = tools.records(args.data, args.limit, "multiple_choice")
    kwargs = {
        "beta": args.beta,
        "threshold": args.threshold,
        "alpha": args.alpha,
        "layers": args.layers,
        "heads": yaml.safe_load(args.heads) if args.heads else None,
        "fast": not args.slow,
        "batch_size": args.batch_size,
        "head_batch": args.head_batch,
        "max_length": args.max_length,
        "metric": args.metric,
        "min_delta": args.min_delta,
        "confidence": args.confidence,
        "rule": args.rule,
        "state_path": args.state,
    }
    model, tokenizer = tools.load(args.model)
    result = calibrate_act_heads(model, tokenizer, records, data=data, **kwargs)
    if result.heads:  # one more pass: do the kept heads help together, not just one at a time?
        result.score_selection(
            model, tokenizer, records, batch_size=args.batch_size, max_length=args.max_length
        )
    tools.console.print(result.summary())
    if args.plot:
        tools.console.print(f"saved {plot_head_sweep(result, args.plot, label=args.model)}")
    if args.out:
        tools.wrote_recipe(write_act_recipe(result, args.out, args.model, data=data), args.model)
    return 0


# ----------------------------------------------------------------------------------------------------------
# On demand: ``attnsurgery apply --recipe act MODEL`` for a model without a recipe (the code is in auto.py)
# ----------------------------------------------------------------------------------------------------------


def auto_recipe(
    model: nn.Module,
    tokenizer: Any,
    model_name: str,
    path: str | Path,
    tools: CalibrateTools,
    settings: AutoSettings | None = None,
) -> Path:
    """The plugin hook behind ``attnsurgery apply --recipe act MODEL`` for a model without a recipe:
    :func:`.auto.auto_recipe` (imported here on use, since that module builds on this one)."""
    from .auto import auto_recipe as calibrate_on_demand

    return calibrate_on_demand(model, tokenizer, model_name, path, tools, settings)
