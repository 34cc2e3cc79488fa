"""The ``lora`` surgery: peft adapters as a removable surgery (the shared matrix in test_contract.py covers
identity, removal, padding, decode and save/load on every architecture; these are its own quirks)."""

from __future__ import annotations

import pytest
import torch
from tiny import logit_atol, random_ids, tiny_model

from attnsurgery import patch, save_surgery
from attnsurgery.errors import SurgeryConfigError


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_identity_init_runs_the_adapters_and_equals_base(arch):
    model = tiny_model(arch)
    ids = random_ids(2, 12)
    ref = logits(model, ids)
    targets = {"llama": "q_proj,v_proj,o_proj", "gpt2": "c_attn,c_proj", "opt": "q_proj,out_proj"}[arch]
    with patch(model, "lora", targets=targets) as handle:
        surgery = handle.surgeries[0]
        assert len(surgery.adapters) > 0
        # the adapters are really on the path: a non-zero B changes the output
        torch.testing.assert_close(logits(model, ids), ref, atol=logit_atol(arch), rtol=0)
        with torch.no_grad():
            next(iter(surgery.adapters.values()))["B"].weight.normal_(
                0, 0.1
            )  # not a constant: LayerNorm removes those
        # ... far beyond the tolerance the identity check above uses
        assert (logits(model, ids) - ref).abs().max() > 10 * logit_atol(arch)
    assert torch.equal(logits(model, ids), ref)


def test_adapters_come_from_their_seed_and_leave_the_global_generator_alone():
    model = tiny_model("llama")

    def adapters(**kwargs):
        with patch(model, "lora", **kwargs) as handle:
            return {
                k: (v["A"].weight.clone(), v["B"].weight.clone())
                for k, v in handle.surgeries[0].adapters.items()
            }

    torch.manual_seed(1)
    before = torch.random.get_rng_state()
    first = adapters()
    assert torch.equal(torch.random.get_rng_state(), before)  # patching drew nothing from the caller's stream
    torch.manual_seed(2)
    again, other = adapters(), adapters(seed=1)
    for k, (a, b) in first.items():
        assert torch.equal(a, again[k][0]) and not torch.equal(a, other[k][0])
        assert not b.any()  # the identity: B = 0
        # peft's distribution, U(+-1/sqrt(fan_in)): spread over the whole range, never past it
        bound = a.shape[-1] ** -0.5
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound and a.std() > 0.5 * bound
    randoms = adapters(init="random"), adapters(init="random")
    for k in first:
        assert torch.equal(randoms[0][k][1], randoms[1][k][1]) and randoms[0][k][1].abs().max() > 0.1


def test_remove_restores_modules_and_grad_flags():
    model = tiny_model("llama")
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = {n: type(m) for n, m in model.named_modules()}
    handle = patch(model, "lora", layers="1:")
    assert type(model.model.layers[1].self_attn.q_proj).__name__ == "Linear"  # peft's lora.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # layer 0 not targeted
    handle.remove()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert not hasattr(model, "peft_config")


def test_unknown_target_says_did_you_mean():
    model = tiny_model("llama")
    with pytest.raises(SurgeryConfigError, match=r"'q_porj'.*Did you mean 'q_proj'"):
        patch(model, "lora", targets="q_porj")
    assert not hasattr(model, "peft_config")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_disabled_turns_adapters_off():
    from attnsurgery.engine import Engine

    model = tiny_model("llama")
    ids = random_ids(1, 10)
    ref = logits(model, ids)
    with patch(model, "lora", init="random"):
        patched = logits(model, ids)
        with Engine.of(model).disabled():
            torch.testing.assert_close(logits(model, ids), ref, atol=logit_atol("llama"), rtol=0)
        torch.testing.assert_close(logits(model, ids), patched, atol=0, rtol=0)


def test_exported_peft_adapter_loads_with_peft(tmp_path):
    from attnsurgery.patches.lora.surgery import export_peft_adapter
    from peft import PeftModel

    model = tiny_model("llama")
    ids = random_ids(2, 10)
    handle = patch(model, "lora", init="random", targets="q_proj,v_proj")
    expected = logits(model, ids)
    export_peft_adapter(handle.surgeries[0], model, tmp_path / "adapter")
    save_surgery(handle, tmp_path / "surgery")
    handle.remove()
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(peft_model, ids), expected, atol=logit_atol("llama"), rtol=0)
