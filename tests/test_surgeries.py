"""Per-surgery maths and invariants (the shared contract is in test_contract.py)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import KERNEL_NOISE_FACTOR, NOISE_FACTOR, op_noise, random_ids, stock_noise, tiny_model

from attnsurgery import attention_maps, patch
from attnsurgery.engine import Engine


def entropy(p):
    return -(p.clamp_min(1e-30).log() * p).sum(-1)


# -- temperature -------------------------------------------------------------------------------------------


def test_tau_divides_layer0_logits():
    """Layer 0's map under tau equals softmax of the unpatched logits / tau (same inputs at layer 0)."""
    model = tiny_model("llama", attn_implementation="eager")
    ids = random_ids(1, 14)
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    base = attention_maps(model, ids, layers=[0])[0]
    with patch(model, "temperature", tau=0.5):
        sharp = attention_maps(model, ids, layers=[0])[0]

    def formula(p):  # the unpatched logits are log p up to a per-row constant, which softmax drops
        return torch.softmax(p.clamp_min(1e-30).log() / 0.5 + torch.where(p > 0, 0.0, float("-inf")), dim=-1)

    # the surgery does one softmax's worth of work: KERNEL_NOISE_FACTOR x the formula's own fp32 rounding here
    atol = KERNEL_NOISE_FACTOR * op_noise(formula, base)
    torch.testing.assert_close(sharp, formula(base), atol=atol, rtol=0)
    assert out.attentions is not None


def test_position_temperature_formula_and_row0():
    model = tiny_model("qwen2")
    ids = random_ids(1, 16)
    base = attention_maps(model, ids, layers=[0])[0]
    c = 0.3
    with patch(model, "temperature", c=c):
        pos = attention_maps(model, ids, layers=[0])[0]

    def formula(p):
        n = torch.arange(1, 17, dtype=p.dtype)[None, None, :, None]
        logit = p.clamp_min(1e-30).log()  # logits up to a per-row constant
        return torch.softmax(logit * (1 + c * n.log()) + torch.where(p > 0, 0.0, float("-inf")), dim=-1)

    atol = KERNEL_NOISE_FACTOR * op_noise(formula, base)  # one softmax's rounding, as for tau above
    torch.testing.assert_close(pos, formula(base), atol=atol, rtol=0)


def test_position_temperature_uses_real_positions_under_left_padding():
    """The first real token of a left-padded row sees n=1, so c cannot change its logits."""
    model = tiny_model("llama")
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = {"attention_mask": mask, "position_ids": position_ids}
    atol = NOISE_FACTOR * stock_noise(model, ids, **kw)  # a whole forward's rounding, on these inputs
    with torch.no_grad():
        ref = model(ids, **kw).logits
        with patch(model, "temperature", c=0.5):
            out = model(ids, **kw).logits
    torch.testing.assert_close(out[0, 0], ref[0, 0], atol=atol, rtol=0)
    torch.testing.assert_close(out[1, 5], ref[1, 5], atol=atol, rtol=0)
    # ... while later tokens (n > 1) move far beyond that tolerance
    assert (out[1, 6:] - ref[1, 6:]).abs().max() > 10 * atol


def test_entropy_non_increasing_in_c():
    model = tiny_model("llama")
    ids = random_ids(1, 24)
    previous = None
    for c in (0.0, 0.1, 0.3, 1.0):
        with patch(model, "temperature", c=c):
            ent = entropy(attention_maps(model, ids, layers=[0])[0])
        if previous is not None:
            assert torch.all(ent <= previous + 1e-5)
        previous = ent


def test_beta_parametrisation_and_per_head_tau():
    model = tiny_model("llama")
    ids = random_ids(1, 12)
    with patch(model, "temperature", beta=-1.0) as h:
        via_beta = attention_maps(model, ids, layers=[0])[0]
        assert torch.allclose(h.surgeries[0].coef[0], torch.full((4,), math.exp(-math.exp(-1.0))))
    with patch(model, "temperature", c=math.exp(-math.exp(-1.0))):
        via_c = attention_maps(model, ids, layers=[0])[0]
    torch.testing.assert_close(via_beta, via_c)
    base = attention_maps(model, ids, layers=[0])[0]
    with patch(model, "temperature", tau={0: [1.0, 0.5, 1.0, 1.0]}):
        per_head = attention_maps(model, ids, layers=[0, 1])
    torch.testing.assert_close(per_head[0][:, [0, 2, 3]], base[:, [0, 2, 3]])
    assert not torch.allclose(per_head[0][:, 1], base[:, 1])


def test_temperature_head_targeting():
    model = tiny_model("llama")
    ids = random_ids(1, 12)
    base = attention_maps(model, ids, layers=[1])[1]
    with patch(model, "temperature", tau=0.5, heads={1: [2]}):
        maps = attention_maps(model, ids, layers=[0, 1])
    torch.testing.assert_close(maps[1][:, [0, 1, 3]], base[:, [0, 1, 3]])
    assert not torch.allclose(maps[1][:, 2], base[:, 2])


# -- head_scale --------------------------------------------------------------------------------------------


def _o_proj_inputs(model, ids, layer):
    seen = {}
    o_proj = model.model.layers[layer].self_attn.o_proj
    hook = o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone()))
    with torch.no_grad():
        model(ids)
    hook.remove()
    return seen["x"]


def test_head_scale_scales_exactly_the_chosen_heads():
    model = tiny_model("llama")
    ids = random_ids(1, 10)
    ref = _o_proj_inputs(model, ids, 1).view(1, 10, 4, 16)
    with patch(model, "head_scale", heads={1: [0, 3]}, scale=0.0):
        out = _o_proj_inputs(model, ids, 1).view(1, 10, 4, 16)
    assert torch.all(out[:, :, [0, 3]] == 0)
    torch.testing.assert_close(out[:, :, [1, 2]], ref[:, :, [1, 2]], atol=0, rtol=0)
    with patch(model, "head_scale", heads={1: [2]}, scale=2.5):
        out = _o_proj_inputs(model, ids, 1).view(1, 10, 4, 16)
    torch.testing.assert_close(out[:, :, 2], 2.5 * ref[:, :, 2])


def test_head_scale_trainable_gets_gradients():
    model = tiny_model("llama")
    ids = random_ids(2, 10)
    with patch(model, "head_scale", trainable=True, layers="1:") as handle:
        params = list(handle.parameters())
        assert len(params) == 1 and params[0].shape == (3, 4)
        loss = model(ids, labels=ids).loss
        loss.backward()
    assert params[0].grad is not None and params[0].grad[1:].abs().sum() > 0
    assert params[0].grad[0].abs().sum() == 0  # layer 0 is not targeted


# -- clipped_softmax ---------------------------------------------------------------------------------------


def test_clipped_softmax_formula_and_exact_zeros():
    model = tiny_model("opt", attn_implementation="eager")
    ids = random_ids(1, 20)
    base = attention_maps(model, ids, layers=[0])[0]
    gamma, zeta = -0.03, 1.05
    with patch(model, "clipped_softmax", gamma=gamma, zeta=zeta):
        clipped = attention_maps(model, ids, layers=[0])[0]

    def formula(p):
        return ((zeta - gamma) * p + gamma).clamp(0, 1)

    atol = KERNEL_NOISE_FACTOR * op_noise(
        formula, base
    )  # a scale and a shift after the softmax: its rounding
    torch.testing.assert_close(clipped, formula(base), atol=atol, rtol=0)
    assert torch.all(clipped[base < -gamma / (zeta - gamma)] == 0)
    assert torch.all(clipped[base > (1 - gamma) / (zeta - gamma)] == 1)
    assert torch.all(clipped.triu(1) == 0)  # causal entries stay exactly zero


def test_clipped_softmax_only_targeted_heads():
    model = tiny_model("llama")
    ids = random_ids(1, 16)
    base = attention_maps(model, ids, layers=[0])[0]
    with patch(model, "clipped_softmax", gamma=-0.05, heads={0: [1]}):
        maps = attention_maps(model, ids, layers=[0])[0]
    torch.testing.assert_close(maps[:, [0, 2, 3]], base[:, [0, 2, 3]])
    assert not torch.allclose(maps[:, 1], base[:, 1])


def test_clipped_softmax_bf16_runs_and_is_close():
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids = random_ids(1, 16)
    ref32 = tiny_model("llama")
    with torch.no_grad():  # what bf16 costs the stock model on these inputs
        stock = float((model(ids).logits.float() - ref32(ids).logits).abs().max())
    with patch(model, "clipped_softmax", gamma=-0.02), patch(ref32, "clipped_softmax", gamma=-0.02):
        with torch.no_grad():
            a = model(ids).logits.float()
            b = ref32(ids).logits
    assert torch.isfinite(a).all()
    # test_lowprec's bound: at most twice the stock model's own bf16 error
    assert float((a - b).abs().max()) <= 2 * stock


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gemma2"])
def test_fp16_identity_and_temperature(arch):
    """Identity settings on the real code paths in fp16 (not short-circuited to the stock kernel): a trainable
    temperature keeps every layer routed through its query stage, ACT at beta 1 runs its tiled pass and correction."""
    ref32 = tiny_model(arch)
    model = tiny_model(arch).half()
    ids = random_ids(1, 12)
    with torch.no_grad():
        exact = ref32(ids).logits
        ref = model(ids).logits
        with patch(model, "temperature", trainable=True):
            assert not any(m.attnsurgery_layer.idle for m in Engine.of(model).info.attention)
            same = model(ids).logits
        with patch(model, "act", beta=1.0, threshold=0.05):
            assert all(m.attnsurgery_layer.kernel is not None for m in Engine.of(model).info.attention)
            act = model(ids).logits
        with patch(model, "temperature", tau=0.9):
            out = model(ids).logits
    assert torch.equal(same, ref)  # the query stage multiplies by exactly 1
    # the tiled pass + correction is as close to the fp32 model as the stock fp16 kernel is
    stock_error = (ref.float() - exact).abs().max()
    assert (act.float() - exact).abs().max() <= 2 * stock_error
    assert torch.isfinite(out).all()


def test_var_fused_equals_tiled_with_additive_float_mask():
    """VAR's fused correction scores its image / sink columns with the additive mask's biases, as the tiled path
    and the model's own kernel score every column."""
    from vlm_tiny import prompt, tiny_vlm, vlm_inputs

    import attnsurgery.engine as engine_module

    model = tiny_vlm("llava")
    inputs = vlm_inputs(model, [prompt(model, 3, 10, seed=0)])
    t = inputs["input_ids"].shape[1]
    distance = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).float()
    bias = -torch.tensor([0.2, 0.1, 0.05, 0.02])[:, None, None] * distance
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = bias.masked_fill(~causal, torch.finfo(torch.float32).min)[None]
    plain = torch.zeros(1, 1, t, t).masked_fill(~causal, torch.finfo(torch.float32).min)
    args = dict(p=0.0, tau=1.5, summ=0.05, rho=0.5, sink_dims=[0, 1])
    with patch(model, "var", **args), torch.no_grad():
        fused = model(**{**inputs, "attention_mask": mask}).logits
        unbiased = model(**{**inputs, "attention_mask": plain}).logits
        engine_module.FUSED_KERNELS = False
        try:
            Engine.of(model).refresh()
            tiled = model(**{**inputs, "attention_mask": mask}).logits
        finally:
            engine_module.FUSED_KERNELS = True
    # the two paths differ by fp32 rounding only: NOISE_FACTOR x the stock model's own on these inputs
    ids = inputs.pop("input_ids")
    atol = NOISE_FACTOR * stock_noise(model, ids, **inputs)
    torch.testing.assert_close(fused, tiled, atol=atol, rtol=0)
    assert (fused - unbiased).abs().max() > 10 * atol  # the bias matters, far beyond the paths' tolerance


def test_attention_sinks_are_refused_on_every_own_kernel():
    """s_aux (gpt-oss attention sinks) / position_bias: refused on the tiled path and the fused ACT kernel alike,
    never silently dropped; query / head-output stages leave them to the model's own kernel."""
    from attnsurgery import UnsupportedModelError
    from attnsurgery.engine import attnsurgery_attention

    model = tiny_model("llama")
    module = model.model.layers[1].self_attn
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, 16, generator=g)
    k, v = torch.randn(1, 2, 6, 16, generator=g), torch.randn(1, 2, 6, 16, generator=g)
    for name, args in [("act", dict(beta=0.3)), ("clipped_softmax", dict(gamma=-0.05))]:
        with patch(model, name, **args):
            for extra in (dict(s_aux=torch.zeros(4)), dict(position_bias=torch.zeros(1, 4, 6, 6))):
                with pytest.raises(UnsupportedModelError, match="s_aux"):
                    attnsurgery_attention(module, q, k, v, None, scaling=0.25, **extra)
    with patch(model, "head_scale", scale=0.5):
        out, _ = attnsurgery_attention(
            module, q, k, v, None, scaling=0.25, position_bias=torch.zeros(1, 4, 6, 6)
        )
    assert out.shape == (1, 6, 4, 16)
