"""The ACT head sweep's two procedures: one patched head per full forward, and the exact fast mode.

Fast mode: ACT on layer ``l`` leaves the layers below ``l`` untouched, so the hidden states entering layer ``l``
are computed once per batch and only layers ``l..L-1`` run per head; the batch is stacked once per head of the
layer, copy ``j`` applying ACT on head ``j`` only (:class:`RowHeadAct`). The first batch of each layer carries one
extra copy without ACT, checked against the baseline, so a decoder the cache shortcut does not fit fails loudly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from attnsurgery.api import patch
from attnsurgery.discovery import discover
from attnsurgery.engine import Engine
from attnsurgery.errors import UnsupportedModelError
from attnsurgery.eval.scoring import ChoiceScorer, HeadGather, choice_lls, continuation_ll, input_device
from attnsurgery.targeting import resolve_targets

from .surgery import ActSurgery

#: what the sweep reports per finished head: (layer, head, (n_sequences,) log-likelihoods, seconds)
Done = Callable[[int, int, torch.Tensor, float], None]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted hidden states are captured."""


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, index-aligned with the engine's attention modules (one ModuleList)."""
    info = discover(model)
    for module in info.decoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) == info.num_layers:
            if all(
                any(sub is info.attention[i] for sub in module[i].modules()) for i in range(info.num_layers)
            ):
                return list(module)
    raise UnsupportedModelError(
        f"{type(model).__name__}: the decoder layers are not one ModuleList holding attention layer i at index i, "
        "so the fast sweep cannot cache layer inputs; use fast=False (exact, about twice as slow)."
    )


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextmanager
def _start_at(
    blocks: list[nn.Module], start: int, hidden: torch.Tensor | None, stop_at: int | None
) -> Iterator[dict]:
    """Run a forward from layer ``start``: layers below return their input untouched (their output is replaced
    anyway), layer ``start`` gets ``hidden``; with ``stop_at``, the input of that layer is captured into the
    yielded dict and the pass ends there (raise :class:`_Stop`).

    Exact because a decoder's per-layer inputs besides the hidden states (mask, position embeddings) are built
    before the layer loop from the ids and attention mask, which the caller passes unchanged.
    """
    captured: dict[str, torch.Tensor] = {}
    saved: list[tuple[nn.Module, Any]] = []
    handles = []

    def skip(*args: Any, **kwargs: Any) -> torch.Tensor:
        return _hidden_of(args, kwargs)

    def substitute(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _with_hidden(args, kwargs, hidden)

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = _hidden_of(args, kwargs).detach()
        raise _Stop

    try:
        for block in blocks[:start]:
            # an instance-level forward (accelerate's offload hooks) must come back afterwards, not be deleted
            saved.append((block, block.__dict__.get("forward")))
            block.forward = skip
        if hidden is not None:
            handles.append(blocks[start].register_forward_pre_hook(substitute, with_kwargs=True))
        if stop_at is not None:
            handles.append(blocks[stop_at].register_forward_pre_hook(capture, with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for block, original in saved:
            if original is None:
                del block.forward
            else:
                block.forward = original


class RowHeadAct(ActSurgery):
    """ACT on one layer at a time with a different single head per batch row: ``row_heads`` (rows, H) bool masks
    the sink set per batch row, so copy j of a stacked batch gets ACT on its own head only, which is exactly
    single-head ACT on that copy (detection is per row and head)."""

    def setup(self, model: Any, engine: Any) -> None:
        super().setup(model, engine)
        self.active_layer: int | None = None
        self.row_heads: torch.Tensor | None = None

    def active_stages(self, layer_idx: int) -> frozenset:
        return self.stages if layer_idx == self.active_layer else frozenset()

    def detect(self, call: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, lse, sinks = super().detect(call, *args, **kwargs)
        return out, lse, sinks & self.row_heads.to(sinks.device)[:, :, None]


def sweep_slow(
    model: nn.Module,
    scorer: ChoiceScorer,
    todo: list[tuple[int, int]],
    act_args: dict[str, Any],
    head_batch: int,
    baseline: list[list[float]],
    bar: Any,
    done: Done,
) -> None:
    """The reference procedure: ACT patched on one head at a time, the full model run per head."""
    for layer, head in todo:
        bar.set_description(f"ACT calibration: L{layer} H{head}")
        t0 = time.perf_counter()
        with patch(model, "act", layers=[layer], heads={layer: [head]}, **act_args):
            values = choice_lls(model, scorer, bar.update)
        done(layer, head, values, time.perf_counter() - t0)


def sweep_fast(
    model: nn.Module,
    scorer: ChoiceScorer,
    todo: list[tuple[int, int]],
    act_args: dict[str, Any],
    head_batch: int,
    baseline: list[list[float]],
    bar: Any,
    done: Done,
) -> None:
    """The exact fast mode (see the module docstring): cached layer inputs, ``head_batch`` heads per forward."""
    blocks = _decoder_blocks(model)
    engine = Engine.of(model)
    info = engine.info
    by_layer: dict[int, list[int]] = {}
    for layer, head in todo:
        by_layer.setdefault(layer, []).append(head)
    surgery = RowHeadAct(
        RowHeadAct.config_class.from_kwargs("act", act_args),
        resolve_targets(sorted(by_layer), None, info.num_layers, info.num_heads),
    )
    engine.add(surgery)
    base = torch.tensor([x for rec in baseline for x in rec], dtype=torch.float64)
    gather = HeadGather(model)
    device = input_device(model)
    batches = [b.to(device) for b in scorer.batches]
    cache: list[torch.Tensor] = []
    at: int | None = None  # layer whose input the cache holds
    try:
        with torch.no_grad(), gather.installed():
            for layer in sorted(by_layer):
                bar.set_description(f"ACT calibration: layer {layer}")
                t0 = time.perf_counter()
                surgery.active_layer = None
                engine.refresh()  # idle: stock kernels while the cache moves to this layer's input
                for i, batch in enumerate(batches):
                    start = 0 if at is None else at
                    with _start_at(blocks, start, None if at is None else cache[i], layer) as captured:
                        try:
                            model(
                                input_ids=batch.input_ids,
                                attention_mask=batch.attention_mask,
                                use_cache=False,
                            )
                        except _Stop:
                            pass
                    if "hidden" not in captured:
                        raise UnsupportedModelError(
                            f"{type(model).__name__}: decoder layer {layer} was never called with hidden states; "
                            "use fast=False."
                        )
                    if at is None:
                        cache.append(captured["hidden"])
                    else:
                        cache[i] = captured["hidden"]
                at = layer
                surgery.active_layer = layer
                engine.refresh()
                heads = by_layer[layer]
                results = {h: torch.zeros(len(scorer.sequences), dtype=torch.float64) for h in heads}
                for i, batch in enumerate(batches):
                    for g in range(0, len(heads), head_batch):
                        group: list[int | None] = list(heads[g : g + head_batch])
                        check = i == 0 and g == 0
                        if check:
                            group.append(None)  # a copy without ACT: must reproduce the baseline
                        rows = batch.input_ids.shape[0]
                        mask = torch.zeros(len(group), info.num_heads, dtype=torch.bool)
                        for j, h in enumerate(group):
                            if h is not None:
                                mask[j, h] = True
                        surgery.row_heads = mask.repeat_interleave(rows, 0).to(device)
                        hidden = cache[i].repeat(len(group), *([1] * (cache[i].dim() - 1)))
                        with _start_at(blocks, layer, hidden, None):
                            values = continuation_ll(model, gather, batch, copies=len(group))
                        values = values.view(len(group), rows)
                        for j, h in enumerate(group):
                            if h is not None:
                                results[h][batch.seq_index] = values[j]
                        if check:
                            _check_fast(values[-1], base[batch.seq_index], layer, model)
                        bar.update((len(group) - check) / len(batches))
                seconds = (time.perf_counter() - t0) / len(heads)
                for h in heads:
                    done(layer, h, results[h], seconds)
    finally:
        engine.remove(surgery)


def _check_fast(got: torch.Tensor, want: torch.Tensor, layer: int, model: nn.Module) -> None:
    # float32 noise from a different batch shape and ACT's tiled kernel is ~1e-5 per sequence; a decoder whose
    # layers depend on more than the hidden states (extra per-layer state) is off by whole nats
    err = float((got - want).abs().max())
    if err > 1e-3 + 1e-4 * float(want.abs().max()):
        raise UnsupportedModelError(
            f"{type(model).__name__}: the fast sweep's no-ACT copy differs from the baseline by {err:.2e} nats at "
            f"layer {layer}, so this decoder's layers depend on more than the cached hidden states; use fast=False."
        )
