"""Engine routing: which backend runs where, custom surgeries, the request side channel."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tiny import random_ids, tiny_model

from attnsurgery import Stage, Surgery, SurgeryConfig, attention_maps, patch, register_surgery
from attnsurgery.engine import Engine, tiled_attention
from attnsurgery.surgery import arg


@dataclass
class HalfFirstConfig(SurgeryConfig):
    factor: float = arg(1.0, doc="scale on the first key's probability", low=0.0, high=1.0)


@register_surgery
class HalfFirst(Surgery):
    """Test surgery: scales the first key's probability and renormalises; has an exact fused kernel."""

    name = "test_half_first"
    config_class = HalfFirstConfig
    summary = "test"
    paper = "test"
    stages = frozenset({Stage.PROBS})
    fused = True
    example_args = {"factor": 0.5}
    kernel_calls = 0
    tiled_calls = 0

    def probs(self, probs, tile):
        type(self).tiled_calls += 1
        if tile.k_start == 0:
            probs[..., 0] *= self.config.factor
        return probs / probs.sum(-1, keepdim=True)

    def attention(self, query, key, value, scaling, call):
        type(self).kernel_calls += 1
        # exact, via the plain tiled path with our own probs stage (a real surgery would use lse maths here)
        return tiled_attention(query, key, value, call.attention_mask, scaling, call, prob_stages=[self])


def test_fused_kernel_used_alone_and_tiled_when_composed():
    model = tiny_model("llama")
    ids = random_ids(1, 12)
    HalfFirst.kernel_calls = HalfFirst.tiled_calls = 0
    with torch.no_grad(), patch(model, "test_half_first", factor=0.5):
        model(ids)
        assert HalfFirst.kernel_calls == 3  # one per layer
        with patch(model, "clipped_softmax", gamma=-0.01, layers=[0]):
            before = HalfFirst.kernel_calls
            model(ids)
            assert HalfFirst.kernel_calls == before + 2  # layer 0 runs tiled with both surgeries
        attention_maps(model, ids, layers=[2])  # recording forces the tiled path there
        assert HalfFirst.kernel_calls == before + 2 + 2


def test_plans_route_layers():
    model = tiny_model("llama")
    with (
        patch(model, "temperature", tau=0.5, layers=[0]),
        patch(model, "clipped_softmax", gamma=-0.1, layers=[1]),
    ):
        plans = [m.attnsurgery_layer for m in Engine.of(model).info.attention]
        assert [p.idle for p in plans] == [False, False, True]
        assert [p.tiled for p in plans] == [False, True, False]
        assert [s.name for s in plans[0].query] == ["temperature"]


def test_request_positions_under_cache_and_padding():
    model = tiny_model("llama")
    seen = []

    @register_surgery
    class Spy(Surgery):
        name = "test_spy"
        stages = frozenset({Stage.QUERY})
        summary = paper = "test"
        example_args = {"unused": 1}

        def query(self, query, scaling, call):
            if call.layer_idx == 0:
                seen.append(call.positions.clone())
            return query, scaling

    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with patch(model, "test_spy"), torch.no_grad():
        model.generate(ids, attention_mask=mask, **kw)
    assert seen[0].tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert [s.tolist() for s in seen[1:]] == [[[4], [6]], [[5], [7]]]


def test_register_duplicate_name_fails():
    class Other(Surgery):
        name = "temperature"

    with pytest.raises(ValueError, match="already registered"):
        register_surgery(Other)


def test_patched_model_save_pretrained_reloads_stock(tmp_path):
    """Saving a patched model writes plain weights; the reload runs stock attention."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    ids = random_ids(1, 8)
    with patch(model, "temperature", tau=0.5):
        model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
