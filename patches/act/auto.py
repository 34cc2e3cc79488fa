"""ACT on demand: ``attnsurgery apply --recipe act MODEL`` for a model without a recipe calibrates one with the
shipped ``act/smollm2-135m`` sweep's data and settings (:class:`AutoSettings`), says what it runs and how long it
should take (:func:`estimate_sweep`), and writes the recipe (:func:`auto_recipe`). The plugin hook is
:func:`.calibrate.auto_recipe`, which hands over to this module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from attnsurgery.discovery import discover
from attnsurgery.errors import AttnSurgeryError
from attnsurgery.eval.scoring import ChoiceScorer, input_device
from attnsurgery.targeting import compact_ranges, resolve_targets

from .calibrate import calibrate_act_heads, write_act_recipe
from .selection import NOTHING_KEPT
from .state import finished_heads

if TYPE_CHECKING:
    from attnsurgery.plugins import CalibrateTools


@dataclass(frozen=True)
class AutoSettings:
    """The sweep behind ``--recipe act MODEL`` when no recipe is made for MODEL: the data and settings the shipped
    ``act/smollm2-135m`` recipe records (its ``calibration:`` block). ``layers=None`` sweeps every second layer from
    2 to L-2 as that sweep did (all layers on a model under 4 layers deep). ``ATTNSURGERY_ACT_AUTO_LIMIT`` (records)
    and ``ATTNSURGERY_ACT_AUTO_LAYERS`` (a layers spec) shrink it, for tests."""

    data: tuple[str, ...] = (
        "bb_general_knowledge",
        "bb_emoji_movie",
        "bb_similarities_abstraction",
        "bb_phrase_relatedness",
    )
    limit: int | None = None
    layers: Any = None
    beta: float = 0.4
    threshold: float = 0.1
    metric: str = "choice_logprob"
    rule: str = "bootstrap"
    confidence: float = 0.95
    min_delta: float = 0.0
    n_boot: int = 2000
    batch_size: int = 16

    @classmethod
    def from_env(cls) -> AutoSettings:
        settings = cls()
        limit = os.environ.get("ATTNSURGERY_ACT_AUTO_LIMIT")
        layers = os.environ.get("ATTNSURGERY_ACT_AUTO_LAYERS")
        if limit:
            settings = replace(settings, limit=int(limit))
        if layers:
            settings = replace(settings, layers=layers)
        return settings

    def sweep_layers(self, num_layers: int) -> Any:
        if self.layers is not None:
            return self.layers
        return list(range(2, num_layers - 1, 2)) if num_layers >= 4 else None


def _format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_sweep(
    model: nn.Module, scorer: Any, pairs: Sequence[tuple[int, int]], num_layers: int
) -> tuple[float, float, float]:
    """(seconds, batch forwards, seconds of one timed forward) of a fast sweep over ``pairs`` plus its baseline
    and the kept heads' joint pass. One forward of the first (longest) batch is timed; a head on layer ``l`` costs
    about ``(L - l) / L`` of a batch forward per batch (fast mode runs layers ``l..L-1`` on one stacked copy per
    head), the baseline, the cache moves and the joint pass one full forward per batch each."""
    batch = scorer.batches[0]
    device = input_device(model)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    with torch.no_grad():
        model(input_ids=ids[:1, :8], attention_mask=mask[:1, :8], use_cache=False)  # warm-up, not timed
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        one = time.perf_counter() - t0
    n_batches = len(scorer.batches)
    forwards = n_batches * (3 + sum((num_layers - layer) / num_layers for layer, _ in pairs))
    return one * forwards, forwards, one


def auto_recipe(
    model: nn.Module,
    tokenizer: Any,
    model_name: str,
    path: str | Path,
    tools: CalibrateTools,
    settings: AutoSettings | None = None,
) -> Path:
    """Calibrate ACT heads for ``model`` with :class:`AutoSettings` (fast sweep, resumable through
    ``<path>.state.jsonl``), write the recipe to ``path`` and return it. Says what it does and estimates the time
    first; the sweep shows progress on stderr. An interrupt (Ctrl-C) keeps the state file, so the same command
    resumes. When no head passes the selection, the recipe written has no heads (the identity) and says so: ACT on
    unselected heads swings accuracy both ways (see ``act/all-heads``)."""
    from rich.console import Console

    settings = settings or AutoSettings.from_env()
    path = Path(path)
    state = path.with_name(path.stem + ".state.jsonl")
    err = Console(stderr=True, highlight=False)
    records, data = tools.records(list(settings.data), settings.limit, "multiple_choice")
    info = discover(model)
    layers = settings.sweep_layers(info.num_layers)
    targets = resolve_targets(layers, None, info.num_layers, info.num_heads)
    pairs = [(layer, h) for layer in sorted(targets.layers) for h in range(info.num_heads)]
    if not pairs:
        raise AttnSurgeryError(f"layers={layers!r} select no head of {model_name} to calibrate.")
    scorer = ChoiceScorer(tokenizer, records, settings.batch_size)
    done = finished_heads(state) & set(pairs)
    todo = [p for p in pairs if p not in done]
    err.print(
        f"[bold]no ACT recipe is made for {model_name}: calibrating one[/bold] (the paper's head sweep, fast mode, "
        f"the settings of the shipped act/smollm2-135m recipe): {len(pairs)} heads (layers "
        f"{compact_ranges(sorted(targets.layers))} x {info.num_heads}) on {len(records)} calibration records of {data}, "
        f"beta {settings.beta:g}, threshold {settings.threshold:g}, metric {settings.metric}, rule {settings.rule}."
    )
    if done:
        err.print(f"resuming from {state}: {len(done)} of {len(pairs)} heads already swept.")
    seconds, forwards, one = estimate_sweep(model, scorer, todo, info.num_layers)
    err.print(
        f"estimated time: about {_format_seconds(seconds)} ({forwards:,.0f} batch forwards of up to "
        f"{settings.batch_size} sequences; one took {one:.2f} s). Ctrl-C stops it and keeps {state}; the same "
        "command resumes. --no-calibrate refuses instead."
    )
    try:
        result = calibrate_act_heads(
            model,
            tokenizer,
            records,
            beta=settings.beta,
            threshold=settings.threshold,
            layers=sorted(targets.layers),
            metric=settings.metric,
            min_delta=settings.min_delta,
            confidence=settings.confidence,
            rule=settings.rule,
            n_boot=settings.n_boot,
            batch_size=settings.batch_size,
            state_path=state,
            data=data,
        )
    except KeyboardInterrupt:
        err.print(
            f"calibration interrupted; the finished heads are kept in {state}: run the same command to resume."
        )
        raise
    if result.heads:
        result.score_selection(model, tokenizer, records, batch_size=settings.batch_size)
    err.print(result.summary())
    how = (
        f"Calibrated on demand by `attnsurgery apply/eval --recipe act {model_name}` (no shipped recipe for it): "
        f"the fast single-head sweep on {data} ({result.n_records} records) with the settings of the shipped "
        f"act/smollm2-135m recipe; per-record {result.metric} delta over the unpatched model. Cached per model; "
        "delete this file to calibrate again."
    )
    if result.heads:
        return write_act_recipe(result, path, model_name, name=f"act/{path.stem}", data=data, notes=how)
    err.print(
        f"[yellow]no head of {model_name} passed the selection: the recipe patches no head (the identity). ACT on "
        "unselected heads swings accuracy both ways; act/all-heads is that form, if you want it.[/yellow]"
    )
    recipe = {
        "name": f"act/{path.stem}",
        "description": f"ACT on {model_name}: no head passed the selection ({len(result.head_ll)} swept), so no head "
        "is patched (the identity).",
        "model": model_name,
        "surgeries": [{"surgery": "act", "args": dict(result.act_args), "layers": [], "heads": {}}],
        "calibration": {
            "data": data,
            "n": result.n_records,
            "metric": result.metric,
            "baseline": {"score": round(result.baseline_score(), 5), "acc": round(result.baseline_acc, 5)},
            "swept": len(result.head_ll),
            "kept": 0,
        },
        "notes": how + " " + NOTHING_KEPT.format(n=len(result.head_ll)),
    }
    from attnsurgery.recipe import write_recipe

    return write_recipe(recipe, path)
