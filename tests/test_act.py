"""ACT: the fused path against the plain reference, the spec's invariants, batches, padding, decode."""

from __future__ import annotations

import pytest
import torch
from attnsurgery.patches.act.reference import act_reference
from tiny import ARCHS, NOISE_FACTOR, cache_kwarg, logit_atol, random_ids, tiny_model

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


_MAP_ATOL: dict[str, float] = {}


def map_atol(arch: str) -> float:
    """Absolute tolerance for attention probabilities of the tiny ``arch`` model: NOISE_FACTOR x the stock model's own
    float32 rounding of its maps (fp32 against fp64, every layer) on this machine."""
    import copy

    if arch not in _MAP_ATOL:
        model, ids = tiny_model(arch), random_ids(2, 24)
        single, _ = maps_and_logits(model, ids)
        double, _ = maps_and_logits(copy.deepcopy(model).double(), ids)
        noise = max(float((single[k].double() - double[k]).abs().max()) for k in single)
        _MAP_ATOL[arch] = NOISE_FACTOR * noise
    return _MAP_ATOL[arch]


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
    torch.testing.assert_close(
        fused, tiled, atol=logit_atol(arch), rtol=0
    )  # fused correction == explicit edit
    expected = act_reference(base[0], 0.3, 0.08).float()
    torch.testing.assert_close(tiled_maps[0], expected, atol=map_atol(arch), rtol=0)
    # something was edited: the edit moves the map by more than the stock model's float noise in its maps
    assert (expected - base[0].float()).abs().max() > map_atol(arch)
    assert handle.surgeries[0].prompt_adaptive is True


def test_invariants_on_a_layer():
    model = tiny_model("llama")
    ids = random_ids(1, 30)
    base, _ = maps_and_logits(model, ids)
    beta, thr = 0.25, 0.06
    with patch(model, "act", beta=beta, threshold=thr, layers=[1]):
        maps, _ = maps_and_logits(model, ids)
    a, new = base[1][0].double(), maps[1][0].double()  # (H, T, T)
    tol = map_atol("llama")
    torch.testing.assert_close(new.sum(-1), torch.ones_like(new.sum(-1)), atol=tol, rtol=0)  # rows sum to 1
    assert torch.all(new[a == 0] == 0) and torch.all(new >= 0)  # causal zeros, non-negative
    edited_any = False
    for h in range(a.shape[0]):
        score = a[h].sum(0) / torch.arange(30, 0, -1)
        cand = torch.nonzero(score > thr).flatten()
        sinks, first = cand[1:], cand[0] if len(cand) else None
        rows = torch.arange(1, 30)
        if len(sinks):
            edited_any = True
            torch.testing.assert_close(new[h][rows][:, sinks], beta * a[h][rows][:, sinks], atol=tol, rtol=0)
            others = torch.tensor([j for j in range(30) if j not in sinks.tolist()])
            # proportional redistribution: every non-sink scaled by one common factor (compared in probability
            # units, where the tolerance lives; a ratio of two small probabilities would amplify their rounding)
            factor = new[h][29, others].sum() / a[h][29, others].sum()
            assert factor > 1
            torch.testing.assert_close(new[h][29, others], factor * a[h][29, others], atol=tol, rtol=0)
            if first is not None:
                assert new[h][29, first] >= a[h][29, first] - tol  # the first sink is never scaled down
    assert edited_any


def test_identity_beta_one_and_empty_heads():
    model = tiny_model("qwen2")
    ids = random_ids(2, 20)
    with torch.no_grad():
        ref = model(ids).logits
        with patch(model, "act", beta=1.0, threshold=0.05):  # actually applied, not skipped
            torch.testing.assert_close(model(ids).logits, ref, atol=logit_atol("qwen2"), rtol=0)
        with patch(model, "act", beta=0.2, threshold=0.05, heads={1: []}):
            torch.testing.assert_close(model(ids).logits, ref, atol=logit_atol("qwen2"), rtol=0)


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
            torch.testing.assert_close(
                batched[i, mask[i].bool()], single[0], atol=logit_atol("llama"), rtol=0
            )


def test_alpha_form_matches_equivalent_threshold():
    model = tiny_model("llama")
    ids = random_ids(1, 20)
    with torch.no_grad(), patch(model, "act", beta=0.3, alpha=1.6):  # 1.6 / 20 tokens = 0.08
        a = model(ids).logits
    with torch.no_grad(), patch(model, "act", beta=0.3, threshold=0.08):
        b = model(ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_decode_frozen_keeps_prefill_sinks_and_rows_sum_to_one():
    """A real decode step (one query against the cache) under ``decode="frozen"``: the sink set found at prefill is
    kept, the step's attention row sums to 1 with every frozen sink column at beta times its stock attention and the
    rest rescaled by (1 - beta P) / (1 - P), and the fused decode kernel gives the logits the recorded row gives."""
    import copy

    model = tiny_model("llama")
    ids = random_ids(2, 16)
    beta, layer = 0.3, 1
    # ACT on one layer only: the unpatched (disabled) pass then feeds that layer the same query and cache
    with patch(model, "act", beta=beta, threshold=0.08, layers=[layer]) as handle, torch.no_grad():
        out = model(ids[:, :12], use_cache=True)
        # the prompt part is exactly a full forward of the prompt
        torch.testing.assert_close(out.logits, model(ids[:, :12]).logits, atol=logit_atol("llama"), rtol=0)
        engine = Engine.of(model)
        frozen = {k: v.clone() for k, v in engine.request.extras.items()}
        assert frozen and all(v.shape[-1] == 12 for v in frozen.values())
        cache = out.past_key_values
        key = cache_kwarg(model)
        fused = model(ids[:, 12:13], use_cache=True, **{key: copy.deepcopy(cache)}).logits
        assert all(torch.equal(engine.request.extras[k], v) for k, v in frozen.items())  # sinks unchanged
        engine.start_recording({layer})  # the same step through the recorded (tiled) path
        try:
            recorded = model(ids[:, 12:13], use_cache=True, **{key: copy.deepcopy(cache)}).logits
        finally:
            row = engine.stop_recording()[layer][0]  # (B, H, 1, 13)
        with engine.disabled():
            engine.start_recording({layer})
            try:
                model(ids[:, 12:13], use_cache=True, **{key: copy.deepcopy(cache)})
            finally:
                stock = engine.stop_recording()[layer][0]
        assert handle.surgeries[0].config.decode == "frozen"
    assert row.shape[-2:] == (1, 13)
    torch.testing.assert_close(fused, recorded, atol=logit_atol("llama"), rtol=0)
    torch.testing.assert_close(row.sum(-1), torch.ones_like(row.sum(-1)), atol=map_atol("llama"), rtol=0)
    sinks = next(v for k, v in frozen.items() if k[-1] == layer)  # (B, H, 12) bool
    sinks = torch.cat([sinks, torch.zeros_like(sinks[..., :1])], dim=-1)[
        :, :, None, :
    ]  # the new key: no sink
    assert sinks.any()  # the check below is not vacuous
    p = (stock * sinks).sum(-1, keepdim=True)
    expected = torch.where(sinks, beta * stock, stock * (1 - beta * p) / (1 - p))
    torch.testing.assert_close(row, expected, atol=map_atol("llama"), rtol=0)
    assert (row - stock).abs().max() > map_atol("llama")  # the frozen sinks edit the decode row beyond noise


def test_decode_recompute_and_generate():
    model = tiny_model("gemma3")
    seqs = [random_ids(1, n, seed=n)[0] for n in (9, 13)]
    ids = torch.zeros(2, 13, dtype=torch.long)
    mask = torch.zeros(2, 13, dtype=torch.long)
    ids[0, 4:], mask[0, 4:] = seqs[0], 1
    ids[1], mask[1] = seqs[1], 1
    kw = dict(
        max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
    )
    results = {}
    for mode in ("frozen", "recompute"):
        with patch(model, "act", beta=0.3, threshold=0.08, decode=mode), torch.no_grad():
            out = model.generate(ids, attention_mask=mask, **kw)
            # batched with left padding == each prompt generated alone
            for row, seq in enumerate(seqs):
                alone = model.generate(
                    seq[None], attention_mask=torch.ones(1, len(seq), dtype=torch.long), **kw
                )
                assert torch.equal(out.sequences[row, 13:], alone.sequences[0, len(seq) :])
                for a, b in zip(out.scores, alone.scores):
                    torch.testing.assert_close(a[row], b[0], atol=logit_atol("gemma3"), rtol=0)
        assert out.sequences.shape == (2, 19)
        results[mode] = torch.stack(out.scores)
    with torch.no_grad():
        stock = torch.stack(model.generate(ids, attention_mask=mask, **kw).scores)
    # both modes change the decode steps, and differently (recompute detects from each step's own query)
    # by more than the stock model's float noise in its logits (NOISE_FACTOR x, as every logit comparison here)
    assert (results["frozen"] - stock).abs().max() > logit_atol("gemma3")
    assert (results["frozen"] - results["recompute"]).abs().max() > logit_atol("gemma3")


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
            torch.testing.assert_close(a, b, atol=logit_atol(arch), rtol=0)


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


def _sink_call(dtype, decode=False, compute=None):
    """An ACT call whose rows put ~99% of their attention on key 1 (key 0 is the unscaled first sink): at beta 0 the
    correction divides by 1 - P ~ 0.01, so any rounding of the unedited output before it is amplified 100x.
    Inputs are rounded to ``dtype`` and computed in ``compute`` (default ``dtype``)."""
    from attnsurgery.request import RequestState
    from attnsurgery.surgery import AttentionCall

    g = torch.Generator().manual_seed(0)
    b, h, kv, t, d = 2, 4, 2, 10, 16
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, kv, t, d, generator=g)
    v = torch.randn(b, kv, t, d, generator=g)
    q[..., 0] = 5.0  # every query aligns with key 1's first channel: a logit ~7 above the others
    k[..., 1:, 0] = k[..., 1:, 0].clamp(max=0.0)
    k[..., 1, 0] = 5.5
    q, k, v = (x.to(dtype).to(compute or dtype) for x in (q, k, v))
    request = RequestState()
    query = q
    if decode:  # the last row as a cached decode step, with the prefill's sinks frozen
        request.past_len, query = t - 1, q[:, :, -1:]
    call = AttentionCall(None, 0, h, kv, query.shape[2], t, None, True, request, {})
    call.query, call.key, call.value, call.scaling = query, k, v, 0.25
    return call


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_correction_is_not_amplified(dtype, decode):
    """ACT's output in bf16 / fp16 against the same (rounded) inputs computed in fp32: within 2x of the stock kernel's
    own error, even where the correction divides by 1 - P ~ 0.01 (output, lse, P and the correction stay in fp32).
    (With unrounded fp32 inputs the edited rows are also more sensitive to q / k rounding than the sink-dominated
    stock rows: a property of the edit, measured at model level in test_lowprec.py.)"""
    from attnsurgery.patches.act.config import ActConfig
    from attnsurgery.patches.act.surgery import ActSurgery

    from attnsurgery.kernels import sdpa_with_lse

    surgery = ActSurgery(ActConfig(beta=0.0, threshold=0.1), None)
    surgery._heads = {0: torch.ones(4, dtype=torch.bool)}
    results = {}
    for dt in (dtype, torch.float32):  # the same (rounded) inputs: the arithmetic's error only
        prefill = _sink_call(dtype, compute=dt)
        out, lse, sinks = surgery.detect(prefill)
        call = _sink_call(dtype, decode, compute=dt)
        if decode:
            call.request.extras[surgery._slot(call)] = sinks
        act = surgery.attention(call.query, call.key, call.value, call.scaling, call)
        stock, _ = sdpa_with_lse(call.query, call.key, call.value, None, call.scaling, True)
        results[dt] = (act.float(), stock.float(), sinks, lse)
    (act, stock, sinks, lse), (act32, stock32, sinks32, _) = results[dtype], results[torch.float32]
    assert torch.equal(sinks, sinks32) and bool(sinks[..., 1].all())
    ref = _sink_call(torch.float32)
    scores = (ref.query @ ref.key.repeat_interleave(2, 1).mT) * 0.25
    mass = torch.softmax(scores + torch.full((10, 10), float("-inf")).triu(1), -1)[..., 2:, 1]
    assert float(mass.min()) > 0.95  # the rows are conditioned as described
    err, err_stock = (act - act32).abs().max(), (stock - stock32).abs().max()
    assert err <= 2 * err_stock, f"ACT {dtype} error {float(err):.3g} vs stock {float(err_stock):.3g}"


def _fused_and_tiled(model, run):
    """``run()`` with ACT on its fused kernel, then with the fused kernels off (the exact tiled path)."""
    import attnsurgery.engine as engine_module

    fused = run()
    engine_module.FUSED_KERNELS = False
    try:
        Engine.of(model).refresh()
        tiled = run()
    finally:
        engine_module.FUSED_KERNELS = True
        Engine.of(model).refresh()
    return fused, tiled


def test_fused_equals_tiled_on_softcapped_gemma2_prefill_and_decode():
    """Gemma-2 softcaps its logits: the fused correction scores the sink columns the same way, at prefill (tiled
    detection pass + correction) and at frozen decode steps (the fused kernel hands softcapped calls to the tiled pass)."""
    model = tiny_model("gemma2")
    assert model.config.attn_logit_softcapping is not None
    ids = random_ids(2, 16)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0

    def run():
        with torch.no_grad():
            out = model(ids[:, :12], attention_mask=mask[:, :12], use_cache=True)
            steps, cache = [out.logits], out.past_key_values
            for t in range(12, 16):
                out = model(
                    ids[:, t : t + 1],
                    attention_mask=mask[:, : t + 1],
                    use_cache=True,
                    **{cache_kwarg(model): cache},
                )
                steps.append(out.logits)
                cache = out.past_key_values
        return torch.cat(steps, 1)

    with patch(model, "act", beta=0.0, threshold=0.08):
        fused, tiled = _fused_and_tiled(model, run)
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(fused[real], tiled[real], atol=logit_atol("gemma2"), rtol=0)
    # ACT edited something: the logits move by far more than the tolerance the two paths agree to
    assert (fused[real] - stock[real]).abs().max() > 10 * logit_atol("gemma2")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_fused_equals_reference_with_additive_float_mask(arch):
    """A caller's 4D float mask with biases (ALiBi-like, per head): ACT's fused path adds them to the sink logits as
    the tiled path and the model's own kernel add them to every logit; the edit equals the reference."""
    model = tiny_model(arch)
    ids = random_ids(2, 20)
    t, heads = ids.shape[1], model.config.num_attention_heads
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])[:heads, None, None]
    distance = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).float()
    bias = -slopes * distance  # (H, T, T)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = (
        (bias.masked_fill(~causal, torch.finfo(torch.float32).min))[None].expand(2, -1, -1, -1).contiguous()
    )
    plain = torch.zeros(2, 1, t, t).masked_fill(~causal, torch.finfo(torch.float32).min)
    base, _ = maps_and_logits(model, ids, attention_mask=mask)
    with patch(model, "act", beta=0.3, threshold=0.08, layers=[1]):
        with torch.no_grad():
            fused = model(ids, attention_mask=mask).logits
            unbiased = model(ids, attention_mask=plain).logits
        tiled_maps, tiled = maps_and_logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(fused, tiled, atol=logit_atol(arch), rtol=0)
    expected = act_reference(base[1], 0.3, 0.08).float()
    torch.testing.assert_close(tiled_maps[1], expected, atol=map_atol(arch), rtol=0)
    # something was edited: the edit moves the map by more than the stock model's float noise in its maps
    assert (expected - base[1].float()).abs().max() > 10 * map_atol(arch)
    assert (fused - unbiased).abs().max() > 10 * logit_atol(arch)  # the bias matters, far beyond rounding


def test_handle_repr_shows_the_threshold_that_applies():
    model = tiny_model("llama")
    with patch(model, "act") as handle:
        assert "threshold=0.1" in repr(handle)
    with patch(model, "act", alpha=5.0) as handle:
        assert "threshold=None, alpha=5.0" in repr(handle)
