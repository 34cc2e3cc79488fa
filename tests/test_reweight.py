"""reweight: the spec's invariants (identity, rows sum to 1, causal zeros, argmax kept, sparser)."""

from __future__ import annotations

import torch
from tiny import KERNEL_NOISE_FACTOR, op_noise, random_ids, tiny_model

from attnsurgery import attention_maps, patch


def reweighted(p: torch.Tensor, power: float, offset: float = 1.0, free: int = 3) -> torch.Tensor:
    """The spec's formula on a map p (B, H, T, T): ``(p * n - offset)_+ ** power`` renormalised per row, rows with
    nothing above the offset left as they were, the first ``free`` rows without offset."""
    n = torch.arange(1, p.shape[-2] + 1, dtype=p.dtype)[None, None, :, None]
    off = torch.full((1, 1, p.shape[-2], 1), offset, dtype=p.dtype)
    off[:, :, :free] = 0
    b = (p * n - off).clamp(min=0) ** power
    return torch.where(b.sum(-1, keepdim=True) > 0, b / b.sum(-1, keepdim=True), p)


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
    # rows sum to 1 up to the renormalisation's fp32 rounding (the formula's own, on this layer's input map)
    atol = KERNEL_NOISE_FACTOR * op_noise(lambda p: reweighted(p, 3.0).sum(-1), base)
    torch.testing.assert_close(new.sum(-1), torch.ones_like(new.sum(-1)), atol=atol, rtol=0)
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
    base = attention_maps(model, ids, layers=[0])[0]
    with patch(model, "reweight", p=15.0, offset=1.0):
        new = attention_maps(model, ids, layers=[0])[0]
    assert torch.isfinite(new).all()
    # the power 15 amplifies the input's rounding 15-fold; the formula's own fp32 noise on this map carries that
    atol = KERNEL_NOISE_FACTOR * op_noise(lambda p: reweighted(p, 15.0), base)
    torch.testing.assert_close(new.double(), reweighted(base.double(), 15.0), atol=atol, rtol=0)
