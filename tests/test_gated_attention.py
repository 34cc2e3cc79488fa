"""gated_attention: exact identity at init, agreement with the plain hook-based reference, gradients, the sparsity
regulariser, persistence of trained gates, cached decoding and argument errors. The shared contract
(tests/test_contract.py) runs its example_args on every tiny architecture as well."""

from __future__ import annotations

import copy

import pytest
import torch
from attnsurgery.patches.gated_attention import FORMS, GatedAttentionSurgery
from attnsurgery.patches.gated_attention.reference import gated_reference
from tiny import (
    ARCHS,
    KERNEL_NOISE_FACTOR,
    decode_stepwise,
    float_noise,
    logit_atol,
    padded_batch,
    random_ids,
    tiny_model,
)
from transformers import AutoModelForCausalLM, Qwen2Config

from attnsurgery import load_surgery, patch, save_surgery
from attnsurgery.engine import Engine
from attnsurgery.errors import SurgeryConfigError

EXAMPLE = GatedAttentionSurgery.example_args
# (arch, form) pairs: every form on a GQA model, every architecture with another form
PAIRS = [("llama", form) for form in FORMS] + [
    ("qwen2", "headwise"),
    ("gemma3", "head_slice"),
    ("gpt2", "elementwise"),
    ("gpt2", "head_slice"),
    ("opt", "headwise"),
]


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def params(surgery):
    """{layer: (weight, bias)} of a patched gated_attention, for the reference."""
    return {int(k): (g.weight.detach().clone(), g.bias.detach().clone()) for k, g in surgery.gates.items()}


def padded(lengths, side="left"):
    ids, mask = padded_batch([random_ids(1, n, seed=n)[0] for n in lengths], side)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("gate_init", [0.5, 0.25])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init(arch, form, gate_init):
    model = tiny_model(arch)
    ids = random_ids(2, 16)
    ref = logits(model, ids)
    with patch(model, "gated_attention", form=form, gate_init=gate_init) as handle:
        out = logits(model, ids)
        means = handle.surgeries[0].mean_gates()
    assert (out - ref).abs().max() <= logit_atol(arch)
    # the gates really ran on every layer (no short-circuit), and all start at 1 (to float32 rounding of a mean)
    assert sorted(means) == list(range(model.config.num_hidden_layers))
    assert all(abs(v - 1.0) <= KERNEL_NOISE_FACTOR * torch.finfo(torch.float32).eps for v in means.values())
    if gate_init == 0.5:
        assert torch.equal(out, ref)  # 2 * sigmoid(0) == 1 exactly


def test_identity_in_bf16_with_fp32_gates():
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids = random_ids(2, 16)
    ref = logits(model, ids)
    with patch(model, "gated_attention", form="elementwise") as handle:
        out = logits(model, ids)
        assert all(p.dtype == torch.float32 for p in handle.parameters())
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


@pytest.mark.parametrize("heads", [None, [0, 2]], ids=["all-heads", "heads-0-2"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_reference(arch, form, heads):
    model = tiny_model(arch)
    ids = random_ids(2, 18)
    base = logits(model, ids)
    with patch(model, "gated_attention", form=form, layers="1:", heads=heads, **EXAMPLE) as handle:
        fast = logits(model, ids)
        surgery = handle.surgeries[0]
        gates, scale = params(surgery), surgery.gate_scale
    head_map = None if heads is None else {layer: heads for layer in gates}
    with gated_reference(model, gates, form, scale, head_map):
        ref = logits(model, ids)
    # the gates edit the model far beyond the tolerance the fast path and the reference agree to
    assert (fast - base).abs().max() > 10 * logit_atol(arch)
    torch.testing.assert_close(fast, ref, atol=logit_atol(arch), rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_composes_with_temperature_and_head_scale_under_padding(arch):
    model = tiny_model(arch)
    ids, mask, pos = padded([13, 7, 10], side="left")
    kw = dict(attention_mask=mask, position_ids=pos)
    t = patch(model, "temperature", tau=0.8, c=0.05)
    h = patch(model, "head_scale", heads=[0, 1], scale=0.5)
    g = patch(model, "gated_attention", form="headwise", **EXAMPLE)
    combined = logits(model, ids, **kw)
    gates, scale = params(g.surgeries[0]), g.surgeries[0].gate_scale
    g.remove()
    with gated_reference(model, gates, "headwise", scale):  # the reference on top of the other two surgeries
        expected = logits(model, ids, **kw)
    real = mask.bool()
    torch.testing.assert_close(combined[real], expected[real], atol=logit_atol(arch), rtol=0)
    # each padded row equals its own unpadded run
    g = patch(model, "gated_attention", form="headwise", **EXAMPLE)
    for i in range(ids.shape[0]):
        single = logits(model, ids[i][real[i]][None])
        torch.testing.assert_close(combined[i, real[i]], single[0], atol=logit_atol(arch), rtol=0)
    for handle in (g, h, t):
        handle.remove()


@pytest.mark.parametrize("arch,form", PAIRS)
def test_gradients_reach_gates_not_the_model(arch, form):
    model = tiny_model(arch)
    model.requires_grad_(False)
    ids = random_ids(2, 12)
    with patch(model, "gated_attention", form=form) as handle:  # identity init: gradients are still non-zero
        out = model(ids).logits
        loss = torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        trainable = [p for p in handle.surgeries[0].parameters() if p.requires_grad]
        assert len(trainable) == 2 * model.config.num_hidden_layers
        for p in trainable:
            assert p.grad is not None and p.grad.abs().max() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_sparsity_regularizer(arch):
    model = tiny_model(arch)
    model64 = copy.deepcopy(model).double()  # the same computation in float64, for the noise scale below
    ids, mask, pos = padded([11, 6], side="right")
    kw = dict(attention_mask=mask, position_ids=pos)
    with patch(model, "gated_attention", form="headwise", **EXAMPLE) as handle:
        assert handle.surgeries[0].regularizer() is None  # sparsity 0
    heads = [1, 3]
    handle = patch(
        model, "gated_attention", form="headwise", layers="1:", heads=heads, sparsity=0.1, **EXAMPLE
    )
    surgery = handle.surgeries[0]
    assert surgery.regularizer() is None  # nothing recorded yet
    model(ids, **kw)
    reg = surgery.regularizer()
    means = surgery.mean_gates()
    gates, scale = params(surgery), surgery.gate_scale
    handle.remove()
    with gated_reference(model, gates, "headwise", scale, {layer: heads for layer in gates}) as ref:
        logits(model, ids, **kw)
    real = mask.bool()
    expected = {
        layer: float(g[:, :, heads][real].mean()) for layer, g in ref.items()
    }  # real tokens, gated heads
    # the reference's float noise on this machine: the same gates from the float64 copy. The surgery and the
    # reference share the stock forward below the gated layers and differ by the gate op and its product only:
    # KERNEL_NOISE_FACTOR x that noise (measured: they differ by under 1x; a 1e-5 relative gate error fails)
    params64 = {layer: (w.double(), b.double()) for layer, (w, b) in gates.items()}
    with gated_reference(model64, params64, "headwise", scale, {layer: heads for layer in gates}) as ref64:
        logits(model64, ids, **kw)
    expected64 = {layer: float(g[:, :, heads][real].mean()) for layer, g in ref64.items()}
    assert sorted(means) == sorted(expected) == [1, 2]
    for layer in expected:
        atol = KERNEL_NOISE_FACTOR * float_noise(expected[layer], expected64[layer])
        assert means[layer] == pytest.approx(expected[layer], abs=atol, rel=0)
    want, want64 = (0.1 * sum(e.values()) / len(e) for e in (expected, expected64))
    assert float(reg.detach()) == pytest.approx(
        want, abs=KERNEL_NOISE_FACTOR * float_noise(want, want64), rel=0
    )
    assert reg.requires_grad
    reg.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in surgery.parameters())


@pytest.mark.parametrize("arch,form", PAIRS)
def test_save_load_round_trip_of_trained_gates(arch, form, tmp_path):
    model = tiny_model(arch)
    model.requires_grad_(False)
    ids = random_ids(2, 12)
    handle = patch(model, "gated_attention", form=form, layers="1:", sparsity=0.01)
    surgery = handle.surgeries[0]
    optimizer = torch.optim.Adam([p for p in surgery.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        out = model(ids).logits
        loss = torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        (loss + surgery.regularizer()).backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = {k: v.detach().clone() for k, v in surgery.state_dict().items()}
    assert all(v.abs().max() > 0 for k, v in trained.items() if k.endswith("weight"))  # not the zero init
    expected = logits(model, ids)
    save_surgery(handle, tmp_path / "gates")
    fresh = tiny_model(arch)
    reloaded = load_surgery(fresh, tmp_path / "gates")
    state = reloaded.surgeries[0].state_dict()
    assert state.keys() == trained.keys()
    assert all(torch.equal(state[k], trained[k]) for k in trained)
    torch.testing.assert_close(logits(fresh, ids), expected, atol=0, rtol=0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_equals_full_forward(arch, form):
    model = tiny_model(arch)
    ids = random_ids(2, 18)
    with patch(model, "gated_attention", form=form, **EXAMPLE), torch.no_grad():
        full = model(ids).logits
        stepwise, _ = decode_stepwise(model, ids, 12)
    torch.testing.assert_close(stepwise, full, atol=logit_atol(arch), rtol=0)


@pytest.mark.parametrize("arch,form", PAIRS)
def test_generate_with_cache_equals_without(arch, form):
    model = tiny_model(arch)
    ids, mask, _ = padded([9, 13], side="left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with patch(model, "gated_attention", form=form, **EXAMPLE), torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, use_cache=True, **kw)
        uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize(
    "args,message",
    [
        ({"form": "elementwse"}, "(?i)did you mean 'elementwise'"),
        ({"form": "per_token"}, "not one of"),
        ({"gate_init": 0.0}, "gate_init"),
        ({"gate_init": 1.0}, "gate_init"),
        ({"gate_init": "half"}, "gate_init"),
        ({"gate_scale": 0.0}, "gate_scale"),
        ({"gate_scale": -2.0}, "gate_scale"),
        ({"gate_scale": "two"}, "gate_scale"),  # "2" is a number in any syntax, coerced
        ({"init_std": -0.1}, "init_std"),
        ({"seed": 1.5}, "seed"),
        ({"sparsity": -1e-3}, "sparsity"),
        ({"sparsty": 0.1}, "(?i)did you mean 'sparsity'"),
    ],
)
def test_bad_arguments(args, message):
    model = tiny_model("llama")
    with pytest.raises(SurgeryConfigError, match=message):
        patch(model, "gated_attention", **args)
    assert Engine.of(model, create=False) is None
    assert model.config._attn_implementation == "sdpa"


def test_head_slice_needs_heads_to_divide_hidden():
    # hidden 60 with 8 heads of head_dim 8: the hidden state does not split into 8 slices
    config = Qwen2Config(  # Llama's and Gemma's configs refuse this shape; Qwen2's takes an explicit head_dim
        vocab_size=128,
        hidden_size=60,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=8,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with pytest.raises(SurgeryConfigError, match="head_slice"):
        patch(model, "gated_attention", form="head_slice")
    assert Engine.of(model, create=False) is None
    with patch(model, "gated_attention", form="elementwise"):  # the other forms do not split X
        model(random_ids(1, 5))
