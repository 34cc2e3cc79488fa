"""Outlier statistics of a (patched) model: kurtosis, inf-norm and attention-sink share per decoder layer.

The metrics are Bondarenko, Nagel & Blankevoort's (*Quantizable Transformers: Removing Outliers by Helping
Attention Heads Do Nothing*, NeurIPS 2023, arXiv 2306.12929; code ``Qualcomm-AI-research/outlier-free-transformers``,
``validate_clm.py``):

* **kurtosis** -- the *non-excess* form ``mean((x - mu)^4) / (std^4 + 1e-6)`` of each sequence's flattened
  ``(T * d)`` activation (``std`` with Bessel's correction, as ``torch.std``), averaged over sequences; a
  Gaussian gives ~3, a few large outliers give hundreds or thousands;
* **inf-norm** -- each sequence's ``max |x|`` over the same flattened tensor, averaged over sequences;

measured, per decoder layer, on (a) the self-attention module's output (``o_proj`` / ``out_proj`` / GPT-2's
``c_proj`` after the heads are merged), (b) the MLP's output (OPT has no MLP module: its ``fc2`` output) and
(c) the residual stream the layer returns. Padding positions are left out (the paper's data had none).

On top of the paper's metrics: the **first-token (sink) share** per layer -- the attention probability each real
query after the first puts on its row's first real token, averaged over heads and queries, then over sequences --
read through attnsurgery's own attention-map recording, so a patched model is measured as it runs (probability
surgeries included); and the single largest absolute activation with its location.

This module measures; :mod:`.outliers_report` holds the results (:class:`OutlierStats`) and renders them (markdown
table, PNG); its names are re-exported here.

>>> from attnsurgery.eval.outliers import outlier_stats, render_outlier_table, plot_outliers
>>> stats = outlier_stats(model, batch["input_ids"], attention_mask=batch["attention_mask"])
>>> print(render_outlier_table(stats)); plot_outliers({"baseline": stats, "act": patched}, "outliers.png")
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..discovery import ModelInfo, discover
from ..engine import Engine
from ..errors import AttnSurgeryError, UnsupportedModelError
from .outliers_report import (  # noqa: F401  (_fmt, plot_outliers, render_outlier_table: re-exported)
    LayerOutliers,
    MaxActivation,
    OutlierStats,
    _fmt,
    plot_outliers,
    render_outlier_table,
)

#: where a decoder layer's feed-forward block lives, tried in order; OPT's layer has none (fc1/fc2 inline), so
#: the last-projection names stand in for it there
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
FFN_OUT_NAMES = ("fc2", "down_proj", "c_proj", "dense_4h_to_h", "w2")
SITES = ("attn", "mlp", "residual")

Batch = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# The metrics
# ----------------------------------------------------------------------------------------------------------


def kurtosis(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Bondarenko et al.'s kurtosis of each row of ``x`` (N, D): ``mean((x-mu)^4) / (std^4 + eps)``, (N,).

    Non-excess (a Gaussian gives 3), ``std`` unbiased (``torch.std``'s default), computed in float64.
    """
    x = x.double()
    mu = x.mean(dim=1, keepdim=True)
    s = x.std(dim=1)
    return ((x - mu) ** 4).mean(dim=1) / (s**4 + eps)


def masked_stats(
    x: torch.Tensor, valid: torch.Tensor | None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence kurtosis and inf-norm of ``x`` (B, T, d) over the rows ``valid`` (B, T) marks real.

    Equals :func:`kurtosis` / ``max |x|`` of each sequence's real rows flattened to ``(T_b * d)``; (B,), (B,).
    """
    x = x.double()
    bsz, _, dim = x.shape
    if valid is None:
        flat = x.reshape(bsz, -1)
        return kurtosis(flat, eps), flat.abs().amax(dim=1)
    m = valid.to(device=x.device, dtype=x.dtype)[..., None]  # (B, T, 1)
    n = m.sum(dim=(1, 2)) * dim  # (B,) values per sequence
    mu = (x * m).sum(dim=(1, 2)) / n
    centred = (x - mu[:, None, None]) * m
    var = (centred**2).sum(dim=(1, 2)) / (n - 1)
    mu4 = (centred**4).sum(dim=(1, 2)) / n
    inf = (x.abs() * m).amax(dim=(1, 2))
    return mu4 / (var**2 + eps), inf


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def iter_batches(inputs: Any, attention_mask: torch.Tensor | None = None) -> Iterator[Batch]:
    """``{"input_ids", "attention_mask"}`` batches from a (B, T) id tensor, a mapping (tokenizer output) or an
    iterable of either. ``attention_mask`` applies to a lone tensor; missing masks are all ones."""
    if isinstance(inputs, torch.Tensor) or isinstance(inputs, Mapping):
        yield _one_batch(inputs, attention_mask)
        return
    if attention_mask is not None:
        raise AttnSurgeryError(
            "attention_mask= goes with a single (B, T) tensor of ids; for several batches pass mappings "
            "{'input_ids': ..., 'attention_mask': ...} (e.g. tokenizer outputs) instead."
        )
    if not isinstance(inputs, Iterable):
        raise AttnSurgeryError(
            f"inputs must be a (B, T) tensor of token ids, a mapping with 'input_ids', or an iterable of those; "
            f"got {type(inputs).__name__}."
        )
    for item in inputs:
        yield _one_batch(item, None)


def _one_batch(item: Any, attention_mask: torch.Tensor | None) -> Batch:
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise AttnSurgeryError(f"a batch mapping needs 'input_ids'; it has {sorted(item)}.")
        ids, mask = item["input_ids"], item.get("attention_mask", attention_mask)
    elif isinstance(item, torch.Tensor):
        ids, mask = item, attention_mask
    else:
        raise AttnSurgeryError(
            f"each batch must be a (B, T) tensor of token ids or a mapping with 'input_ids'; got {type(item).__name__}."
        )
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype.is_floating_point:
        raise AttnSurgeryError(
            f"input_ids must be integer token ids of shape (B, T); got {tuple(ids.shape)} {ids.dtype}."
        )
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if mask.dim() == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise AttnSurgeryError(
            f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}."
        )
    return {"input_ids": ids, "attention_mask": mask.long()}


def model_inputs(model: nn.Module, batch: Batch) -> dict[str, Any]:
    """Forward kwargs on the model's device. Left-padded rows get ``position_ids`` counted from their first real
    token (as ``generate`` does), so a sequence's statistics do not depend on the padding beside it."""
    device = getattr(model, "device", None) or next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if bool((mask[:, 0] == 0).any()) and "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return kwargs


# ----------------------------------------------------------------------------------------------------------
# Where to hook
# ----------------------------------------------------------------------------------------------------------


def _mlp_of(model: nn.Module, layer: nn.Module, attention: nn.Module) -> nn.Module:
    for name in MLP_NAMES:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module) and module is not attention:
            return module
    for name in FFN_OUT_NAMES:  # an MLP written inline in the layer (OPT: fc1 -> act -> fc2)
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UnsupportedModelError(
        f"{type(model).__name__}: cannot find the feed-forward block of decoder layer {type(layer).__name__} "
        f"(looked for submodules {', '.join(MLP_NAMES + FFN_OUT_NAMES)}; it has "
        f"{', '.join(n for n, _ in layer.named_children())}). outlier_stats supports Llama-like, Gemma-3, GPT-2 and "
        "OPT layouts."
    )


def hook_sites(model: nn.Module, info: ModelInfo | None = None) -> list[dict[str, nn.Module]]:
    """Per decoder layer, the modules whose outputs are measured: ``{"attn", "mlp", "residual"}``."""
    info = info or discover(model)
    if len(info.layers) != info.num_layers:
        raise UnsupportedModelError(f"{type(model).__name__}: could not locate the decoder layers.")
    return [
        {"attn": attn, "mlp": _mlp_of(model, layer, attn), "residual": layer}
        for attn, layer in zip(info.attention, info.layers)
    ]


def _first(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return getattr(output, "last_hidden_state", None)


@contextmanager
def _forward_hooks(hooks: list[tuple[nn.Module, Any]]) -> Iterator[None]:
    handles = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------------------
# Accumulation
# ----------------------------------------------------------------------------------------------------------


class _Accumulator:
    """Running sums over sequences of each (layer, site)'s kurtosis and inf-norm, and the overall max."""

    def __init__(self, num_layers: int) -> None:
        self.kurt = torch.zeros(num_layers, len(SITES), dtype=torch.float64)
        self.inf = torch.zeros(num_layers, len(SITES), dtype=torch.float64)
        self.sink = torch.zeros(num_layers, dtype=torch.float64)
        self.sink_count = torch.zeros(num_layers, dtype=torch.float64)
        self.calls = torch.zeros(num_layers, len(SITES), dtype=torch.long)
        self.sequences = 0
        self.tokens = 0
        self.best: MaxActivation | None = None
        self.batch: Batch | None = None

    def hook(self, layer: int, site: str) -> Any:
        col = SITES.index(site)

        def fn(module: nn.Module, args: Any, output: Any) -> None:
            x = _first(output)
            if x is None or self.batch is None:
                return
            mask = self.batch["attention_mask"].to(x.device).bool()
            if x.dim() == 2 and x.shape[0] == mask.numel():  # (B*T, d): OPT flattens tokens around its MLP
                x = x.view(*mask.shape, -1)
            if x.dim() != 3 or x.shape[:2] != mask.shape:
                return  # not this forward's activations (e.g. a side pass); nothing to measure
            self.calls[layer, col] += 1
            with torch.no_grad():
                kurt, inf = masked_stats(x.detach(), mask)
                self.kurt[layer, col] += kurt.sum().cpu()
                self.inf[layer, col] += inf.sum().cpu()
                self._track_max(x.detach(), mask, layer, site)

        return fn

    def _track_max(self, x: torch.Tensor, mask: torch.Tensor, layer: int, site: str) -> None:
        mag = x.abs().float().masked_fill(~mask[..., None], -1.0)
        flat = int(mag.argmax())
        b, rest = divmod(flat, mag.shape[1] * mag.shape[2])
        t, c = divmod(rest, mag.shape[2])
        value = float(x[b, t, c])
        if self.best is None or abs(value) > abs(self.best.value):
            self.best = MaxActivation(
                value=value,
                layer=layer,
                site=site,
                sequence=self.sequences + b,
                position=t,
                token_index=int(mask[b, :t].sum()),
                channel=c,
                token_id=int(self.batch["input_ids"][b, t]),
            )


def _sink_shares(maps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: mean over heads and real queries after the first real token of the probability on that
    token; maps (B, H, Tq, Tk) (cpu), mask (B, T). Returns (sum over sequences, number of sequences counted)."""
    mask = mask.bool().cpu()
    first = mask.float().argmax(dim=-1)  # (B,) column of each row's first real token
    cols = torch.arange(mask.shape[1])
    queries = mask & (cols[None, :] > first[:, None])  # (B, Tq)
    on_first = maps.double().gather(3, first.view(-1, 1, 1, 1).expand(*maps.shape[:3], 1))[
        ..., 0
    ]  # (B, H, Tq)
    per_row = on_first.mean(dim=1)  # (B, Tq)
    n = queries.sum(-1)
    share = (per_row * queries).sum(-1) / n.clamp(min=1)
    counted = n > 0
    return share[counted].sum(), counted.sum().double()


# ----------------------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def outlier_stats(
    model: nn.Module,
    inputs: Any,
    *,
    attention_mask: torch.Tensor | None = None,
    sink_share: bool = True,
    label: str | None = None,
) -> OutlierStats:
    """Per decoder layer: kurtosis and inf-norm of the attention output, MLP output and residual stream
    (Bondarenko et al.'s definitions, averaged over sequences), the first-token attention share, and the largest
    activation; on the model as it is (with any active attnsurgery surgeries).

    ``inputs``: token ids (B, T), a tokenizer output, or an iterable of either (``attention_mask`` for the lone
    tensor form). Activations come from forward hooks on one plain forward per batch, so the model computes
    exactly what it would without them; with ``sink_share`` a second forward records attention maps through the
    engine, one layer at a time (a (B, H, T, T) map per layer in memory, never all of them). Hooks and the
    recording are removed afterwards, also on error.

    >>> stats = outlier_stats(model, tokenizer(texts, return_tensors="pt", padding=True))
    >>> stats.max_kurtosis, stats.max_inf_norm, stats.mean_sink_share
    """
    info = discover(model)
    sites = hook_sites(model, info)
    acc = _Accumulator(info.num_layers)
    hooks = [
        (module, acc.hook(layer, site)) for layer, mods in enumerate(sites) for site, module in mods.items()
    ]
    was_training = model.training
    model.eval()
    try:
        for batch in iter_batches(inputs, attention_mask):
            mask = batch["attention_mask"].bool()
            if not bool(mask.any(-1).all()):
                raise AttnSurgeryError(
                    "a sequence in the batch has no real tokens (its attention_mask is all 0)."
                )
            kwargs = model_inputs(model, batch)
            acc.batch = batch
            with _forward_hooks(hooks):
                model(**kwargs)
            if not bool((acc.calls > 0).all()):
                layer, col = (int(v) for v in (acc.calls == 0).nonzero()[0])
                raise UnsupportedModelError(
                    f"{type(model).__name__}: the {SITES[col]} site of layer {layer} "
                    f"({type(sites[layer][SITES[col]]).__name__}) returned no (batch, tokens, hidden) tensor to measure."
                )
            if sink_share:
                _record_sinks(model, info, kwargs, batch, acc)
            acc.sequences += batch["input_ids"].shape[0]
            acc.tokens += int(mask.sum())
    finally:
        acc.batch = None
        model.train(was_training)
    if acc.sequences == 0:
        raise AttnSurgeryError("outlier_stats got no batches to measure.")
    return _summarise(model, acc, label, sink_share)


def _record_sinks(model: nn.Module, info: ModelInfo, kwargs: dict, batch: Batch, acc: _Accumulator) -> None:
    engine = Engine.of(model)
    mask = batch["attention_mask"]

    def reduce(layer: int) -> Any:
        def fn(module: nn.Module, args: Any, output: Any) -> None:
            blocks = engine.recording(layer)
            if not blocks:
                return
            maps = torch.cat(blocks, dim=2) if len(blocks) > 1 else blocks[0]
            blocks.clear()  # free this layer's map before the next one is built
            total, count = _sink_shares(maps, mask)
            acc.sink[layer] += total
            acc.sink_count[layer] += count

        return fn

    engine.start_recording(set(range(info.num_layers)))
    try:
        with _forward_hooks([(attn, reduce(i)) for i, attn in enumerate(info.attention)]):
            model(**kwargs)
    finally:
        engine.stop_recording()


def _summarise(model: nn.Module, acc: _Accumulator, label: str | None, with_sink: bool) -> OutlierStats:
    kurt = acc.kurt / acc.sequences
    inf = acc.inf / acc.sequences
    layers = []
    for i in range(kurt.shape[0]):
        share = float(acc.sink[i] / acc.sink_count[i]) if with_sink and acc.sink_count[i] > 0 else None
        layers.append(
            LayerOutliers(
                layer=i,
                attn_kurtosis=float(kurt[i, 0]),
                attn_inf_norm=float(inf[i, 0]),
                mlp_kurtosis=float(kurt[i, 1]),
                mlp_inf_norm=float(inf[i, 1]),
                residual_kurtosis=float(kurt[i, 2]),
                residual_inf_norm=float(inf[i, 2]),
                sink_share=share,
            )
        )
    k_at = divmod(int(kurt.argmax()), len(SITES))
    i_at = divmod(int(inf.argmax()), len(SITES))
    late = [row.sink_share for row in layers[2:] if row.sink_share is not None]
    notes = []
    if with_sink and not late:
        notes.append("mean_sink_share is over layers >= 2; this model has none with a measured share.")
    return OutlierStats(
        model=type(model).__name__,
        num_sequences=acc.sequences,
        num_tokens=acc.tokens,
        layers=layers,
        max_activation=acc.best,
        label=label,
        max_kurtosis=float(kurt.max()),
        max_kurtosis_at=f"layer {k_at[0]} {SITES[k_at[1]]}",
        avg_kurtosis=float(kurt.mean()),
        max_inf_norm=float(inf.max()),
        max_inf_norm_at=f"layer {i_at[0]} {SITES[i_at[1]]}",
        mean_sink_share=sum(late) / len(late) if late else None,
        notes=notes,
    )
