"""Which layers and heads a surgery acts on.

``layers`` uses Python slice semantics over decoder layers: ``"2:30"`` is layers 2..29, ``"-14:"`` the last
fourteen, ``"1,18:32"`` a union, ``[0, 5]`` a list, ``None`` all. ``heads`` is ``None`` (all query heads), a list
applied to every targeted layer, or ``{layer: [heads]}``; a dict with ``layers=None`` targets exactly its keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SurgeryConfigError


@dataclass(frozen=True)
class LayerHeads:
    layers: frozenset[int]
    heads: Mapping[int, tuple[int, ...]] | None  # None: all heads on every targeted layer
    num_layers: int
    num_heads: int

    def heads_of(self, layer: int) -> tuple[int, ...] | None:
        """Targeted heads of a layer, or None for all heads."""
        if self.heads is None:
            return None
        return self.heads.get(layer, ())

    def head_mask(self, layer: int, device: torch.device | None = None) -> torch.Tensor:
        """(H,) bool: which query heads are targeted on ``layer``."""
        mask = torch.zeros(self.num_heads, dtype=torch.bool, device=device)
        if layer in self.layers:
            heads = self.heads_of(layer)
            if heads is None:
                mask[:] = True
            else:
                mask[list(heads)] = True
        return mask

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": sorted(self.layers),
            "heads": None if self.heads is None else {str(k): list(v) for k, v in sorted(self.heads.items())},
        }

    def __str__(self) -> str:
        layers = sorted(self.layers)
        text = "all layers" if len(layers) == self.num_layers else f"layers {compact_ranges(layers)}"
        if self.heads is None:
            return f"{text}, all heads"
        return f"{text}, {sum(len(v) for v in self.heads.values())} (layer, head) pairs"


def compact_ranges(values: list[int]) -> str:
    """[2,3,4,7] -> '2-4,7'."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def _one(spec: Any, num_layers: int) -> Iterable[int]:
    if isinstance(spec, bool):
        raise SurgeryConfigError(f"layers: {spec!r} is not a layer index or slice.")
    if isinstance(spec, int):
        idx = spec + num_layers if spec < 0 else spec
        if not 0 <= idx < num_layers:
            raise SurgeryConfigError(
                f"layers: layer {spec} is out of range; this model has {num_layers} layers (0..{num_layers - 1})."
            )
        return [idx]
    if isinstance(spec, str):
        spec = spec.strip()
        if ":" in spec:
            parts = spec.split(":")
            if len(parts) > 3:
                raise SurgeryConfigError(f"layers: {spec!r} is not a slice like '2:30' or '-14:'.")
            try:
                bounds = [int(p) if p.strip() else None for p in parts]
            except ValueError:
                raise SurgeryConfigError(f"layers: {spec!r} is not a slice like '2:30' or '-14:'.") from None
            if len(bounds) == 3 and bounds[2] == 0:
                raise SurgeryConfigError(
                    f"layers: slice {spec!r} has step 0; use a step of 1 or more ('2:30:2')."
                )
            for b in bounds[:2]:
                if b is not None and not -num_layers <= b <= num_layers:
                    raise SurgeryConfigError(
                        f"layers: slice {spec!r} reaches past this model's {num_layers} layers."
                    )
            picked = range(num_layers)[slice(*bounds)]
            if len(picked) == 0:
                raise SurgeryConfigError(f"layers: slice {spec!r} selects no layer of {num_layers}.")
            return picked
        try:
            index = int(spec)
        except ValueError:
            raise SurgeryConfigError(
                f"layers: {spec!r} is not a layer index, slice ('2:30') or list ('1,18:32')."
            ) from None
        return _one(index, num_layers)  # its range error names the model's layers
    raise SurgeryConfigError(f"layers: {spec!r} is not a layer index, slice or list.")


def parse_layers(spec: Any, num_layers: int) -> frozenset[int]:
    if spec is None or spec == "all":
        return frozenset(range(num_layers))
    if isinstance(spec, str) and "," in spec:
        spec = [s for s in spec.split(",") if s.strip()]
    if isinstance(spec, (list, tuple, set, frozenset, range)):
        if len(spec) == 0:  # patching nothing without a word would hide a mistake
            raise SurgeryConfigError(
                "layers: an empty list selects no layer; omit layers (every layer) or name some ('2:', [0, 5])."
            )
        out: set[int] = set()
        for s in spec:
            out.update(_one(s, num_layers))
        return frozenset(out)
    return frozenset(_one(spec, num_layers))


def _head_list(spec: Any, num_heads: int, where: str) -> tuple[int, ...]:
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    text = spec if isinstance(spec, str) else None
    if text is not None:
        if text.strip().startswith("[") != text.strip().endswith("]"):
            raise SurgeryConfigError(
                f"heads{where}: {text!r} is not a list of head indices; write '0,3' or '[0, 3]' (brackets closed)."
            )
        spec = [s.strip(" []") for s in text.split(",") if s.strip(" []")]
    if not isinstance(spec, (list, tuple, set, frozenset, range)):
        raise SurgeryConfigError(f"heads{where}: {spec!r} is not a list of head indices.")
    if len(spec) == 0 and not where:  # {layer: []} is a calibrated layer where no head passed: kept
        raise SurgeryConfigError(
            f"heads{where}: an empty list selects no head; omit heads (every head) or name some ([0, 3])."
        )
    out = []
    for h in spec:
        raw = h
        if (
            isinstance(h, bool) or isinstance(h, float) and not h.is_integer()
        ):  # True, 0.5: not a silent 1 / 0
            raise SurgeryConfigError(f"heads{where}: {raw!r} is not a head index (a whole number).")
        try:
            h = int(h)
        except (TypeError, ValueError):
            raise SurgeryConfigError(f"heads{where}: {raw!r} is not a head index.") from None
        if not 0 <= h < num_heads:
            raise SurgeryConfigError(
                f"heads{where}: head {h} is out of range; this model has {num_heads} query heads "
                f"(0..{num_heads - 1})."
            )
        out.append(h)
    return tuple(sorted(set(out)))


def resolve_targets(layers: Any, heads: Any, num_layers: int, num_heads: int) -> LayerHeads:
    """Validate ``layers``/``heads`` against the model and normalise them."""
    if heads is None or heads == "all":
        return LayerHeads(parse_layers(layers, num_layers), None, num_layers, num_heads)
    if isinstance(heads, Mapping):
        per_layer: dict[int, tuple[int, ...]] = {}
        for key, value in heads.items():
            for layer in parse_layers(key, num_layers):
                per_layer[layer] = tuple(
                    sorted(set(per_layer.get(layer, ())) | set(_head_list(value, num_heads, f"[{key}]")))
                )
        chosen = frozenset(per_layer) if layers is None else parse_layers(layers, num_layers)
        extra = set(per_layer) - chosen
        if extra:
            raise SurgeryConfigError(
                f"heads names layers {sorted(extra)} that are outside layers={layers!r}; drop them or widen layers."
            )
        return LayerHeads(chosen, {k: per_layer.get(k, ()) for k in chosen}, num_layers, num_heads)
    chosen = parse_layers(layers, num_layers)
    head_list = _head_list(heads, num_heads, "")
    return LayerHeads(chosen, {k: head_list for k in chosen}, num_layers, num_heads)


def per_layer_head(value: Any, name: str, num_layers: int, num_heads: int, fill: float) -> torch.Tensor:
    """(L, H) float64 table from a number, a per-head list, or {layer: number | list}."""
    table = torch.full((num_layers, num_heads), float(fill), dtype=torch.float64)

    def row(v: Any, where: str) -> torch.Tensor:
        t = torch.as_tensor(v, dtype=torch.float64)
        if t.dim() == 0:
            return t.expand(num_heads)
        if t.shape != (num_heads,):
            raise SurgeryConfigError(
                f"{name}{where}: a per-head list needs {num_heads} values (one per query head), got {t.numel()}."
            )
        return t

    if isinstance(value, Mapping):
        for key, v in value.items():
            try:
                layer = int(key)
                if isinstance(key, bool) or isinstance(key, float) and not key.is_integer():
                    raise ValueError
            except (TypeError, ValueError):
                raise SurgeryConfigError(
                    f"{name}: {{{key!r}: ...}} does not name a layer; the keys of {{layer: value}} are layer indices "
                    f"(0..{num_layers - 1}, or negative from the end)."
                ) from None
            if not -num_layers <= layer < num_layers:
                raise SurgeryConfigError(
                    f"{name}: layer {key} is out of range (model has {num_layers} layers)."
                )
            table[layer] = row(v, f"[{key}]")
    else:
        table[:] = row(value, "")
    return table


def _linear_like(module: Any) -> bool:
    from torch import nn

    # nn.Linear covers bitsandbytes' Linear8bitLt / Linear4bit (subclasses); Conv1D is GPT-2's projection
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_projections(
    model: Any, info: Any, layers: Iterable[int], wanted: list[str] | None, who: str
) -> list[str]:
    """Full module names of the linear projections called ``wanted`` (leaf names such as ``q_proj``, or paths
    inside a decoder layer such as ``self_attn.q_proj``) in the decoder ``layers``; ``None`` means every projection
    of the attention module, whatever the architecture calls them (q/k/v/o_proj, GPT-2's c_attn/c_proj, OPT's
    out_proj ...). Unknown names fail with a did-you-mean naming ``who`` (the surgery asking)."""
    from .errors import did_you_mean

    layers = sorted(layers)
    if wanted is None:
        first = info.attention[layers[0]] if layers else None
        wanted = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in (first.named_modules() if first else [])
                if n and _linear_like(m)
            }
        )
    if not wanted:
        raise SurgeryConfigError(
            f"{who}: `targets` is empty; name at least one projection, e.g. q_proj,v_proj."
        )
    prefix = {id(m): n for n, m in model.named_modules()}
    found: dict[str, list[str]] = {}  # asked-for name -> full module names in the targeted layers
    available: set[str] = set()
    for idx in layers:
        layer = info.layers[idx]
        for sub, module in layer.named_modules():
            if not sub or not _linear_like(module):
                continue
            leaf = sub.rsplit(".", 1)[-1]
            available.add(leaf)
            if leaf in wanted or sub in wanted:
                found.setdefault(leaf if leaf in wanted else sub, []).append(f"{prefix[id(layer)]}.{sub}")
    missing = [n for n in wanted if n not in found]
    if missing:
        name = missing[0]
        raise SurgeryConfigError(
            f"{who}: no projection named {name!r} in the targeted layers of {type(model).__name__}."
            f"{did_you_mean(name, available)} Available: {', '.join(sorted(available))}."
        )
    return sorted(n for full in found.values() for n in full)


def module_device(module: Any) -> torch.device | None:
    """Where a layer's weights live, for a surgery's per-layer parameters (None for a module offloaded to meta: the
    parameters then stay on the CPU)."""
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return None


def name_list(targets: Any) -> list[str] | None:
    """``"q_proj, v_proj"`` or ``["q_proj", "v_proj"]`` -> ``["q_proj", "v_proj"]``; ``None`` stays ``None``."""
    if targets is None:
        return None
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    return [str(n).strip() for n in names if str(n).strip()]
