"""Plain MoH, written the way the released code does it: every head is computed by the model's own attention and
each head's slice of the ``o_proj`` input is multiplied by its gate (MoH-LLaMA3 ``modeling_llama.py``: ``einsum
("bne,bned->bned", mask, attn_output)``). Routing is computed head by head in float64 from hooks on a stock
model: the query-norm router on the query projection's output *before RoPE* (after ``q_norm`` on QK-norm models,
as attention uses it), with the released chain ``softmax(norm / std(norm))`` -> top-k; the learned router from the
hidden state the attention module receives, with the MoH-ViT formulas. The fast engine path is tested against it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

_OUT_PROJ = ("o_proj", "out_proj", "c_proj")


def query_norm_mask(query: torch.Tensor, shared: int, top_k: int) -> torch.Tensor:
    """(B, T, H) float64 0/1 gates from the pre-RoPE query (B, T, H, D), as the released router computes them:
    per token the L2 norm of each routed head's query, divided by the norms' (unbiased) std across routed heads,
    softmax, top-k; shared heads 1."""
    q = query.double()
    B, T, H, _ = q.shape
    logits = torch.stack([q[:, :, h].norm(p=2, dim=-1) for h in range(shared, H)], dim=-1)  # (B, T, E)
    if logits.shape[-1] > 1:
        logits = logits / logits.std(dim=-1, keepdim=True)
    gates = torch.softmax(logits, dim=-1)
    top = gates.topk(top_k, dim=-1).indices
    routed = torch.nn.functional.one_hot(top, logits.shape[-1]).sum(-2).double()
    return torch.cat([torch.ones(B, T, shared, dtype=torch.float64), routed], dim=-1)


def learned_gates(
    hidden: torch.Tensor,
    routed: torch.Tensor,
    shared_w: torch.Tensor | None,
    balance: torch.Tensor | None,
    shared: int,
    top_k: int,
    binary: bool,
) -> torch.Tensor:
    """(B, T, H) float64 gates of the paper's router (MoH-ViT ``attention.py``) from the hidden state (B, T, hidden):
    routed ``softmax(W_r x)``, top-k, renormalised over the kept ones, times k; shared ``softmax(W_s x) * h_s`` (ones
    for one shared head); ``[a1, a2] = 2 softmax(W_h x)``; ``binary``: the 0/1 mask of the same choice."""
    x = hidden.double()
    probs = torch.softmax(x @ routed.double().T, dim=-1)  # (B, T, E)
    E = probs.shape[-1]
    top = probs.topk(top_k, dim=-1).indices
    mask = torch.nn.functional.one_hot(top, E).sum(-2).double()
    B, T = x.shape[:2]
    if binary:
        return torch.cat([torch.ones(B, T, shared, dtype=torch.float64), mask], dim=-1)
    kept = probs * mask
    r = kept / kept.sum(-1, keepdim=True) * top_k
    if shared == 0:
        return r
    s = torch.softmax(x @ shared_w.double().T, -1) * shared if shared > 1 else torch.ones(B, T, 1).double()
    a = torch.softmax(x @ balance.double().T, dim=-1) * 2
    return torch.cat([a[..., :1] * s, a[..., 1:] * r], dim=-1)


def _out_proj(attention: nn.Module) -> nn.Module:
    for name in _OUT_PROJ:
        if hasattr(attention, name):
            return getattr(attention, name)
    raise ValueError(f"{type(attention).__name__}: no output projection among {_OUT_PROJ}")


def _pre_rope_query(module: nn.Module, hidden: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """(B, T, H, D) the layer's query before RoPE: its query projection (GPT-2: the first third of ``c_attn``), then
    ``q_norm`` where the model has one (per head, or over all heads as OLMo2)."""
    if hasattr(module, "q_proj"):
        q = module.q_proj(hidden)
    else:  # GPT-2's fused c_attn: [query | key | value]
        q = module.c_attn(hidden)[..., : num_heads * head_dim]
    q_norm = getattr(module, "q_norm", None)
    if q_norm is not None and q_norm.weight.shape[-1] == num_heads * head_dim:
        q = q_norm(q)
    q = q.unflatten(-1, (num_heads, head_dim))
    if q_norm is not None and q_norm.weight.shape[-1] == head_dim:
        q = q_norm(q)
    return q


@contextmanager
def moh_reference(
    model: Any,
    layers: list[int],
    shared: int,
    top_k: int,
    router: Mapping[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] | None = None,
    binary: bool = True,
) -> Iterator[dict[int, torch.Tensor]]:
    """Inside the block, ``model`` (unpatched, any attention implementation) runs as MoH on ``layers``: the
    query-norm router when ``router`` is None, else the learned one with ``router[layer] = (W_r, W_s, W_h)``.
    Yields {layer: gates (B, T, H) float64} of the latest forward."""
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
            x = captured[layer]
            with torch.no_grad():
                if router is None:
                    q = _pre_rope_query(attention[layer], x, num_heads, head_dim)
                    g = query_norm_mask(q, shared, top_k)
                else:
                    w_r, w_s, w_h = router[layer]
                    g = learned_gates(x, w_r, w_s, w_h, shared, top_k, binary)
            gates[layer] = g
            out = y.unflatten(-1, (num_heads, head_dim)) * g.to(y.dtype)[..., None]
            return (out.flatten(-2), *args[1:])

        return hook

    try:
        for layer in layers:
            handles.append(attention[layer].register_forward_pre_hook(read_x(layer), with_kwargs=True))
            handles.append(_out_proj(attention[layer]).register_forward_pre_hook(apply_gate(layer)))
        yield gates
    finally:
        for handle in handles:
            handle.remove()
