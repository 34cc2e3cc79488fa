"""Patched models that accelerate has dispatched (device_map, disk offload) keep working and restore exactly."""

from __future__ import annotations

import torch
from tiny import random_ids, tiny_model
from transformers import AutoModelForCausalLM

from attnsurgery import patch


def test_device_map_with_offload(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "m")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", device_map=device_map, offload_folder=str(tmp_path / "offload"), dtype=torch.float32
    )
    reference = tiny_model("llama")
    ids = random_ids(2, 12)
    hooks_before = {n: getattr(m, "_hf_hook", None) for n, m in model.named_modules()}
    assert any(h is not None for h in hooks_before.values())  # accelerate really dispatched it
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(ref, reference(ids).logits, atol=1e-5, rtol=0)
        with patch(model, "temperature", tau=0.7, c=0.05), patch(reference, "temperature", tau=0.7, c=0.05):
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
        with patch(model, "clipped_softmax", gamma=-0.02, layers=[1]):
            out = model(ids).logits
        assert (out - ref).abs().max() > 1e-4
        assert torch.equal(model(ids).logits, ref)
    assert {n: getattr(m, "_hf_hook", None) for n, m in model.named_modules()} == hooks_before
