"""Fused SDPA with log-sum-exp, and the tiled pass with its lse / column-sum statistics, against float64."""

from __future__ import annotations

import pytest
import torch

from attnsurgery.kernels import AttentionStats, sdpa_with_lse, tiled_attention


def reference(q, k, v, allowed, scaling, valid):
    groups = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(groups, 1).double()
    vv = v.repeat_interleave(groups, 1).double()
    scores = (q.double() @ kk.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    sums = (probs * valid[:, None, :, None]).sum(2)
    return probs @ vv, lse, sums


def case(kind, b=2, h=6, kv=2, t=37, d=16):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, n, t, d, generator=g) * 1.5 for n in (h, kv, kv))
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(b, 1, t, t)
    valid = torch.ones(b, t, dtype=torch.bool)
    if kind == "none":
        return q, k, v, None, causal, valid
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[1, :5] = True  # row 1 left-padded by 5
    allowed = causal & ~pad[:, None, None, :]
    valid = ~pad & allowed.any(-1)[:, 0]
    if kind == "bool":
        return q, k, v, allowed, allowed, valid
    mask = torch.zeros(b, 1, t, t).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return q, k, v, mask, allowed, valid


@pytest.mark.parametrize("kind", ["none", "bool", "float"])
def test_kernels_match_reference(kind):
    q, k, v, mask, allowed, valid = case(kind)
    ref_out, ref_lse, ref_sums = reference(q, k, v, allowed, 0.3, valid)
    rows = valid[:, None, :].expand(-1, q.shape[1], -1)
    out, lse = sdpa_with_lse(q, k, v, mask, 0.3, True)
    torch.testing.assert_close(out[rows], ref_out.float()[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[rows], ref_lse.float()[rows], atol=1e-5, rtol=1e-5)
    for block in (1, 8, 64):
        stats = AttentionStats(query_valid=valid)
        out2 = tiled_attention(q, k, v, mask, 0.3, is_causal=True, stats=stats, block_rows=block).transpose(
            1, 2
        )
        torch.testing.assert_close(out2[rows], ref_out.float()[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.lse[rows], ref_lse.float()[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.column_sums, ref_sums.float(), atol=1e-4, rtol=1e-4)


def test_decode_row():
    q, k, v, _, _, _ = case("none", t=12)
    q1 = q[:, :, -1:]
    allowed = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    ref_out, ref_lse, _ = reference(q1, k, v, allowed, 0.3, torch.ones(2, 1, dtype=torch.bool))
    out, lse = sdpa_with_lse(q1, k, v, None, 0.3, True)
    torch.testing.assert_close(out, ref_out.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5)
