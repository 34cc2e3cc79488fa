"""Engine routing: which backend runs where, custom surgeries, the request side channel."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tiny import logit_atol, random_ids, tiny_model

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
        # clipped softmax alone on layer 1: its own kernel (flex on a GPU), which declines on CPU -> tiled pass
        assert [p.kernel.name if p.kernel else None for p in plans] == [None, "clipped_softmax", None]
        assert plans[1].normalizer is plans[1].kernel
        assert [s.name for s in plans[0].query] == ["temperature"]
    with (
        patch(model, "clipped_softmax", gamma=-0.1, layers=[1]),
        patch(model, "act", beta=0.5, layers=[1]),
    ):  # two probability-level surgeries on one layer: the tiled path
        plans = [m.attnsurgery_layer for m in Engine.of(model).info.attention]
        assert [p.tiled for p in plans] == [False, True, False]


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


def _mask_4d(mask: torch.Tensor, k_len: int | None = None, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, K) bool: causal (optionally sliding) & padding, K >= T columns (extra ones: empty cache slots)."""
    t = mask.shape[1]
    k_len = k_len or t
    rows, cols = torch.arange(t)[:, None], torch.arange(k_len)[None, :]
    allowed = cols <= rows
    if window is not None:
        allowed &= cols > rows - window
    padded = torch.nn.functional.pad(mask.bool(), (0, k_len - t))
    return allowed[None, None] & padded[:, None, None, :]


def test_key_valid_from_4d_masks():
    from attnsurgery.request import key_valid_from_mask

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    real = mask.bool()
    as_float = lambda m: torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)  # noqa: E731
    assert torch.equal(key_valid_from_mask(mask, 3, 5), real)
    assert torch.equal(key_valid_from_mask(_mask_4d(mask), 3, 5), real)
    assert torch.equal(key_valid_from_mask(as_float(_mask_4d(mask)), 3, 5), real)  # additive (eager)
    assert torch.equal(key_valid_from_mask(_mask_4d(mask)[:, 0], 3, 5), real)  # (B, Q, K)
    assert torch.equal(key_valid_from_mask(_mask_4d(mask).expand(-1, 4, -1, -1), 3, 5), real)  # per head
    assert torch.equal(key_valid_from_mask({"full_attention": _mask_4d(mask)}, 3, 5), real)
    ones = torch.ones(1, 5, dtype=torch.long)
    assert torch.equal(
        key_valid_from_mask(_mask_4d(ones), 3, 5), torch.ones(3, 5, dtype=torch.bool)
    )  # broadcast
    # a static cache: 8 key columns, the last 3 are empty slots, not part of the request
    assert torch.equal(key_valid_from_mask(_mask_4d(mask, k_len=8), 3, 5), real)
    # sliding window of 2 at prefill: every real token still sees itself
    assert torch.equal(key_valid_from_mask(_mask_4d(mask, window=2), 3, 5), real)
    # a decode step whose window no longer reaches the first keys: they keep the prefill's validity
    step = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    window = _mask_4d(step, k_len=8, window=2)[:, :, -1:]  # (B, 1, 1, 8): the new query's row
    expected = step.bool()
    assert torch.equal(key_valid_from_mask(window, 3, 1, past=5, prev=real), expected)
    assert not key_valid_from_mask(window, 3, 1, past=5)[:, :3].any()  # without it only the window is known
    # a sliding cache holding the last 3 columns: placed after the prefill's validity, unknown without it
    assert torch.equal(key_valid_from_mask(window[..., 3:6], 3, 1, past=5, prev=real), expected)
    assert key_valid_from_mask(window[..., 3:6], 3, 1, past=5) is None
    # torch < 2.5 un-masks rows that see nothing (left padding): they must not make padding real
    fixed = _mask_4d(mask)
    fixed = fixed | ~fixed.any(-1, keepdim=True)
    assert torch.equal(key_valid_from_mask(fixed, 3, 5), real)
    assert key_valid_from_mask(None, 3, 5) is None


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_4d_mask_equals_2d_mask_left_padded(kind):
    """Surgeries that count real keys (ACT's alpha / N) or positions (temperature) see the same request from a 4D
    mask (generate with a static cache, or a caller's own) as from the 2D one."""
    model = tiny_model("llama")
    ids = random_ids(3, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 0
    mask4 = _mask_4d(mask)
    if kind == "float":
        mask4 = torch.zeros(mask4.shape).masked_fill(~mask4, torch.finfo(torch.float32).min)
    real = mask.bool()
    for name, args in [("act", dict(alpha=1.0)), ("temperature", dict(c=0.5))]:
        with patch(model, name, **args), torch.no_grad():
            flat = model(input_ids=ids, attention_mask=mask).logits
            full = model(input_ids=ids, attention_mask=mask4).logits
            for i in range(3):  # and one by one
                single = model(input_ids=ids[i : i + 1, real[i]]).logits
                torch.testing.assert_close(flat[i, real[i]], single[0], atol=logit_atol("llama"), rtol=0)
        torch.testing.assert_close(full[real], flat[real], atol=logit_atol("llama"), rtol=0)


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


@pytest.mark.parametrize(
    ("surgery", "args", "shown", "hidden"),
    [
        ("act", {}, ["threshold=0.1"], ["threshold=None"]),
        ("moh", {}, ["shared=2", "top_k=1"], ["shared=None", "top_k=None", "active="]),  # 4 heads: 2 + 1
        ("moh", {"active": 0.75}, ["shared=2", "top_k=1"], ["top_k=None", "active="]),
        ("moh", {"shared": 1}, ["shared=1", "top_k=1"], ["top_k=None"]),
    ],
)
def test_handle_repr_shows_the_values_that_apply(surgery, args, shown, hidden):
    """A default that resolves (ACT's threshold, MoH's head split on this model) is shown as what applies."""
    model = tiny_model("llama")
    with patch(model, surgery, **args) as handle:
        text = repr(handle)
    for part in shown:
        assert part in text, text
    for part in hidden:
        assert part not in text, text
