"""The tiled probability path against a plain eager reference, and attention maps against eager weights."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import (
    ARCHS,
    EAGER_ONLY,
    KERNEL_NOISE_FACTOR,
    NOISE_FACTOR,
    kernel_atol,
    logit_atol,
    random_ids,
    tiny_model,
)

from attnsurgery import attention_maps, patch
from attnsurgery.engine import Engine, tiled_attention
from attnsurgery.surgery import AttentionCall


def reference_attention(query, key, value, allowed, scaling):
    """Plain, obviously right: repeat K/V per query head, full scores, masked softmax, @ V."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).double()
    v = value.repeat_interleave(groups, dim=1).double()
    scores = (query.double() @ k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2), probs


def make_call(q_len, k_len, mask, is_causal=True, **kwargs):
    return AttentionCall(
        module=None,
        layer_idx=0,
        num_heads=0,
        num_kv_heads=0,
        query_len=q_len,
        key_len=k_len,
        attention_mask=mask,
        is_causal=is_causal,
        request=None,
        kwargs=kwargs,
    )


CASES = {
    # name: (batch, heads, kv_heads, q_len, k_len)
    "L1-B1-T37-H4-KV4": (1, 4, 4, 37, 37),
    "L1-B2-T50-H6-KV2": (2, 6, 2, 50, 50),
    "L1-B3-T9-H8-KV1": (3, 8, 1, 9, 9),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_rows", [1, 7, 64])
@pytest.mark.parametrize("mask_kind", ["none", "padded_bool", "float", "sliding", "decode"])
def test_tiled_matches_reference(case, block_rows, mask_kind):
    b, h, kv, tq, tk = CASES[case]
    g = torch.Generator().manual_seed(0)
    d = 16
    if mask_kind == "decode":
        tq = 3
    q = torch.randn(b, h, tq, d, generator=g) * 2
    k = torch.randn(b, kv, tk, d, generator=g) * 2
    v = torch.randn(b, kv, tk, d, generator=g)
    rows = torch.arange(tk - tq, tk)[:, None]
    cols = torch.arange(tk)[None, :]
    causal = (cols <= rows)[None, None].expand(b, 1, tq, tk)
    if mask_kind == "none":
        mask, allowed = None, causal
    elif mask_kind in ("padded_bool", "decode"):
        pad = torch.zeros(b, tk, dtype=torch.bool)
        for i in range(b):
            pad[i, : 2 * i] = True  # left padding of 2*i tokens in row i
        allowed = causal & ~pad[:, None, None, :]
        mask = allowed
    elif mask_kind == "float":
        allowed = causal
        mask = torch.zeros(b, 1, tq, tk).masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:  # sliding window of 5
        allowed = causal & (cols > rows - 5)[None, None]
        mask = allowed
    call = make_call(tq, tk, mask)
    out = tiled_attention(q, k, v, mask, 0.25, call, block_rows=block_rows)
    ref, _ = reference_attention(q, k, v, allowed, 0.25)
    real = allowed.any(-1)[:, 0]  # rows with at least one visible key
    atol = kernel_atol(q, k, v, allowed, 0.25, valid=real)["out"]  # the stock op's rounding on these inputs
    torch.testing.assert_close(out[real], ref.float()[real], atol=atol, rtol=0)
    assert torch.isfinite(out).all()  # fully masked rows stay finite


def test_tiled_bf16_close_to_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 40, 16, generator=g).bfloat16() for _ in range(3))
    call = make_call(40, 40, None)
    out = tiled_attention(q, k, v, None, 0.25, call, block_rows=8)
    allowed = torch.ones(40, 40, dtype=torch.bool).tril()[None, None]
    ref, _ = reference_attention(q, k, v, allowed, 0.25)
    assert out.dtype == torch.bfloat16
    # stock SDPA in bf16 on the same inputs against the same fp64 reference: the rounding bf16 attention has here
    stock = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25).transpose(
        1, 2
    )
    noise = float((stock.double() - ref).abs().max())
    torch.testing.assert_close(out.double(), ref, atol=KERNEL_NOISE_FACTOR * noise, rtol=0)


def test_tiled_softcap():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g) * 3 for _ in range(3))
    call = make_call(12, 12, None, softcap=5.0)
    out = tiled_attention(q, k, v, None, 1.0, call, block_rows=5)
    scores = torch.tanh((q @ k.transpose(-1, -2)) / 5.0) * 5.0
    scores = scores.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    ref = (torch.softmax(scores, -1) @ v).transpose(1, 2)
    # the fp32 reference against its own fp64 twin: the rounding any fp32 computation of this has
    exact = (torch.softmax(scores.double(), -1) @ v.double()).transpose(1, 2)
    noise = float((ref.double() - exact).abs().max())
    torch.testing.assert_close(out, ref, atol=2 * KERNEL_NOISE_FACTOR * noise, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiled_path_reproduces_stock_logits(arch):
    """Recording forces every layer onto the tiled path; logits must still equal stock SDPA."""
    model = tiny_model(arch)
    ids = random_ids(2, 30)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        engine = Engine.of(model)
        engine.start_recording(set(range(engine.info.num_layers)))
        try:
            out = model(ids, attention_mask=mask).logits
        finally:
            engine.stop_recording()
    torch.testing.assert_close(out[0], ref[0], atol=logit_atol(arch), rtol=0)
    torch.testing.assert_close(out[1, 7:], ref[1, 7:], atol=logit_atol(arch), rtol=0)
    assert model.config._attn_implementation == ("eager" if arch in EAGER_ONLY else "sdpa")


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_maps_match_eager_weights(arch):
    model = tiny_model(arch, attn_implementation="eager")
    ids = random_ids(1, 20)
    with torch.no_grad():
        eager = model(ids, output_attentions=True).attentions
    maps = attention_maps(model, ids)
    assert sorted(maps) == list(range(len(eager)))
    with torch.no_grad():  # the eager weights' own fp32 rounding (against the model in fp64), per map
        exact = copy.deepcopy(model).double()(ids, output_attentions=True).attentions
    map_noise = NOISE_FACTOR * max(float((a.double() - b).abs().max()) for a, b in zip(eager, exact))
    for layer, probs in maps.items():
        torch.testing.assert_close(probs, eager[layer].float(), atol=map_noise, rtol=0)
    assert model.config._attn_implementation == "eager"


def test_attention_maps_layers_subset_and_rows_sum_to_one():
    model = tiny_model("llama")
    maps = attention_maps(model, random_ids(2, 12), layers="1:")
    assert sorted(maps) == [1, 2]
    assert maps[1].shape == (2, 4, 12, 12)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 4, 12))
    assert torch.all(maps[1].triu(1) == 0)


def test_eager_model_keeps_eager_base():
    """A model loaded with eager attention is patched on its own eager function (exact identity)."""
    model = tiny_model("gpt2", attn_implementation="eager")
    ids = random_ids(1, 16)
    with torch.no_grad():
        ref = model(ids).logits
        with patch(model, "head_scale", heads=[1], scale=1.5, layers=[0]):
            assert model.config._attn_implementation == "attnsurgery_eager"
            out = model(ids).logits
        with patch(model, "head_scale", heads=[1], scale=1.0):
            same = model(ids).logits
    assert torch.equal(same, ref)
    assert not torch.equal(out, ref)
