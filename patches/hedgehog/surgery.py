from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from attnsurgery.errors import SurgeryConfigError
from attnsurgery.kernels import repeat_kv
from attnsurgery.surgery import AttentionCall, Stage, Surgery
from attnsurgery.targeting import module_device

from .cache import HedgehogCacheLayer
from .config import HedgehogConfig
from .kernel import feature_map, hybrid_attention

_SLIDING_TYPES = ("sliding_attention", "chunked_attention", "hybrid_sliding")


class HedgehogLayer(nn.Module):
    """One layer's trainable state, fp32 whatever the model's dtype: the untied q and k feature-map projections
    ``W`` (H, head_dim, feature_dim) and the per-head window-factor logits ``w_h`` (gamma_h = sigmoid(w_h))."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int, gamma: float, device: Any) -> None:
        super().__init__()
        eye = torch.eye(head_dim, feature_dim, dtype=torch.float32, device=device)  # rectangular identity
        self.q_map = nn.Parameter(eye.expand(heads, -1, -1).clone())
        self.k_map = nn.Parameter(eye.expand(heads, -1, -1).clone())
        logit = math.log(gamma) - math.log1p(-gamma)
        self.window_logit = nn.Parameter(torch.full((heads,), logit, dtype=torch.float32, device=device))

    def extra_repr(self) -> str:
        return f"maps={tuple(self.q_map.shape)}"


def _is_sliding(module: nn.Module, config: Any, layer: int) -> bool:
    """A layer the model itself runs with a sliding window (Gemma-2/3 local layers, Qwen2/Mistral windows)."""
    if getattr(module, "sliding_window", None) is not None or getattr(module, "is_sliding", False) is True:
        return True
    types = getattr(config, "layer_types", None)
    return bool(types) and layer < len(types) and types[layer] in _SLIDING_TYPES


class HedgehogSurgery(Surgery):
    """Hedgehog / LoLCATs linear attention in place of softmax attention, with the sliding-window hybrid.

    Feature map (LoLCATs' ``softmax_dim``, the Hedgehog map of Zhang et al., "The Hedgehog & the Porcupine:
    Expressive Linear Attentions with Softmax Mimicry", ICLR 2024, arXiv 2402.04347): ``phi(x) = [softmax(x W),
    softmax(-x W)]`` per head, untied for queries and keys, ``W`` head_dim x ``feature_dim`` initialised to the
    (rectangular) identity, applied to the query and key the attention function receives (after RoPE, as LoLCATs
    applies it). Attention (Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language Models", ICLR 2025,
    arXiv 2410.10254): softmax over the last ``window`` keys plus linear terms for every older key under one shared
    normaliser, the softmax part weighted by a trainable per-head ``gamma_h = sigmoid(w_h)`` (init 0.1); see
    :mod:`.kernel` for the formula and the chunked O(n) computation. ``linear_only=True`` is Hedgehog's pure linear
    attention; ``window=None`` is exactly softmax attention through the same code (the identity setting).

    The softmax part keeps the model's conventions: its ``scaling``, Gemma-2's logit softcap and its mask
    (padding, a sliding window); the linear part takes every real older key (padded keys never enter the linear
    state). Layers the model runs with a sliding window next to global layers (Gemma-2/3 local layers) are left
    as they are: they are linear-time already and hold no long-range state to linearize (:attr:`skipped`); a
    model whose every layer slides (Mistral v0.1) is linearized whole. Decoding carries a constant-size state per layer in transformers' cache object
    (:mod:`.cache`): memory is flat in the generated length with a ``DynamicCache``; a static or quantized cache
    keeps all keys and the kernel recomputes the state from them (correct, not flat).

    Conversion (``attnsurgery linearize``, :mod:`.linearize`): stage 1 trains only the maps and gammas on the
    shared trainer's ``transfer`` objective (per-layer MSE to the softmax attention outputs, x1000 as LoLCATs);
    stage 2 adds LoRA (r 8, alpha 16) on the attention projections with the maps frozen.

    >>> handle = patch(model, "hedgehog", window=64)        # identity-initialised maps: train before use
    """

    name = "hedgehog"
    config_class = HedgehogConfig
    summary = (
        "Hedgehog/LoLCATs linear attention (trainable softmax-mimicking feature maps) with a softmax window"
    )
    paper = (
        "Zhang et al., The Hedgehog & the Porcupine, ICLR 2024 (arXiv 2402.04347); Zhang et al., LoLCATs, "
        "ICLR 2025 (arXiv 2410.10254)"
    )
    stages = frozenset({Stage.REPLACE})
    #: a short window so the tiny test sequences have old keys on the linear side, and random maps so q and k differ
    example_args = {"window": 4, "feature_dim": 8, "init": "random"}
    #: every key in the softmax window: exactly the model's attention, through the hybrid kernel
    identity_args = {"window": None}

    def setup(self, model: Any, engine: Any) -> None:
        info, config = engine.info, self.config
        for layer in self.targets.layers:
            if (
                self.targets.heads_of(layer) is not None
                and len(self.targets.heads_of(layer)) != info.num_heads
            ):
                raise SurgeryConfigError(
                    "hedgehog replaces whole attention layers; `heads=` cannot pick some heads of a layer. Use "
                    "`layers=` instead."
                )
        text_config = (
            model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        )
        sliding = {i for i in range(info.num_layers) if _is_sliding(info.attention[i], text_config, i)}
        # local layers next to global ones (Gemma-2/3) stay as they are; a model whose every layer slides (Mistral
        # v0.1, window 4096) is linearized whole, its window then bounding only the softmax part
        self.skipped = sorted(self.targets.layers & sliding) if len(sliding) < info.num_layers else []
        self.layers = sorted(set(self.targets.layers) - set(self.skipped))
        if not self.layers:
            raise SurgeryConfigError(
                f"hedgehog: every targeted layer ({sorted(self.targets.layers)}) is a sliding-window layer of "
                f"{type(model).__name__}; those are linear-time already. Target its full-attention layers."
            )
        # the targets become the layers it acts on (what saves, reloads and reports), with every head
        self.targets = dataclasses.replace(self.targets, layers=frozenset(self.layers), heads=None)
        self.num_heads, self.head_dim = info.num_heads, info.head_dim
        generator = torch.Generator().manual_seed(config.seed)
        self.maps = nn.ModuleDict()
        for layer in self.layers:
            params = HedgehogLayer(
                info.num_heads,
                info.head_dim,
                config.feature_dim,
                config.gamma,
                module_device(info.attention[layer]),
            )
            if config.init == "random":
                with torch.no_grad():
                    for p in (params.q_map, params.k_map):  # drawn on the CPU: the same init on every device
                        p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(info.head_dim))
            self.maps[str(layer)] = params
            module = info.attention[layer]
            engine.register_hook(
                self, module.register_forward_pre_hook(self._capture(layer), with_kwargs=True)
            )
        self._pending: dict[int, HedgehogCacheLayer | None] = {}

    # -- the decode state in transformers' cache ----------------------------------------------------------
    def _capture(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            self._pending[layer] = self._cache_layer(cache, layer)

        return hook

    def _cache_layer(self, cache: Any, layer: int) -> HedgehogCacheLayer | None:
        """This layer's :class:`HedgehogCacheLayer`, swapped into a dynamic cache before its first update; None
        for no cache or one we leave alone (static, quantized, already filled by the stock model), where the kernel
        recomputes the linear state from all cached keys."""
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder wrappers
        layers = getattr(cache, "layers", None)
        if not isinstance(layers, list):
            return None
        replicate = getattr(cache, "layer_class_to_replicate", None)
        if replicate is not None:
            while len(layers) <= layer:
                layers.append(replicate())
        if layer >= len(layers):
            return None
        current = layers[layer]
        if isinstance(current, HedgehogCacheLayer):
            if current.owner != id(self) or current.window != self.config.softmax_window:
                raise RuntimeError(
                    f"hedgehog: layer {layer} of this cache holds the state of another hedgehog patch; start "
                    "generation with a fresh cache after re-patching."
                )
            return current
        if type(current) in (DynamicLayer, DynamicSlidingWindowLayer) and current.get_seq_length() == 0:
            fresh = HedgehogCacheLayer(id(self), self.config.softmax_window)
            layers[layer] = fresh
            return fresh
        return None

    # -- the attention ------------------------------------------------------------------------------------
    def factors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(gamma (H,), linear factor (H,) or 1.0) of a layer."""
        gamma = torch.sigmoid(self.maps[str(layer)].window_logit)
        return gamma, (1.0 - gamma) if self.config.affine else 1.0

    def attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, call: AttentionCall
    ) -> torch.Tensor:
        layer = call.layer_idx
        params = self.maps[str(layer)]
        cached = self._pending.pop(layer, None)
        if cached is not None and (cached.keys is None or cached.keys.shape[-2] != key.shape[-2]):
            cached = None  # not the keys this layer object returned (defensive: recompute from what we got)
        heads, kv_heads = query.shape[1], key.shape[1]
        device = params.q_map.device
        q = query.to(device)
        k = repeat_kv(key, heads // kv_heads).to(device)
        v = repeat_kv(value, heads // kv_heads).to(device)
        tq, tk = q.shape[2], k.shape[2]
        allowed, key_valid = _visibility(call.attention_mask, tq, tk, device)
        fq, fk = feature_map(q, params.q_map), feature_map(k, params.k_map)
        gamma, lam = self.factors(layer)
        window = self.config.softmax_window
        state, fold_to = None, None
        if cached is not None:
            state = cached.state
            if not cached.record_past and window is not None:
                fold_to = tk - window + 1 if window > 0 else tk  # keep the last window - 1 keys
        y, new_state, folded = hybrid_attention(
            q,
            k,
            v,
            fq,
            fk,
            window=window,
            gamma=gamma,
            linear_factor=lam,
            scaling=scaling,
            softcap=call.kwargs.get("softcap"),
            allowed=allowed,
            key_valid=key_valid,
            state=state,
            fold_to=fold_to,
            chunk=self.config.chunk,
        )
        if cached is not None and not cached.record_past:
            cached.commit(new_state, folded)
        return y.transpose(1, 2).to(device=query.device, dtype=query.dtype)


def _visibility(
    mask: torch.Tensor | None, tq: int, tk: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The model's 4D mask as (B|1, 1|H, Tq, Tk) bool over the keys we hold (its last columns: a hedgehog cache
    keeps only the window's tail, the mask spans the request), and which key columns are real (some query may
    attend to them; padding is masked for every query). (None, None) without a mask: causal, no padding."""
    if not isinstance(mask, torch.Tensor):
        return None, None
    if mask.dim() == 2:  # (B, Tk) key padding only
        valid = mask.bool()[:, -tk:].to(device)
        return valid[:, None, None, :], valid
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if allowed.dim() == 3:
        allowed = allowed[:, None]
    allowed = allowed[..., -tq:, -tk:].to(device)
    valid = allowed.any(-2).any(-2)  # (B|1, Tk)
    return allowed, valid
