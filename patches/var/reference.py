"""Plain, obviously right VAR on an explicit attention matrix and explicit hidden states: the reference the fast
paths are tested against.

Written from the maths of the reference code (MICV-yonsei/VisAttnSink ``VARProcessor.attn_redist``, ``HeadFork``,
``DimProspector``), generalised to batches and padding; loops over (row, head, query), O(n^2) memory, for tests.
"""

from __future__ import annotations

import torch


def sink_tokens(hidden: torch.Tensor, sink_dims: list[int], tau: float) -> torch.Tensor:
    """(B, T) bool: tokens whose layer input ``hidden`` (B, T, hidden) has phi(x) >= tau, with
    phi(x) = max_{d in sink_dims} |x[d] / RMS(x)| and RMS(x) = sqrt(mean(x^2) + 1e-6) (no norm weight)."""
    x = hidden.double()
    rms = (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    return (x[..., sink_dims].abs() / rms).amax(-1) >= tau


def var_reference(
    attn: torch.Tensor,
    image: torch.Tensor,
    sinks: torch.Tensor,
    p: float,
    rho: float,
    summ: float,
    query_columns: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """VAR on post-softmax probabilities ``attn`` (B, H, Tq, Tk).

    ``image`` / ``sinks`` (B, Tk) bool mark image tokens and sink tokens (text and visual) among the keys;
    ``query_columns`` (Tq,) is each query's key column (default: the last Tq keys); ``query_valid`` (B, Tq) marks
    real rows; ``heads`` (H,) bool the heads VAR may act on. A row is edited when its query comes after the row's
    last image token, the row has a visual sink, and the (head, query) passes the summ and rho tests.
    """
    attn = attn.double()
    b, h, tq, tk = attn.shape
    cols = torch.arange(tk - tq, tk) if query_columns is None else query_columns
    query_valid = torch.ones(b, tq, dtype=torch.bool) if query_valid is None else query_valid
    heads = torch.ones(h, dtype=torch.bool) if heads is None else heads
    out = attn.clone()
    for bi in range(b):
        img = image[bi]
        if not img.any() or not (img & sinks[bi]).any():
            continue  # no visual sink in this row: VAR leaves it alone
        last_image = int(img.nonzero().max())
        vis_sinks = [j for j in range(tk) if img[j] and sinks[bi, j]]
        vis_rest = [j for j in range(tk) if img[j] and not sinks[bi, j]]
        all_sinks = [j for j in range(tk) if sinks[bi, j]]
        for hi in range(h):
            if not heads[hi]:
                continue
            for i in range(tq):
                if not query_valid[bi, i] or int(cols[i]) <= last_image:
                    continue
                a = attn[bi, hi, i]
                vis = sum(float(a[j]) for j in range(tk) if img[j])
                portion = sum(float(a[j]) for j in vis_sinks) / (vis + 1e-6 * int(img.sum()))
                rest = sum(float(a[j]) for j in vis_rest)
                if vis < summ or portion > rho or rest <= 0:
                    continue
                budget = (1 - p) * sum(float(a[j]) for j in all_sinks)
                new = a.clone()
                for j in all_sinks:
                    new[j] = p * a[j]
                for j in vis_rest:
                    new[j] = a[j] + budget * a[j] / rest
                out[bi, hi, i] = new
    return out
