"""reweight: the spec's invariants (identity, rows sum to 1, causal zeros, argmax kept, sparser)."""

from __future__ import annotations

import torch
from tiny import random_ids, tiny_model

from attnsurgery import attention_maps, patch


def test_identity_and_invariants():
    model = tiny_model("llama")
    ids = random_ids(2, 20)
    base = attention_maps(model, ids, layers=[1])[1]
    with torch.no_grad():
        ref = model(ids).logits
        with patch(model, "reweight", p=1.0, offset=0.0):
            assert torch.equal(model(ids).logits, ref)
    with patch(model, "reweight", p=3.0, offset=1.0, layers=[1]):
        new = attention_maps(model, ids, layers=[1])[1]
    torch.testing.assert_close(new.sum(-1), torch.ones_like(new.sum(-1)), atol=1e-5, rtol=0)
    assert torch.all(new[base == 0] == 0)
    assert torch.equal(new.argmax(-1), base.argmax(-1))
    n = torch.arange(1, 21, dtype=torch.float32)[None, None, :, None]
    above_uniform = (base * n > 1).sum(-1)
    nonzero = (new > 0).sum(-1)
    assert torch.all(nonzero[:, :, 3:] <= above_uniform[:, :, 3:])  # rows past the free ones: sparser
    assert torch.all(nonzero[:, :, :3] > 0)


def test_matches_formula_and_large_p_is_finite():
    model = tiny_model("qwen2")
    ids = random_ids(1, 16)
    base = attention_maps(model, ids, layers=[0])[0].double()
    with patch(model, "reweight", p=15.0, offset=1.0):
        new = attention_maps(model, ids, layers=[0])[0]
    n = torch.arange(1, 17, dtype=torch.float64)[None, None, :, None]
    offset = torch.ones(1, 1, 16, 1, dtype=torch.float64)
    offset[:, :, :3] = 0
    b = (base * n - offset).clamp(min=0) ** 15
    expected = torch.where(b.sum(-1, keepdim=True) > 0, b / b.sum(-1, keepdim=True), base)
    assert torch.isfinite(new).all()
    torch.testing.assert_close(new.double(), expected, atol=1e-5, rtol=1e-4)
