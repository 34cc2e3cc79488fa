"""Plain, obviously right ACT on an explicit attention matrix: the reference the fast paths are tested against.

Written from the maths of the reference code's ``atten_process_eval`` (GATECH-EIC/ACT), generalised to batches,
padding and per-head selection; O(n^2) memory, for tests and small inputs only.
"""

from __future__ import annotations

import torch


def act_reference(
    attn: torch.Tensor,
    beta: float,
    threshold: float,
    heads: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """ACT on post-softmax probabilities ``attn`` (B, H, Tq, Tk) of a prefill (causal, queries = keys).

    ``query_valid`` (B, Tq) marks real rows (padding rows neither count as viewers nor get edited);
    ``heads`` (H,) bool selects the heads ACT acts on.
    """
    attn = attn.double().clone()
    b, h, tq, tk = attn.shape
    query_valid = torch.ones(b, tq, dtype=torch.bool) if query_valid is None else query_valid
    heads = torch.ones(h, dtype=torch.bool) if heads is None else heads
    out = attn.clone()
    for bi in range(b):
        for hi in range(h):
            if not heads[hi]:
                continue
            a = attn[bi, hi]
            rows = query_valid[bi]
            seen = (a > 0) & rows[:, None]  # which real queries see each key
            count = seen.sum(0)
            score = torch.where(
                count > 0, (a * rows[:, None]).sum(0) / count.clamp(min=1), torch.zeros(tk).double()
            )
            cand = torch.nonzero(score > threshold).flatten().tolist()
            sinks = cand[1:]  # the first qualifying token is not scaled
            if not sinks:
                continue
            for i in range(tq):
                if not rows[i]:
                    continue
                row = a[i]
                mass = row[sinks].sum()
                if 1 - mass <= 1e-6:
                    continue
                removed = (1 - beta) * mass
                rest = row.clone()
                rest[sinks] = 0
                new = row + removed * rest / rest.sum()
                new[sinks] = beta * row[sinks]
                out[bi, hi, i] = new
    return out
