"""The engine: one attention function registered on transformers' attention seam, routing each layer.

transformers calls ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value,
attention_mask, scaling=..., dropout=..., **kwargs)`` from every attention layer. We register one dispatcher
(:func:`attnsurgery_attention`) under our own name, plus the matching mask function in
``AttentionMaskInterface`` (without it transformers silently passes ``attention_mask=None`` and causality is
lost), then switch the model over with ``set_attn_implementation``. No model code is copied.

Per layer the dispatcher runs the active surgeries' stages (see :mod:`attnsurgery.surgery`) on the cheapest
backend that is exact for them:

* only ``QUERY``/``HEAD_OUTPUT`` stages -> the model's own kernel (SDPA, or its eager function if the model
  was loaded with ``attn_implementation="eager"``) on the modified query/scaling;
* one ``fused`` probability surgery -> that surgery's exact kernel;
* other probability-level stages -> :func:`tiled_attention`, O(block x n) memory, never an n x n tensor
  unless attention maps were requested;
* a ``REPLACE`` surgery -> its own kernel.

A model loaded with another kernel (flash-attention 2/3/4, flex attention, a hub kernel) keeps it on every layer
that runs the base kernel (untouched, or changed only in its query or head outputs): the engine registers
``attnsurgery_native:<kernel>`` with that kernel's own mask function, and hands surgeries and attnsurgery's
kernels the kernel's mask (flash's 2D padding mask, flex's ``BlockMask``) turned into SDPA's boolean mask
(:func:`sdpa_style_mask`). One case is not covered: ``generate`` with a static cache drops an all-ones mask
unless the implementation's name says "flash", which ours cannot (see :func:`native_name`).

Per-request state (real-token positions under padding and a KV cache) reaches surgeries through a
:class:`RequestState` filled by a forward pre-hook on the decoder, which survives ``generate()`` (that
rejects unknown forward kwargs).
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    eager_mask,
    sdpa_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .discovery import discover
from .errors import SurgeryConfigError, UnsupportedModelError
from .kernels import tiled_attention
from .request import RequestState
from .surgery import AttentionCall, Stage, Surgery

#: implementation names we register; which one a model gets depends on what it ran before
SDPA_NAME = "attnsurgery"
EAGER_NAME = "attnsurgery_eager"
_BASE_OF = {SDPA_NAME: "sdpa", EAGER_NAME: "eager"}
#: prefix of the names registered for models loaded with another kernel (flash-attention, flex, hub kernels)
NATIVE_PREFIX = "attnsurgery_native:"


def native_name(original: str) -> str:
    """Our implementation name over another kernel. transformers takes any name holding "flash" for a flash kernel
    to import under that name (and a "/" for a hub repository to download), so neither may appear in ours."""
    return NATIVE_PREFIX + original.replace("flash", "fa").replace("/", "__")


#: use surgeries' own exact fused kernels (ACT ...) where they apply; ATTNSURGERY_FUSED=0 forces the tiled path
#: (for benchmarks and debugging; results are the same up to float rounding)
FUSED_KERNELS = os.environ.get("ATTNSURGERY_FUSED", "1") != "0"


# ----------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------


def _register_native(original: str | None) -> str | None:
    """Register our dispatcher over a model's kernel other than SDPA/eager and return its name; None for those
    two (and for a name transformers does not know)."""
    if original in (None, "sdpa", "eager") or original not in ALL_ATTENTION_FUNCTIONS:
        return None
    name = native_name(original)
    AttentionInterface.register(name, attnsurgery_attention)
    mask = ALL_MASK_ATTENTION_FUNCTIONS[original] if original in ALL_MASK_ATTENTION_FUNCTIONS else sdpa_mask
    AttentionMaskInterface.register(name, mask)
    return name


def sdpa_style_mask(
    mask: Any, batch: int, q_len: int, k_len: int, device: torch.device, is_causal: bool, window: int | None
) -> torch.Tensor | None:
    """The boolean (B, 1, Tq, Tk) mask (True = attend; None = plain causal, Tq == Tk or one query) that SDPA would
    get, from the mask another kernel gets.

    * flex attention's ``BlockMask``: its ``mask_mod`` (causality, padding, sliding window and cache offsets
      baked in by transformers) evaluated on every (query, key) pair;
    * flash-attention's 2D padding mask (or None): flash aligns causality bottom-right (query i is key
      ``Tk - Tq + i``), applies the layer's ``sliding_window`` as ``q - k < window`` and drops padded keys.
    """
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        return mask  # a caller's own 4D mask goes to every kernel as it is
    if mask is not None and not isinstance(mask, torch.Tensor) and hasattr(mask, "mask_mod"):
        from torch.nn.attention.flex_attention import create_mask

        rows = mask.kv_num_blocks.shape[0]
        dense = create_mask(mask.mask_mod, rows, 1, mask.seq_lengths[0], mask.seq_lengths[1], device=device)
        return dense[:, :, :q_len, :k_len].expand(batch, -1, -1, -1)
    windowed = window is not None and k_len > window
    if mask is None and not windowed and (q_len == 1 or q_len == k_len) and (is_causal or q_len == 1):
        return None
    keys = torch.arange(k_len, device=device)
    queries = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if is_causal:
        allowed &= keys[None, :] <= queries
    if windowed:
        allowed &= (queries - keys[None, :]) < window
    allowed = allowed[None, None].expand(batch, 1, q_len, k_len)
    if mask is not None:
        allowed = allowed & mask[:, -k_len:].to(device=device, dtype=torch.bool)[:, None, None, :]
    return allowed


def _as_native(kernel: Callable, original: str) -> Callable:
    """The native kernel, run as in the unpatched model: flash-attention's wrapper loads its functions by the name
    in ``module.config._attn_implementation``, which reads ours while patched, so the call sees the original."""

    def base(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "_attn_implementation_internal"):
            return kernel(module, *args, **kwargs)
        ours = config._attn_implementation_internal
        config._attn_implementation_internal = original
        try:
            return kernel(module, *args, **kwargs)
        finally:
            config._attn_implementation_internal = ours

    return base


def _eager_base(module: nn.Module) -> Callable:
    """The model's own eager attention function (GPT-2, Gemma ... each define theirs)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


# ----------------------------------------------------------------------------------------------------------
# Per-layer plan and the dispatcher
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LayerPlan:
    """The surgeries active on one layer, sorted into stages, and the backend to use."""

    layer_idx: int
    engine: Engine
    base: Callable
    query: list[Surgery] = field(default_factory=list)
    logits: list[Surgery] = field(default_factory=list)
    normalizer: Surgery | None = None
    probs: list[Surgery] = field(default_factory=list)
    head_output: list[Surgery] = field(default_factory=list)
    replace: Surgery | None = None

    kernel: Surgery | None = None  # computes the core attention itself (REPLACE, or a lone ``fused`` surgery)
    tiled: bool = False  # probability-level stages run on the tiled path
    idle: bool = True  # no surgery acts here: straight to the base kernel

    def freeze(self) -> LayerPlan:
        """Decide the backend once, when surgeries change, not on every call."""
        prob_level = [*self.logits, *self.probs] + ([self.normalizer] if self.normalizer else [])
        owners = {id(s): s for s in prob_level}
        self.kernel = self.replace
        if self.kernel is None and len(owners) == 1:
            (only,) = owners.values()
            self.kernel = only if only.fused and FUSED_KERNELS else None
        self.tiled = bool(prob_level) and self.kernel is None
        self.idle = not (self.query or self.head_output or prob_level or self.replace)
        return self

    def run(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        dropout: float,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        record = self.engine.recording(self.layer_idx)
        if self.idle and record is None:
            return self.base(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        native_mask = attention_mask  # what the model's own kernel gets
        if self.engine.native is not None:  # surgeries and attnsurgery's kernels read SDPA's boolean mask
            attention_mask = self.engine.sdpa_style_mask(attention_mask, query, key, module, kwargs)
        call = AttentionCall(
            module=module,
            layer_idx=self.layer_idx,
            num_heads=query.shape[1],
            num_kv_heads=key.shape[1],
            query_len=query.shape[2],
            key_len=key.shape[2],
            attention_mask=attention_mask,
            is_causal=kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False,
            request=self.engine.request,
            kwargs=kwargs,
        )
        for surgery in self.query:
            query, scaling = surgery.query(query, scaling, call)
        call.query, call.key, call.value, call.scaling = query, key, value, scaling
        kernel = self.kernel if record is None else self.replace
        weights = None
        if (kernel is not None or self.tiled or record is not None) and (
            kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None
        ):
            # attnsurgery's own kernels (tiled, fused ACT/VAR) score softcapped q.k plus the additive mask only
            raise UnsupportedModelError(
                f"layer {self.layer_idx}: attention sinks (s_aux) / position_bias are not supported by attnsurgery's "
                "own kernels (the tiled path, fused ACT / VAR) yet; patch only query/head-output surgeries on this "
                "model."
            )
        # a fused surgery's kernel may decline a call (None: e.g. a GPU-only path on CPU): the tiled path then
        attn_output = kernel.attention(query, key, value, scaling, call) if kernel is not None else None
        if attn_output is None and (kernel is not None or self.tiled or record is not None):
            attn_output = tiled_attention(
                query,
                key,
                value,
                attention_mask,
                scaling,
                call,
                logit_stages=self.logits,
                normalizer=self.normalizer,
                prob_stages=self.probs,
                dropout=dropout,
                record=record,
            )
        elif attn_output is None:
            attn_output, weights = self.base(
                module, query, key, value, native_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        for surgery in self.head_output:
            attn_output = surgery.head_output(attn_output, call)
        return attn_output, weights


def attnsurgery_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The function transformers calls for every attention layer of a patched model."""
    plan: LayerPlan | None = getattr(module, "attnsurgery_layer", None)
    if plan is None:  # e.g. a vision tower of a patched VLM: stock SDPA
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return plan.run(module, query, key, value, attention_mask, scaling, dropout, kwargs)


def _register() -> None:
    AttentionInterface.register(SDPA_NAME, attnsurgery_attention)
    AttentionMaskInterface.register(SDPA_NAME, sdpa_mask)
    AttentionInterface.register(EAGER_NAME, attnsurgery_attention)
    AttentionMaskInterface.register(EAGER_NAME, eager_mask)


_register()


# ----------------------------------------------------------------------------------------------------------
# The engine: one per patched model
# ----------------------------------------------------------------------------------------------------------

_ENGINES: weakref.WeakKeyDictionary[nn.Module, Engine] = weakref.WeakKeyDictionary()
_MISSING = object()


class Engine:
    """Owns a model's patch: the attention implementation switch, the side-channel hook, layer plans.

    Created by the first surgery on a model and uninstalled, leaving the model exactly as it was, when the
    last one is removed. Use :func:`attnsurgery.patch`, not this class, in user code.
    """

    def __init__(self, model: nn.Module) -> None:
        self.info = discover(model)
        self.model = model
        self.surgeries: list[Surgery] = []
        self.request = RequestState(self.info.visual_token_ids if self.info.is_vision_language else ())
        self._hooks: dict[int, list[Any]] = {}  # id(surgery or self) -> hook handles
        self._record: set[int] | None = None
        self._maps: dict[int, list[torch.Tensor]] = {}
        config = self.info.decoder.config if hasattr(self.info.decoder, "config") else model.config
        self._impl_owner = (
            self.info.decoder if hasattr(self.info.decoder, "set_attn_implementation") else model
        )
        self.original_impl = config._attn_implementation
        #: the model's own kernel when it is neither SDPA nor eager (flash-attention, flex, a hub kernel)
        native_impl = _register_native(self.original_impl)
        self.native = self.original_impl if native_impl else None
        self.impl = native_impl or (EAGER_NAME if self.original_impl == "eager" else SDPA_NAME)
        #: converted masks of the forward in progress: the layers share a few mask objects (full, sliding)
        self._converted: dict[tuple, tuple[Any, torch.Tensor | None]] = {}
        self._installed = False
        self._own_reorder: Any = _MISSING

    # -- lookup ----------------------------------------------------------------------------------------------
    @classmethod
    def of(cls, model: nn.Module, create: bool = True) -> Engine | None:
        engine = _ENGINES.get(model)
        if engine is None and create:
            engine = _ENGINES[model] = cls(model)
        return engine

    # -- install / uninstall ---------------------------------------------------------------------------------
    def _install(self) -> None:
        self._hooks[id(self)] = [
            self.info.decoder.register_forward_pre_hook(self.request.capture, with_kwargs=True)
        ]
        if self.native is not None:  # converted masks live for one forward
            self._hooks[id(self)].append(
                self.info.decoder.register_forward_pre_hook(lambda *_: self._converted.clear())
            )
        if self.info.is_vision_language:
            self._hooks[id(self)].append(
                self.model.register_forward_pre_hook(self.request.capture_images, with_kwargs=True)
            )
        self._install_reorder()
        self._impl_owner.set_attn_implementation(self.impl)
        self._installed = True

    def _install_reorder(self) -> None:
        """Route beam search's cache reordering through the request state too: ``generate`` calls the model's
        ``_reorder_cache(cache, beam_idx)`` when it has one (transformers' seam for models with special caches),
        else ``cache.reorder_cache``. The model's own method, if any, still runs first."""
        own = vars(self.model).get("_reorder_cache", _MISSING)
        original = getattr(self.model, "_reorder_cache", None)
        request = self.request

        def reorder_cache(cache: Any, beam_idx: torch.Tensor) -> Any:
            if original is not None:
                cache = original(cache, beam_idx)
            elif hasattr(cache, "reorder_cache"):
                cache.reorder_cache(beam_idx)
            else:
                raise ValueError(
                    f"{type(self.model).__name__} cannot use beam search with a {type(cache).__name__}: it cannot be "
                    "reordered."
                )
            request.reorder(beam_idx)
            return cache

        self._own_reorder = own
        self.model._reorder_cache = reorder_cache

    def _uninstall(self) -> None:
        for handle in self._hooks.pop(id(self), []):
            handle.remove()
        if self._own_reorder is _MISSING:
            vars(self.model).pop("_reorder_cache", None)
        else:
            self.model._reorder_cache = self._own_reorder
        for module in self.info.attention:
            if hasattr(module, "attnsurgery_layer"):
                del module.attnsurgery_layer
        self._impl_owner.set_attn_implementation(self.original_impl)
        self._installed = False
        _ENGINES.pop(self.model, None)

    def base_kernel(self, module: nn.Module) -> Callable:
        """What an untouched layer runs: the model's own kernel."""
        if self.native is not None:
            return _as_native(ALL_ATTENTION_FUNCTIONS[self.native], self.native)
        return _eager_base(module) if self.impl == EAGER_NAME else sdpa_attention_forward

    def sdpa_style_mask(
        self, mask: Any, query: torch.Tensor, key: torch.Tensor, module: nn.Module, kwargs: dict
    ) -> torch.Tensor | None:
        """The native kernel's mask as attnsurgery's kernels read it, converted once per mask and layer kind (the
        layers of one forward share a mask object)."""
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        is_causal = kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False
        shape = (query.shape[0], query.shape[2], key.shape[2])
        cache_key = (id(mask), shape, window, is_causal, query.device)
        hit = self._converted.get(cache_key)
        if hit is None:
            if len(self._converted) >= 8:
                self._converted.clear()
            # the entry holds the mask itself, so its id cannot be reused for another mask while it is cached
            hit = self._converted[cache_key] = (
                mask,
                sdpa_style_mask(mask, *shape, query.device, is_causal, window),
            )
        return hit[1]

    def register_hook(self, owner: Surgery, handle: Any) -> None:
        """Keep a hook handle a surgery registered; it is removed with the surgery."""
        self._hooks.setdefault(id(owner), []).append(handle)

    def capture_layer_inputs(
        self, owner: Surgery, callback: Callable[[int, torch.Tensor, RequestState], None]
    ) -> None:
        """Call ``callback(layer_idx, hidden_states, request)`` with each decoder layer's input (the residual
        stream ``x^(l-1)``, (B, Tq, hidden)) before the layer runs; the hooks go with the surgery."""

        def make(idx: int) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs.get("hidden_states")
                if isinstance(hidden, torch.Tensor):
                    callback(idx, hidden, self.request)

            return hook

        for idx, layer in enumerate(self.info.layers):
            self.register_hook(owner, layer.register_forward_pre_hook(make(idx), with_kwargs=True))

    @torch.no_grad()
    def side_forward(self, **inputs: Any) -> Any:
        """Run the model on other inputs (VHR's text-only pass) from inside a hook, leaving the request state
        of the forward in progress as it was."""
        saved = self.request.save()
        try:
            return self.model(**inputs)
        finally:
            self.request.restore(saved)

    # -- surgeries -------------------------------------------------------------------------------------------
    def add(self, surgery: Surgery) -> None:
        """Set up a surgery and route its layers; on any error the model is left as it was."""
        first = not self._installed
        try:
            surgery.setup(self.model, self)
            plans = self._plans([*self.surgeries, surgery])  # validates stage conflicts
            if first:
                self._install()
        except BaseException:
            for handle in self._hooks.pop(id(surgery), []):
                handle.remove()
            surgery.teardown(self.model, self)
            if first and self._installed:
                self._uninstall()
            self.discard_if_unused()
            raise
        self.surgeries.append(surgery)
        self._apply(plans)

    def remove(self, surgery: Surgery) -> None:
        if surgery not in self.surgeries:
            return
        self.surgeries.remove(surgery)
        for handle in self._hooks.pop(id(surgery), []):
            handle.remove()
        surgery.teardown(self.model, self)
        self.request.drop(surgery)
        if not self.surgeries and self._record is None:
            self._uninstall()
        else:
            self.refresh()

    def refresh(self) -> None:
        """Re-route layers after a surgery's state changed (e.g. calibrated tensors were loaded)."""
        self._apply(self._plans(self.surgeries))

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model as if unpatched, without removing anything: every layer goes to the base kernel and
        module-level effects (LoRA) are switched off. The trainer's teacher pass (``kd``, ``transfer``) uses it,
        so the teacher is the same model in memory, not a second copy."""
        for surgery in self.surgeries:
            surgery.set_enabled(False)
        self._apply(self._plans([]))
        try:
            yield
        finally:
            for surgery in self.surgeries:
                surgery.set_enabled(True)
            self.refresh()

    def discard_if_unused(self) -> None:
        if not self.surgeries and not self._installed:
            _ENGINES.pop(self.model, None)

    def _plans(self, surgeries: list[Surgery]) -> list[LayerPlan]:
        plans = []
        for idx, module in enumerate(self.info.attention):
            plan = LayerPlan(idx, self, self.base_kernel(module))
            for surgery in surgeries:
                stages = surgery.active_stages(idx)
                if Stage.QUERY in stages:
                    plan.query.append(surgery)
                if Stage.LOGITS in stages:
                    plan.logits.append(surgery)
                if Stage.PROBS in stages:
                    plan.probs.append(surgery)
                if Stage.HEAD_OUTPUT in stages:
                    plan.head_output.append(surgery)
                if Stage.NORMALIZE in stages:
                    if plan.normalizer is not None:
                        raise SurgeryConfigError(
                            f"layer {idx}: {plan.normalizer.name!r} and {surgery.name!r} both replace the softmax; "
                            "only one normaliser can act on a layer. Give them disjoint `layers`."
                        )
                    plan.normalizer = surgery
                if Stage.REPLACE in stages:
                    if plan.replace is not None:
                        raise SurgeryConfigError(
                            f"layer {idx}: {plan.replace.name!r} and {surgery.name!r} both replace attention; "
                            "give them disjoint `layers`."
                        )
                    plan.replace = surgery
            if plan.replace is not None and (plan.logits or plan.probs or plan.normalizer):
                others = {s.name for s in [*plan.logits, *plan.probs]} | (
                    {plan.normalizer.name} if plan.normalizer else set()
                )
                raise SurgeryConfigError(
                    f"layer {idx}: {plan.replace.name!r} replaces attention, so {sorted(others)} have no softmax "
                    "probabilities to act on there. Give them disjoint `layers`."
                )
            plans.append(plan.freeze())
        return plans

    def _apply(self, plans: list[LayerPlan]) -> None:
        for module, plan in zip(self.info.attention, plans):
            module.attnsurgery_layer = plan

    # -- attention maps --------------------------------------------------------------------------------------
    def recording(self, layer_idx: int) -> list[torch.Tensor] | None:
        if self._record is None or layer_idx not in self._record:
            return None
        return self._maps.setdefault(layer_idx, [])

    def start_recording(self, layers: set[int]) -> None:
        if not self._installed:
            self._install()
            self.refresh()
        self._record, self._maps = set(layers), {}

    def stop_recording(self) -> dict[int, list[torch.Tensor]]:
        maps, self._record, self._maps = self._maps, None, {}
        if not self.surgeries:
            self._uninstall()
        return maps
