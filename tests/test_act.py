"""ACT: the fused path against the plain reference, the spec's invariants, batches, padding, decode."""

from __future__ import annotations

import pytest
import torch
from attnsurgery.patches.act.reference import act_reference
from tiny import ARCHS, cache_kwarg, random_ids, tiny_model

from attnsurgery import SurgeryConfigError, attention_maps, patch
from attnsurgery.engine import Engine


def maps_and_logits(model, ids, **kw):
    """(maps of all layers, logits) with every layer on the tiled path (recording)."""
    engine = Engine.of(model)
    engine.start_recording(set(range(engine.info.num_layers)))
    try:
        with torch.no_grad():
            out = model(ids, **kw).logits
    finally:
        maps = engine.stop_recording()
    return {k: v[0] for k, v in maps.items()}, out


def test_golden_4x4():
    """A hand-built causal matrix through the reference formula."""
    a = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.6, 0.2, 0], [0.1, 0.5, 0.1, 0.3]])[None, None]
    out = act_reference(a.double(), beta=0.5, threshold=0.35)[0, 0]
    # scores: key0 (1+.5+.2+.1)/4=.45, key1 (.5+.6+.5)/3=.53, key2 .15, key3 .3 -> 0 and 1 qualify, 1 is scaled
    expected = torch.tensor(
        [
            [1.0, 0, 0, 0],
            [0.5 + 0.25, 0.25, 0, 0],
            [0.2 + 0.3 * 0.2 / 0.4, 0.3, 0.2 + 0.3 * 0.2 / 0.4, 0],
            [0.1 + 0.25 * 0.1 / 0.5, 0.25, 0.1 + 0.25 * 0.1 / 0.5, 0.3 + 0.25 * 0.3 / 0.5],
        ]
    ).double()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_matches_reference_and_tiled(arch):
    model = tiny_model(arch)
    ids = random_ids(2, 24)
    base, _ = maps_and_logits(model, ids)
    with patch(model, "act", beta=0.3, threshold=0.08, layers=[0]) as handle:
        with torch.no_grad():
            fused = model(ids).logits
        tiled_maps, tiled = maps_and_logits(model, ids)
    torch.testing.assert_close(fused, tiled, atol=1e-5, rtol=1e-4)  # fused correction == explicit edit
    expected = act_reference(base[0], 0.3, 0.08).float()
    torch.testing.assert_close(tiled_maps[0], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected, base[0].float(), atol=1e-4)  # something was edited
    assert handle.surgeries[0].prompt_adaptive is True


def test_invariants_on_a_layer():
    model = tiny_model("llama")
    ids = random_ids(1, 30)
    base, _ = maps_and_logits(model, ids)
    beta, thr = 0.25, 0.06
    with patch(model, "act", beta=beta, threshold=thr, layers=[1]):
        maps, _ = maps_and_logits(model, ids)
    a, new = base[1][0].double(), maps[1][0].double()  # (H, T, T)
    torch.testing.assert_close(new.sum(-1), torch.ones_like(new.sum(-1)), atol=1e-5, rtol=0)  # rows sum to 1
    assert torch.all(new[a == 0] == 0) and torch.all(new >= 0)  # causal zeros, non-negative
    edited_any = False
    for h in range(a.shape[0]):
        score = a[h].sum(0) / torch.arange(30, 0, -1)
        cand = torch.nonzero(score > thr).flatten()
        sinks, first = cand[1:], cand[0] if len(cand) else None
        rows = torch.arange(1, 30)
        if len(sinks):
            edited_any = True
            torch.testing.assert_close(
                new[h][rows][:, sinks], beta * a[h][rows][:, sinks], atol=1e-6, rtol=1e-4
            )
            others = torch.tensor([j for j in range(30) if j not in sinks.tolist()])
            # proportional redistribution: ratios among non-sinks unchanged
            ratio = new[h][29, others] / a[h][29, others]
            torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), atol=1e-5, rtol=1e-4)
            if first is not None:
                assert new[h][29, first] >= a[h][29, first] - 1e-7  # the first sink is never scaled down
    assert edited_any


def test_identity_beta_one_and_empty_heads():
    model = tiny_model("qwen2")
    ids = random_ids(2, 20)
    with torch.no_grad():
        ref = model(ids).logits
        with patch(model, "act", beta=1.0, threshold=0.05):  # actually applied, not skipped
            torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)
        with patch(model, "act", beta=0.2, threshold=0.05, heads={1: []}):
            torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_padded_equals_one_by_one(side):
    model = tiny_model("llama")
    seqs = [random_ids(1, n, seed=n)[0] for n in (21, 12, 16)]
    width = 21
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl], mask[i, sl] = s, 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with patch(model, "act", beta=0.3, threshold=0.08), torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=position_ids).logits
        for i, s in enumerate(seqs):
            single = model(s[None]).logits
            torch.testing.assert_close(batched[i, mask[i].bool()], single[0], atol=1e-5, rtol=1e-4)


def test_alpha_form_matches_equivalent_threshold():
    model = tiny_model("llama")
    ids = random_ids(1, 20)
    with torch.no_grad(), patch(model, "act", beta=0.3, alpha=1.6):  # 1.6 / 20 tokens = 0.08
        a = model(ids).logits
    with torch.no_grad(), patch(model, "act", beta=0.3, threshold=0.08):
        b = model(ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_decode_frozen_keeps_prefill_sinks_and_rows_sum_to_one():
    model = tiny_model("llama")
    ids = random_ids(2, 16)
    with patch(model, "act", beta=0.3, threshold=0.08) as handle, torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :12], use_cache=True)
        # the prompt part is exactly a full forward of the prompt
        torch.testing.assert_close(out.logits, model(ids[:, :12]).logits, atol=1e-6, rtol=0)
        engine = Engine.of(model)
        frozen = {k: v.clone() for k, v in engine.request.extras.items()}
        assert frozen and all(v.shape[-1] == 12 for v in frozen.values())
        cache = out.past_key_values
        step = model(ids[:, 12:13], use_cache=True, **{cache_kwarg(model): cache})
        assert torch.isfinite(step.logits).all()
        # the sink set did not change during decode
        assert all(torch.equal(engine.request.extras[k], v) for k, v in frozen.items())
        # decode attention rows still sum to 1, and sink columns carry beta times their stock attention
        maps = attention_maps(model, ids[:, :13], layers=[1])[1]
        assert handle.surgeries[0].config.decode == "frozen"
    torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps.sum(-1)), atol=1e-5, rtol=0)
    assert full.shape[1] == 16


def test_decode_recompute_and_generate():
    model = tiny_model("gemma3")
    seqs = [random_ids(1, n, seed=n)[0] for n in (9, 13)]
    ids = torch.zeros(2, 13, dtype=torch.long)
    mask = torch.zeros(2, 13, dtype=torch.long)
    ids[0, 4:], mask[0, 4:] = seqs[0], 1
    ids[1], mask[1] = seqs[1], 1
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=mask)
    for mode in ("frozen", "recompute"):
        with patch(model, "act", beta=0.3, threshold=0.08, decode=mode), torch.no_grad():
            out = model.generate(ids, **kw)
        assert out.shape == (2, 19)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_static_cache_generate_equals_dynamic(arch):
    """A static cache's key columns run to max_cache_len (empty slots after the tokens) and generate passes a 4D
    mask with it: the frozen sinks stay on their columns and alpha / N counts real tokens only."""
    model = tiny_model(arch)
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[mask == 0] = 0
    kw = dict(
        max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
    )
    for args in (dict(alpha=1.0, beta=0.2), dict(threshold=0.08, beta=0.3, decode="recompute")):
        with patch(model, "act", **args), torch.no_grad():
            dynamic = model.generate(ids, attention_mask=mask, **kw)
            static = model.generate(ids, attention_mask=mask, cache_implementation="static", **kw)
        assert torch.equal(dynamic.sequences, static.sequences)
        for a, b in zip(dynamic.scores, static.scores):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_act_bad_arguments():
    model = tiny_model("llama")
    for args, message in [
        ({"beta": 1.5}, "beta=1.5 is out of range"),
        ({"threshold": 0.0}, "threshold=0.0 is out of range"),
        ({"threshold": 0.1, "alpha": 5}, "not both"),
        ({"decode": "sometimes"}, "not one of"),
    ]:
        with pytest.raises(SurgeryConfigError, match=message):
            patch(model, "act", **args)


def test_future_tokens_can_move_earlier_outputs_but_never_the_mask():
    """Documented: detection uses all queries. The mask holds: a future token never gets attention weight."""
    model = tiny_model("llama")
    ids = random_ids(1, 16)
    with patch(model, "act", beta=0.2, threshold=0.08, layers=[0, 1]):
        maps = attention_maps(model, ids)
    for probs in maps.values():
        assert torch.all(probs.triu(1) == 0)
