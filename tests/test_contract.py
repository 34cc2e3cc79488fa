"""The correctness contract, run for every registered surgery x every claimed architecture.

Identity settings reproduce the unpatched logits; remove() restores bit-for-bit; batched + padded equals
one-by-one; cached decode equals a full forward; the causal mask is never lost; save/load round-trips.
"""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHS, decode_stepwise, force_real_path, logit_atol, padded_batch, random_ids, tiny_model

from attnsurgery import list_surgeries, load_surgery, patch, save_surgery
from attnsurgery.registry import get_surgery_class

# the shipped surgeries (not ones other test files register); those that need image tokens (VAR, VHR) run the
# same contract on tiny VLMs in test_vlm.py
SURGERIES = [
    info.name
    for info in list_surgeries()
    if get_surgery_class(info.name).__module__.startswith("attnsurgery.patches.")
    and not getattr(get_surgery_class(info.name), "requires_vision", False)
]
# surgeries whose outputs at a position depend only on the tokens up to it; prompt-adaptive ones (ACT) test
# their causal and decode semantics in their own files
CAUSAL = [name for name in SURGERIES if not get_surgery_class(name).prompt_adaptive]


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def snapshot(model):
    """Everything removal must restore: weights, attributes, hooks, attention implementation."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "attrs": {(n, a) for n, m in model.named_modules() for a in vars(m) if a.startswith("attnsurgery")},
        "hooks": [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()],
        "impl": model.config._attn_implementation,
        "modules": [n for n, _ in model.named_modules()],
    }


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(params=SURGERIES)
def surgery(request):
    return request.param


def test_every_surgery_declares_example_args(surgery):
    cls = get_surgery_class(surgery)
    assert cls.example_args, f"{surgery} needs example_args (non-identity) for the shared tests"
    assert cls.summary and cls.paper and cls.stages


def test_identity_reproduces_logits(arch, surgery):
    model = tiny_model(arch)
    ids = random_ids(2, 24)
    ref = logits(model, ids)
    with patch(model, surgery, **get_surgery_class(surgery).identity_args):
        out = logits(model, ids)
    torch.testing.assert_close(out, ref, atol=logit_atol(arch), rtol=0)


def test_identity_through_the_real_path(arch, surgery):
    """Identity settings with the surgery's own stages forced on every targeted layer (no skipping of layers whose
    settings are the identity): the surgery's code path itself reproduces the unpatched logits."""
    model = tiny_model(arch)
    ids = random_ids(2, 24)
    ref = logits(model, ids)
    with patch(model, surgery, **get_surgery_class(surgery).identity_args) as handle:
        force_real_path(handle)
        out = logits(model, ids)
    torch.testing.assert_close(out, ref, atol=logit_atol(arch), rtol=0)


def test_example_args_change_the_model(arch, surgery):
    model = tiny_model(arch)
    ids = random_ids(2, 24)
    ref = logits(model, ids)
    with patch(model, surgery, **get_surgery_class(surgery).example_args):
        out = logits(model, ids)
    # the example settings edit the model far beyond the tolerance its exactness checks use
    assert (out - ref).abs().max() > 10 * logit_atol(arch)


def test_remove_restores_bit_for_bit(arch, surgery):
    model = tiny_model(arch)
    ids = random_ids(2, 24)
    before = snapshot(model)
    ref = logits(model, ids)
    handle = patch(model, surgery, **get_surgery_class(surgery).example_args)
    assert model.config._attn_implementation != before["impl"]
    handle.remove()
    after = snapshot(model)
    assert torch.equal(logits(model, ids), ref)
    assert after["attrs"] == set() and after["hooks"] == before["hooks"]
    assert after["impl"] == before["impl"] and after["modules"] == before["modules"]
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())
    handle.remove()  # idempotent


def test_context_manager_restores(arch):
    model = tiny_model(arch)
    ids = random_ids(1, 16)
    ref = logits(model, ids)
    with patch(model, "temperature", tau=0.5):
        assert not torch.equal(logits(model, ids), ref)
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_padded_equals_one_by_one(arch, surgery, side):
    model = tiny_model(arch)
    seqs = [random_ids(1, n, seed=n)[0] for n in (19, 11, 15)]
    with patch(model, surgery, **get_surgery_class(surgery).example_args):
        ids, mask = padded_batch(seqs, side)
        # positions from the mask, as generate() does (GPT-2 / Llama take them as given)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        batched = logits(model, ids, attention_mask=mask, position_ids=position_ids)
        for i, s in enumerate(seqs):
            single = logits(model, s[None])
            real = mask[i].bool()
            torch.testing.assert_close(batched[i, real], single[0], atol=logit_atol(arch), rtol=0)


@pytest.mark.parametrize("surgery", CAUSAL)
def test_cached_decode_equals_full_forward(arch, surgery):
    model = tiny_model(arch)
    ids = random_ids(2, 20)
    with patch(model, surgery, **get_surgery_class(surgery).example_args), torch.no_grad():
        full = model(ids).logits
        stepwise, _ = decode_stepwise(model, ids, 14)
    torch.testing.assert_close(stepwise, full, atol=logit_atol(arch), rtol=0)


@pytest.mark.parametrize("surgery", CAUSAL)
def test_generate_with_cache_equals_without(arch, surgery):
    model = tiny_model(arch)
    seqs = [random_ids(1, n, seed=n)[0] for n in (9, 13)]
    ids, mask = padded_batch(seqs, "left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with patch(model, surgery, **get_surgery_class(surgery).example_args), torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, use_cache=True, **kw)
        uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("surgery", CAUSAL)
def test_causal_mask_is_kept(arch, surgery):
    model = tiny_model(arch)
    ids = random_ids(1, 16)
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 7) % 120 + 3
    with patch(model, surgery, **get_surgery_class(surgery).example_args):
        a, b = logits(model, ids), logits(model, changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=logit_atol(arch), rtol=0)
    # ... and the changed tokens really do move the later logits, far beyond that tolerance
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 10 * logit_atol(arch)


def test_save_load_round_trip(arch, surgery, tmp_path):
    model = tiny_model(arch)
    ids = random_ids(2, 16)
    handle = patch(model, surgery, layers="1:", **get_surgery_class(surgery).example_args)
    expected = logits(model, ids)
    save_surgery(handle, tmp_path / "s")
    fresh = tiny_model(arch)
    reloaded = load_surgery(fresh, tmp_path / "s")
    torch.testing.assert_close(logits(fresh, ids), expected, atol=0, rtol=0)
    assert [s.name for s in reloaded.surgeries] == [surgery]
    assert reloaded.surgeries[0].targets.layers == handle.surgeries[0].targets.layers


def test_composition_and_partial_removal(arch):
    model = tiny_model(arch)
    ids = random_ids(2, 20)
    ref = logits(model, ids)
    t = patch(model, "temperature", tau=0.8, c=0.05)
    only_t = logits(model, ids)
    h = patch(model, "head_scale", heads=[0, 1], scale=0.5)
    c = patch(model, "clipped_softmax", gamma=-0.02, layers="1:")
    all_three = logits(model, ids)
    assert (all_three - only_t).abs().max() > 10 * logit_atol(arch)  # the other two act, beyond rounding
    h.remove()
    c.remove()
    torch.testing.assert_close(logits(model, ids), only_t, atol=0, rtol=0)
    t.remove()
    assert torch.equal(logits(model, ids), ref)
