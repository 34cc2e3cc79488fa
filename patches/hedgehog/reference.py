"""Plain quadratic Hedgehog / LoLCATs attention, written the way the paper's reference code computes it: full
n x n softmax and linear score matrices, a window mask and a linear mask, float64. The chunked kernel
(:mod:`.kernel`) and the decode path are tested against it.

LoLCATs (Zhang et al., ICLR 2025, arXiv 2410.10254), ``hybrid_attention_quadratic``; Hedgehog (Zhang et al.,
ICLR 2024, arXiv 2402.04347) is the ``window=0`` case.
"""

from __future__ import annotations

import torch


def feature_map_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[softmax(x W), softmax(-x W)]`` head by head in float64 (x (B, H, T, D), weight (H, D, F))."""
    out = []
    for h in range(x.shape[1]):
        proj = x[:, h].double() @ weight[h].double()  # (B, T, F)
        out.append(torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1).clamp(min=1e-12))
    return torch.stack(out, dim=1)


def hybrid_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    window: int | None,
    gamma: torch.Tensor | float,
    linear_factor: torch.Tensor | float,
    scaling: float,
    softcap: float | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, H, T, D) float64 outputs for T queries against the same T keys (causal), ``key_valid`` (B, T) marking
    real keys (padding is masked out of both parts)."""
    q, k, v, fq, fk = (x.double() for x in (q, k, v, fq, fk))
    b, h, t, _ = q.shape
    gamma = torch.as_tensor(gamma, dtype=torch.float64).reshape(-1, 1, 1) if torch.is_tensor(gamma) else gamma
    lam = (
        torch.as_tensor(linear_factor, dtype=torch.float64).reshape(-1, 1, 1)
        if torch.is_tensor(linear_factor)
        else linear_factor
    )
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    if window is None:
        linear = torch.zeros(t, t, dtype=torch.bool)
    else:
        linear = torch.ones(t, t, dtype=torch.bool).tril(-window)
    win = causal & ~linear
    out = torch.zeros(b, h, t, v.shape[-1], dtype=torch.float64)
    for i in range(b):
        valid = torch.ones(t, dtype=torch.bool) if key_valid is None else key_valid[i].bool()
        w_mask, l_mask = win & valid[None, :], linear & valid[None, :]
        s = q[i] @ k[i].transpose(-1, -2) * scaling  # (H, T, T)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        s = s.masked_fill(~w_mask, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        a_sm = gamma * torch.exp(s - m) if window != 0 else torch.zeros_like(s)
        a_ln = lam * (fq[i] @ fk[i].transpose(-1, -2)).masked_fill(~l_mask, 0.0)
        a = a_sm + a_ln
        den = a.sum(-1, keepdim=True)
        out[i] = torch.where(den > 0, (a @ v[i]) / den.clamp(min=1e-300), torch.zeros(()))
    return out
