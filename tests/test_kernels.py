"""Fused SDPA with log-sum-exp, and the tiled pass with its lse / column-sum statistics, against float64."""

from __future__ import annotations

import pytest
import torch
from tiny import kernel_atol

from attnsurgery.kernels import AttentionStats, column_mask, has_bias, sdpa_with_lse, tiled_attention


def reference(q, k, v, allowed, scaling, valid, softcap=None, bias=None):
    groups = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(groups, 1).double()
    vv = v.repeat_interleave(groups, 1).double()
    scores = q.double() @ kk.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.double()
    scores = scores.masked_fill(~allowed, float("-inf"))
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
    tol = kernel_atol(q, k, v, allowed, 0.3, valid)
    out, lse = sdpa_with_lse(q, k, v, mask, 0.3, True)
    torch.testing.assert_close(out[rows], ref_out.float()[rows], atol=tol["out"], rtol=0)
    torch.testing.assert_close(lse[rows], ref_lse.float()[rows], atol=tol["lse"], rtol=0)
    for block in (1, 8, 64):
        stats = AttentionStats(query_valid=valid)
        out2 = tiled_attention(q, k, v, mask, 0.3, is_causal=True, stats=stats, block_rows=block).transpose(
            1, 2
        )
        torch.testing.assert_close(out2[rows], ref_out.float()[rows], atol=tol["out"], rtol=0)
        torch.testing.assert_close(stats.lse[rows], ref_lse.float()[rows], atol=tol["lse"], rtol=0)
        torch.testing.assert_close(stats.column_sums, ref_sums.float(), atol=tol["sums"], rtol=0)


def test_decode_row():
    q, k, v, _, _, _ = case("none", t=12)
    q1 = q[:, :, -1:]
    allowed = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    ref_out, ref_lse, _ = reference(q1, k, v, allowed, 0.3, torch.ones(2, 1, dtype=torch.bool))
    tol = kernel_atol(q1, k, v, allowed, 0.3)
    out, lse = sdpa_with_lse(q1, k, v, None, 0.3, True)
    torch.testing.assert_close(out, ref_out.float(), atol=tol["out"], rtol=0)
    torch.testing.assert_close(lse, ref_lse.float(), atol=tol["lse"], rtol=0)


def _biased(b=2, h=6, t=37):
    """A per-head additive float mask with ALiBi-like biases on a left-padded causal pattern, and its parts."""
    _, _, _, _, allowed, valid = case("bool", b=b, h=h, t=t)
    distance = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).float()
    bias = -torch.linspace(0.05, 0.5, h)[None, :, None, None] * distance  # (1, H, T, T)
    mask = bias.expand(b, -1, -1, -1).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return mask, allowed, valid, bias


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("biased", [False, True])
def test_softcap_and_additive_bias_are_exact(softcap, biased):
    """sdpa_with_lse scores as eager attention does (softcapped, biases added): the fused CPU kernel cannot, so such
    calls take the exact tiled pass."""
    q, k, v, mask, allowed, valid = case("bool")
    bias = None
    if biased:
        mask, allowed, valid, bias = _biased()
    ref_out, ref_lse, _ = reference(q, k, v, allowed, 0.3, valid, softcap=softcap, bias=bias)
    rows = valid[:, None, :].expand(-1, q.shape[1], -1)
    tol = kernel_atol(q, k, v, allowed, 0.3, valid)  # the stock op's rounding on the same q, k, v
    out, lse = sdpa_with_lse(q, k, v, mask, 0.3, True, softcap=softcap)
    torch.testing.assert_close(out[rows], ref_out.float()[rows], atol=tol["out"], rtol=0)
    torch.testing.assert_close(lse[rows], ref_lse.float()[rows], atol=tol["lse"], rtol=0)
    assert has_bias(mask) == biased


def test_column_mask_matches_dense():
    mask, allowed, _, bias = _biased()
    idx = torch.tensor([[0, 3, 9], [5, 6, 30]])[:, None, :].expand(-1, 6, -1)  # (B, H, m)
    ok, picked = column_mask(mask, True, 37, idx, 4, 20)
    dense_ok = allowed.expand(-1, 6, -1, -1)[:, :, 4:20]
    torch.testing.assert_close(ok, dense_ok.gather(-1, idx[:, :, None, :].expand(-1, -1, 16, -1)))
    dense_bias = bias.expand(2, -1, -1, -1)[:, :, 4:20].gather(-1, idx[:, :, None, :].expand(-1, -1, 16, -1))
    torch.testing.assert_close(picked, torch.where(ok, dense_bias, 0.0))
    ok, picked = column_mask(None, True, 37, idx[:, :1], 4, 20)  # plain causal prefill: no mask tensor
    assert picked is None and torch.equal(ok[0, 0, :, 1], torch.arange(4, 20) >= 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_output_of_low_precision_inputs(dtype):
    """out_dtype=fp32: the value product and output of low-precision inputs stay unrounded (ACT corrects them)."""
    q, k, v, mask, allowed, valid = case("bool")
    q, k, v = (x.to(dtype) for x in (q, k, v))
    ref_out, _, _ = reference(q, k, v, allowed, 0.3, valid)
    rows = valid[:, None, :].expand(-1, q.shape[1], -1)
    tol = kernel_atol(q.float(), k.float(), v.float(), allowed, 0.3, valid)  # fp32 work on the rounded inputs
    for m in (mask, None):
        out, _ = sdpa_with_lse(q, k, v, m, 0.3, True, out_dtype=torch.float32)
        assert out.dtype == torch.float32
        if m is not None:
            torch.testing.assert_close(out[rows], ref_out.float()[rows], atol=tol["out"], rtol=0)
    stats = AttentionStats(query_valid=valid)
    out = tiled_attention(q, k, v, mask, 0.3, is_causal=True, stats=stats, out_dtype=torch.float32)
    torch.testing.assert_close(out.transpose(1, 2)[rows], ref_out.float()[rows], atol=tol["out"], rtol=0)
    assert tiled_attention(q, k, v, mask, 0.3, is_causal=True).dtype == dtype  # default: the model's dtype


def test_cuda_bias_buffer_is_aligned_and_shared_across_heads():
    """The memory-efficient CUDA kernel's bias: last dimension 16-aligned in memory, one copy for all heads (the
    mask's broadcast dimensions kept), values those of the mask."""
    from attnsurgery.kernels import _aligned_bias

    mask = torch.randn(2, 1, 5, 21)
    bias = _aligned_bias(mask, (2, 8, 5, 21))
    assert bias.shape == (2, 8, 5, 21) and bias.stride(1) == 0 and bias.stride(2) % 16 == 0
    assert torch.equal(bias, mask.expand(2, 8, 5, 21))
