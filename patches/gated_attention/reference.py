"""Plain gated attention, written the way the papers describe it: hooks on a stock model's attention modules
(to read X, the hidden state each receives) and on their output projections (to multiply each head's slice of
the ``o_proj`` input by its gate), with the gates computed head by head in float64. The engine path (a
head-output stage on transformers' attention seam, fp32 gates) is tested against it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: names of the output projection in the supported architectures (Llama/Qwen2/Gemma-3, OPT, GPT-2)
_OUT_PROJ = ("o_proj", "out_proj", "c_proj")


def gate_reference(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    form: str,
    num_heads: int,
    head_dim: int,
    gate_scale: float,
    heads: list[int] | None = None,
) -> torch.Tensor:
    """(B, T, H, D) float64 gates, one head at a time.

    ``elementwise``: head h's channels use rows ``h*D:(h+1)*D`` of weight (H*D, hidden) on the whole X;
    ``headwise``: row h of weight (H, hidden) on the whole X; ``head_slice``: row h of weight (H, hidden/H) on
    X's h-th slice of width hidden/H. ``gate = gate_scale * sigmoid(logit)``; heads not in ``heads`` get 1.
    """
    x, w, b = hidden_states.double(), weight.double().cpu(), bias.double().cpu()
    x = x.cpu()
    B, T, hidden = x.shape
    gates = torch.ones(B, T, num_heads, head_dim, dtype=torch.float64)
    for h in range(num_heads):
        if heads is not None and h not in heads:
            continue
        if form == "elementwise":
            rows = slice(h * head_dim, (h + 1) * head_dim)
            logit = x @ w[rows].T + b[rows]  # (B, T, D)
        elif form == "headwise":
            logit = (x @ w[h] + b[h])[..., None]  # (B, T, 1)
        elif form == "head_slice":
            width = hidden // num_heads
            logit = (x[..., h * width : (h + 1) * width] @ w[h] + b[h])[..., None]  # (B, T, 1)
        else:
            raise ValueError(form)
        gates[:, :, h] = gate_scale * torch.sigmoid(logit)
    return gates


def _out_proj(attention: nn.Module) -> nn.Module:
    for name in _OUT_PROJ:
        if hasattr(attention, name):
            return getattr(attention, name)
    raise ValueError(f"{type(attention).__name__}: no output projection among {_OUT_PROJ}")


@contextmanager
def gated_reference(
    model: Any,
    params: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    form: str,
    gate_scale: float,
    heads: Mapping[int, list[int]] | None = None,
) -> Iterator[dict[int, torch.Tensor]]:
    """Inside the block, ``model`` (any attention implementation, unpatched or with other surgeries) runs with
    gates: ``params`` maps layer -> (weight, bias). Yields {layer: gates (B, T, H, D)} of the latest forward."""
    config = model.config.get_text_config()
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    attention = {m.layer_idx: m for m in model.modules() if type(m).__name__.endswith("Attention")}
    captured: dict[int, torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    handles = []

    def read_x(layer: int):
        def hook(module, args, kwargs):
            captured[layer] = args[0] if args else kwargs["hidden_states"]

        return hook

    def apply_gate(layer: int):
        def hook(module, args):
            y = args[0]  # (B, T, H*D): the heads' outputs side by side, as o_proj receives them
            weight, bias = params[layer]
            layer_heads = None if heads is None else list(heads[layer])
            g = gate_reference(
                captured[layer], weight, bias, form, num_heads, head_dim, gate_scale, layer_heads
            )
            gates[layer] = g
            out = y.unflatten(-1, (num_heads, head_dim)) * g.to(device=y.device, dtype=y.dtype)
            return (out.flatten(-2), *args[1:])

        return hook

    try:
        for layer in params:
            handles.append(attention[layer].register_forward_pre_hook(read_x(layer), with_kwargs=True))
            handles.append(_out_proj(attention[layer]).register_forward_pre_hook(apply_gate(layer)))
        yield gates
    finally:
        for handle in handles:
            handle.remove()
