"""The one abstraction: a surgery declares *where* in attention it acts.

Attention is a pipeline; a surgery overrides the stage methods it needs and lists them in ``stages``:

====================  =========================================  ====================================
stage                 method                                     backend the engine can keep
====================  =========================================  ====================================
``Stage.QUERY``       ``query(query, scaling, call)``            fused SDPA (fold into q / scaling)
``Stage.LOGITS``      ``logits(scores, tile)``                   tiled over query blocks
``Stage.NORMALIZE``   ``normalize(scores, tile)`` (replaces      tiled over query blocks
                      softmax; at most one per layer)
``Stage.PROBS``       ``probs(probs, tile)``                     tiled, or the surgery's own exact
                                                                 ``attention()`` kernel
``Stage.HEAD_OUTPUT`` ``head_output(attn_output, call)``         fused SDPA (scale per head)
``Stage.REPLACE``     ``attention(query, key, value, call)``     the surgery's own kernel
====================  =========================================  ====================================

Order on a layer: all ``QUERY`` stages (in patch order), then the core attention (one ``REPLACE`` surgery, or
``LOGITS`` -> ``NORMALIZE`` -> ``PROBS`` on the tiled path, or the stock kernel), then all ``HEAD_OUTPUT``
stages. A surgery can act on only some layers (``layers=``) and heads (``heads=``); the engine routes each
layer to the cheapest backend that is exact for the surgeries active there.

A new surgery is one folder under ``patches/`` with a config dataclass and a ``Surgery`` subclass; see
``patches/head_scale`` for the smallest one.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import SurgeryConfigError, did_you_mean
from .targeting import LayerHeads


class Stage(enum.Enum):
    QUERY = "query"
    LOGITS = "logits"
    NORMALIZE = "normalize"
    PROBS = "probs"
    HEAD_OUTPUT = "head_output"
    REPLACE = "replace"
    #: outside the attention function: the surgery changes the layer's projection modules (LoRA adapters); the
    #: engine routes nothing for it, and ``teardown`` undoes its module changes
    WEIGHTS = "weights"


#: stages that need the attention probabilities (or their logits) as tensors
PROBABILITY_STAGES = frozenset({Stage.LOGITS, Stage.NORMALIZE, Stage.PROBS})


# ----------------------------------------------------------------------------------------------------------
# Configs: dataclasses whose fields declare their valid range, so every surgery validates the same way.
# ----------------------------------------------------------------------------------------------------------


def arg(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple | None = None,
    kind: str | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A documented config field with an optional numeric range ``[low, high]`` (ends open on request).

    The field's type hint says what values it takes, and :meth:`SurgeryConfig.validate` coerces them once (numbers
    in any float syntax, as YAML 1.1 and ``--arg`` leave ``5e-1`` a string) or refuses them with the name, the value
    and the expected type. A field typed ``Any`` declares ``kind``: ``"numbers"`` (a number, a per-head list or
    ``{layer: number | list}``) or ``"names"`` (a string, comma-separated, or a list of strings)."""
    if kind not in (None, "numbers", "names"):
        raise ValueError(f"arg(kind={kind!r}): use 'numbers', 'names' or None")
    meta = {
        "doc": doc,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "choices": choices,
        "kind": kind,
    }
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _range_text(meta: Mapping[str, Any]) -> str:
    lo, hi = meta["low"], meta["high"]
    left = "(" if meta["low_open"] else "["
    right = ")" if meta["high_open"] or hi is None else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


_EXPECTED = {
    bool: "true or false",
    int: "a whole number (e.g. 8)",
    float: "a number (e.g. 0.5 or 5e-1)",
    str: "a string",
    "numbers": "a number, a list of numbers (one per head) or {layer: number | list}",
    "names": "a name, comma-separated names or a list of names",
}


class _Refused(Exception):
    """A value that is not of the field's type (turned into a SurgeryConfigError naming the field)."""


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise _Refused
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            raise _Refused from None
    else:
        raise _Refused
    if math.isnan(x):
        raise _Refused
    return x


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    x = _to_float(value)
    if not x.is_integer():
        raise _Refused
    return int(x)


def _to_numbers(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or bool(torch.isnan(value).any()):
            raise _Refused
        return value
    if isinstance(value, Mapping):
        return {k: _to_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if not value:
            raise _Refused
        return [_to_numbers(v) if isinstance(v, (list, tuple)) else _to_float(v) for v in value]
    return _to_float(value)


def _to_names(value: Any) -> Any:
    if value is None or isinstance(value, str) and value.strip():
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return list(value)
    raise _Refused


def _field_type(hint: Any, kind: str | None) -> tuple[Any, bool]:
    """``(base type, accepts None)`` of a config field: bool, int, float, str, "ints", "numbers", "names" or None
    (anything)."""
    if kind is not None:
        return kind, kind == "names"
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        hint
    )
    if optional:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else None
    if typing.get_origin(hint) is list and typing.get_args(hint) == (int,):
        return "ints", optional
    return (hint if hint in (bool, int, float, str) else None), optional


def _expected(base: Any, optional: bool) -> str:
    what = {**_EXPECTED, "ints": "a list of whole numbers"}.get(base, "a value of the documented type")
    return what + (" or none" if optional and base != "names" else "")


def _coerce(base: Any, optional: bool, value: Any) -> Any:
    """``value`` as the field's type; raises :class:`_Refused`."""
    if optional and (value is None or isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return None
    if base == "numbers":
        return _to_numbers(value)
    if base == "names":
        return _to_names(value)
    if base == "ints":
        if not isinstance(value, (list, tuple)):
            raise _Refused
        return [_to_int(v) for v in value]
    if base is bool and not isinstance(value, bool):  # not 1 / 0 / 'maybe': bools only as bools
        raise _Refused
    if base is str and not isinstance(value, str):
        raise _Refused
    if base is int:
        return _to_int(value)
    if base is float:
        return _to_float(value)
    return value


def numbers_in(value: Any) -> list[float]:
    """Every number inside a scalar / list / {layer: value} structure (for range checks)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, torch.Tensor):
        return value.detach().flatten().tolist()
    if isinstance(value, Mapping):
        return [x for v in value.values() for x in numbers_in(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in numbers_in(v)]
    return []


@dataclass
class SurgeryConfig:
    """Base class of every surgery's arguments. Subclasses are dataclasses built from :func:`arg` fields."""

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_kwargs(cls, surgery: str, kwargs: Mapping[str, Any]) -> SurgeryConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in names:
                raise SurgeryConfigError(
                    f"{surgery}: unknown argument {key!r}.{did_you_mean(key, names)} "
                    f"Valid arguments: {', '.join(names) or '(none)'} (plus the common 'layers' and 'heads')."
                )
        try:
            return cls(**kwargs)
        except SurgeryConfigError as err:
            raise SurgeryConfigError(f"{surgery}: {err}") from None

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if not meta:
                continue
            base, optional = _field_type(hints.get(f.name), meta.get("kind"))
            try:
                coerced = _coerce(base, optional, value)
            except _Refused:
                what = _expected(base, optional)
                if meta.get("choices") is not None:
                    what = f"one of {list(meta['choices'])}"
                raise SurgeryConfigError(
                    f"argument {f.name}={value!r} ({type(value).__name__}) must be {what}. {meta['doc']}"
                ) from None
            if coerced is not value:
                value = coerced
                object.__setattr__(self, f.name, value)
            if meta.get("choices") is not None and value not in meta["choices"]:
                raise SurgeryConfigError(
                    f"argument {f.name}={value!r} is not one of {list(meta['choices'])}.{did_you_mean(str(value), map(str, meta['choices']))}"
                )
            lo, hi = meta.get("low"), meta.get("high")
            if lo is None and hi is None:
                continue
            for x in numbers_in(value):
                bad = not math.isfinite(x)  # the range text says "inf)": tau=inf or scale=inf are no settings
                bad = bad or (lo is not None and (x < lo or (meta["low_open"] and x == lo)))
                bad = bad or (hi is not None and (x > hi or (meta["high_open"] and x == hi)))
                if bad:
                    shown = value if isinstance(value, (int, float)) else x  # r=0 as given, not as 0.0
                    raise SurgeryConfigError(
                        f"argument {f.name}={shown!r} is out of range: it must lie in {_range_text(meta)}. "
                        f"{meta['doc']}"
                    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly arguments (tensors become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, torch.Tensor) else v
        return out

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(name, default, doc) for each argument, for ``attnsurgery list -v``."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            doc = f.metadata.get("doc", "")
            if f.metadata.get("low") is not None or f.metadata.get("high") is not None:
                doc = f"{doc} Range {_range_text(f.metadata)}."
            rows.append((f.name, repr(default), doc))
        return rows


# ----------------------------------------------------------------------------------------------------------
# What a surgery sees at run time
# ----------------------------------------------------------------------------------------------------------


@dataclass
class AttentionCall:
    """One call of one attention layer: the live module plus the per-request side channel.

    Shapes follow transformers: ``query`` (B, H, Tq, D), ``key``/``value`` (B, Hkv, Tk, D) not GQA-expanded.
    """

    module: nn.Module
    layer_idx: int
    num_heads: int
    num_kv_heads: int
    query_len: int
    key_len: int
    attention_mask: torch.Tensor | None
    is_causal: bool
    request: Any  # attnsurgery.request.RequestState
    kwargs: dict[str, Any]
    # the core attention's inputs (after query stages), for surgeries that need more than their own tile
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    scaling: float | None = None
    scratch: dict[str, Any] = field(default_factory=dict)  # per-call memo (e.g. a sink set shared by tiles)

    @property
    def positions(self) -> torch.Tensor:
        """(B, Tq) index of each query among its row's real (unpadded) tokens, absolute under a KV cache.

        ``n_i = positions + 1`` is the number of real tokens a causal query sees.
        """
        return self.request.query_positions(self.query_len, self.key_len)

    @property
    def query_valid(self) -> torch.Tensor:
        """(B, Tq) bool: which query rows are real tokens (padding rows are False)."""
        return self.request.query_valid(self.query_len, self.key_len)


@dataclass
class AttentionTile:
    """A block of query rows on the tiled path: queries ``[q_start, q_end)`` against keys ``[k_start, k_end)``."""

    call: AttentionCall
    q_start: int
    q_end: int
    k_start: int
    k_end: int
    allowed: torch.Tensor  # bool, broadcastable to (B, H, q_end - q_start, k_end - k_start)

    @property
    def positions(self) -> torch.Tensor:
        return self.call.positions[:, self.q_start : self.q_end]


# ----------------------------------------------------------------------------------------------------------
# The surgery base class
# ----------------------------------------------------------------------------------------------------------


class Surgery(nn.Module):
    """Base class of all surgeries. One instance covers all targeted layers of one model.

    Subclasses set ``name``, ``config_class``, ``summary``, ``paper`` and ``stages`` and override the stage
    methods they list. Trainable or calibrated state lives in ordinary parameters/buffers of the surgery (so it
    saves as safetensors); per-layer tensors are indexed by layer.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[SurgeryConfig]] = SurgeryConfig
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    stages: ClassVar[frozenset[Stage]] = frozenset()
    #: True when ``attention()`` computes this surgery's probability-level edit exactly on a fused kernel;
    #: the engine uses it when this is the only probability-level surgery on a layer.
    fused: ClassVar[bool] = False
    #: non-identity arguments that visibly change the model (used in docs and the shared test matrix)
    example_args: ClassVar[dict[str, Any]] = {}
    #: arguments that make the surgery the identity (empty: the defaults are the identity)
    identity_args: ClassVar[dict[str, Any]] = {}
    #: True for surgeries whose decisions use the whole prompt (ACT detects sinks from every query's attention):
    #: a later token can then change earlier positions' outputs, and prefill + cached decode is not one full
    #: forward. They document both and test them in their own files instead of the shared causal/decode tests.
    prompt_adaptive: ClassVar[bool] = False

    def __init__(self, config: SurgeryConfig, targets: LayerHeads) -> None:
        super().__init__()
        self.config = config
        self.targets = targets

    def resolved_args(self) -> dict[str, Any]:
        """The arguments as they apply on this model (what a handle's repr shows): defaults that resolve to a value
        are named by it (ACT's threshold None is 0.1). A surgery whose defaults resolve only once it knows the model
        (MoH's head split) overrides this; its ``setup`` has run by then."""
        return getattr(self.config, "resolved_args", self.config.to_dict)()

    # -- life cycle ---------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, engine: Any) -> None:
        """Called once when the surgery is installed (build per-layer tensors, register hooks via engine)."""

    def teardown(self, model: nn.Module, engine: Any) -> None:
        """Called once when the surgery is removed (or its ``setup`` failed): undo what ``setup`` changed outside
        the engine's hooks (e.g. swap LoRA-wrapped projections back). Hooks registered through the engine go by
        themselves."""

    def set_enabled(self, enabled: bool) -> None:
        """Switch module-level effects (LoRA adapters) off and on again for :meth:`Engine.disabled` (the trainer's
        teacher pass); the attention stages are switched by the engine itself."""

    def check_state(self) -> None:
        """Called after a saved state (a recipe's ``state:`` file, :func:`load_surgery`) is loaded: refuse values the
        arguments could not have produced, with a :class:`SurgeryConfigError` naming the tensor and the range. A
        state file must not be a back door around argument validation. The default refuses non-finite floats;
        surgeries whose state mirrors a ranged argument check that range too."""
        for key, value in self.state_dict().items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise SurgeryConfigError(
                    f"{self.name}: saved tensor {key!r} holds non-finite values (NaN or inf); it cannot be loaded."
                )

    def active_stages(self, layer_idx: int) -> frozenset[Stage]:
        """Stages this surgery runs on a layer; empty means the layer is untouched by it."""
        return self.stages if layer_idx in self.targets.layers else frozenset()

    # -- stages (override those listed in ``stages``) -------------------------------------------------------
    def query(self, query: torch.Tensor, scaling: float, call: AttentionCall) -> tuple[torch.Tensor, float]:
        return query, scaling

    def logits(self, scores: torch.Tensor, tile: AttentionTile) -> torch.Tensor:
        return scores

    def normalize(self, scores: torch.Tensor, tile: AttentionTile) -> torch.Tensor:
        raise NotImplementedError

    def probs(self, probs: torch.Tensor, tile: AttentionTile) -> torch.Tensor:
        return probs

    def head_output(self, attn_output: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        return attn_output

    def attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, call: AttentionCall
    ) -> torch.Tensor:
        """Own kernel for ``REPLACE`` (or a ``fused`` probability edit): returns attn_output (B, Tq, H, D). A
        ``fused`` probability edit may return None for a call its kernel does not cover: the engine then runs it
        on the tiled path."""
        raise NotImplementedError

    # -- training (see :mod:`attnsurgery.train`) ----------------------------------------------------------
    def regularizer(self) -> torch.Tensor | None:
        """An extra loss term the trainer adds to the objective (e.g. MoH's load balance, a gate sparsity
        penalty), computed from what the surgery recorded during the last forward; ``None`` when it has none.

        The trainer trains every ``nn.Parameter`` of the surgery that has ``requires_grad``; a surgery declares
        trainable state simply by holding parameters.
        """
        return None

    def export(self, model: nn.Module, directory: Path) -> Path | None:
        """Write what else a trained state of this surgery is useful as, into a new ``directory`` (the trainer
        passes ``<run>/<name>.tmp`` and renames it), and return the folder name it ships under; ``None`` (the
        default) writes nothing. LoRA writes a standard peft adapter (``adapter/``), loadable without
        attnsurgery. The run's recipe and state files are written regardless."""
        return None

    def extra_repr(self) -> str:
        return f"{self.name}: {self.config}, {self.targets}"
