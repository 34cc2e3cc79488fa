"""Vision-language plumbing and the VLM surgeries (VAR, VHR) on tiny random-weight LLaVA and Qwen2-VL models.

The shared text-model contract (test_contract.py) skips surgeries with ``requires_vision``; the same invariants
(identity, remove, batched + padded, cached decode, generate) are covered here on VLMs.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from attnsurgery.patches.var.reference import sink_tokens, var_reference
from tiny import KERNEL_NOISE_FACTOR, NOISE_FACTOR, force_real_path, stock_noise, tiny_model
from vlm_tiny import IMAGE_TOKEN, VISION_END, VISION_START, VLM_ARCHS, prompt, tiny_vlm, vlm_inputs

import attnsurgery.engine as engine_module
from attnsurgery import SurgeryConfigError, UnsupportedModelError, patch
from attnsurgery.engine import Engine

_ATOL: dict[str, float] = {}


def atol(arch: str) -> float:
    """NOISE_FACTOR x the stock tiny VLM's own float32 rounding of its logits (fp32 against fp64) on a padded batch
    of two image prompts, measured once per architecture on this machine."""
    if arch not in _ATOL:
        model = tiny_vlm(arch)
        inputs = vlm_inputs(model, [prompt(model, 3, 6), prompt(model, 2, 4, seed=1)])
        ids = inputs.pop("input_ids")
        _ATOL[arch] = NOISE_FACTOR * stock_noise(model, ids, **inputs)
    return _ATOL[arch]


#: tiny random models have no massive activations; at tau 1.5 on two channels a fair share of tokens (text and
#: image) qualify as sinks, enough to exercise every branch of VAR
VAR_ARGS = dict(p=0.3, tau=1.5, summ=0.05, rho=0.5, sink_dims=[0, 1])


@pytest.fixture(params=VLM_ARCHS)
def arch(request):
    return request.param


def _rows(model):
    return [prompt(model, 3, 6, seed=0), prompt(model, 1, 3, seed=1), prompt(model, 4, 8, seed=2)]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _real(logits, inputs):
    return logits[inputs["attention_mask"].bool()]


def _maps(model, inputs):
    """{layer: (B, H, T, T)} attention probabilities as the (patched) model computes them (tiled path)."""
    engine = Engine.of(model)
    engine.start_recording(set(range(engine.info.num_layers)))
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    finally:
        maps = engine.stop_recording()
    return {k: v[0] for k, v in maps.items()}, out


def map_tolerances(model, inputs) -> dict[str, float]:
    """KERNEL_NOISE_FACTOR x the float32 rounding of the *unpatched* model's attention maps on these inputs, against
    a float64 copy, over real rows and keys: absolute ('abs'), relative ('rel') and of the row sums against 1
    ('sums'). One edited layer is one op beyond the stock one; a different CPU or BLAS moves these, a wrong
    redistribution does not fit under them."""
    import copy

    base, _ = _maps(model, inputs)
    exact, _ = _maps(
        copy.deepcopy(model).double(),
        {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()},
    )
    valid = inputs["attention_mask"].bool()
    rows = valid[:, None, :, None] & valid[:, None, None, :]
    noise = {"abs": 0.0, "rel": 0.0, "sums": 0.0}
    for layer, probs in base.items():
        err = (probs.double() - exact[layer]).abs() * rows
        noise["abs"] = max(noise["abs"], float(err.max()))
        noise["rel"] = max(noise["rel"], float((err / exact[layer].abs().clamp_min(1e-30)).max()))
        noise["sums"] = max(
            noise["sums"], float(((probs.double().sum(-1) - 1).abs() * valid[:, None, :]).max())
        )
    eps = torch.finfo(torch.float32).eps
    return {k: KERNEL_NOISE_FACTOR * max(v, eps) for k, v in noise.items()}


# ----------------------------------------------------------------------------------------------------------
# Plumbing
# ----------------------------------------------------------------------------------------------------------


def test_engine_finds_language_model_and_leaves_vision_tower(arch):
    model = tiny_vlm(arch)
    vision = [m for n, m in model.named_modules() if "visual" in n or "vision_tower" in n]
    with patch(model, "head_scale", scale=0.5):
        info = Engine.of(model).info
        assert info.is_vision_language and info.image_token_id == IMAGE_TOKEN
        assert info.num_layers == 4 and len(info.layers) == 4
        assert all(layer.self_attn is attn for layer, attn in zip(info.layers, info.attention))
        assert not any(hasattr(m, "attnsurgery_layer") for m in vision)
        vision_impl = (model.config.vision_config._attn_implementation,)
        assert vision_impl == ("sdpa",)


@pytest.mark.parametrize("side", ["left", "right"])
def test_image_masks_per_row_and_through_decode(arch, side):
    model = tiny_vlm(arch)
    inputs = vlm_inputs(model, _rows(model), side=side)
    with patch(model, "head_scale", scale=0.5), torch.no_grad():
        request = Engine.of(model).request
        model(**inputs, use_cache=True)
        assert torch.equal(request.image_mask, inputs["input_ids"] == IMAGE_TOKEN)
        if side == "right":
            return
        model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        width = inputs["input_ids"].shape[1]
        assert request.image_mask.shape == (3, width + 3)  # the last generated token is never fed back
        assert torch.equal(request.image_mask[:, :width], inputs["input_ids"] == IMAGE_TOKEN)
        assert not request.image_mask[:, width:].any()


def test_layer_inputs_are_the_residual_stream(arch):
    model = tiny_vlm(arch)
    inputs = vlm_inputs(model, _rows(model))
    seen = {}
    with patch(model, "head_scale", scale=0.5) as handle:
        engine = Engine.of(model)
        engine.capture_layer_inputs(handle.surgeries[0], lambda i, h, r: seen.__setitem__(i, h.clone()))
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    for i in range(4):
        torch.testing.assert_close(seen[i], out.hidden_states[i], atol=0, rtol=0)
    seen.clear()
    with torch.no_grad():
        model(**inputs)
    assert not seen  # the hooks went with the surgery


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("name", "args"), [("var", VAR_ARGS), ("vhr", dict(alpha=2.0))])
def test_4d_mask_equals_2d_mask(side, name, args):
    """A 4D mask (generate with a static cache, or a caller's own) tells the surgeries which tokens are real, as the
    2D mask does: VHR picks its heads at each row's last real token, VAR never edits or counts padding."""
    model = tiny_vlm("llava")
    inputs = vlm_inputs(model, _rows(model), side=side)
    mask = inputs["attention_mask"].bool()
    t = mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    inputs4 = {**inputs, "attention_mask": causal[None, None] & mask[:, None, None, :]}
    # the positions the 2D path would give (the 4D path cannot derive them from the mask)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with patch(model, name, **args):
        flat = _logits(model, {**inputs, "position_ids": position_ids})
        chosen = _chosen(model)
        full = _logits(model, {**inputs4, "position_ids": position_ids})
        assert all(torch.equal(v, chosen[k]) for k, v in _chosen(model).items())
    torch.testing.assert_close(full[mask], flat[mask], atol=atol("llava"), rtol=0)


# ----------------------------------------------------------------------------------------------------------
# VAR
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("identity", [{"p": 1.0}, {"rho": 0.0}])
def test_var_identity_settings(arch, identity):
    model = tiny_vlm(arch)
    inputs = vlm_inputs(model, _rows(model))
    ref = _logits(model, inputs)
    with patch(model, "var", **{**VAR_ARGS, **identity}):
        out = _logits(model, inputs)
    torch.testing.assert_close(_real(out, inputs), _real(ref, inputs), atol=atol(arch), rtol=0)
    with patch(model, "var", **{**VAR_ARGS, **identity}) as handle:  # VAR's own kernel at identity settings
        force_real_path(handle)
        out = _logits(model, inputs)
    torch.testing.assert_close(_real(out, inputs), _real(ref, inputs), atol=atol(arch), rtol=0)
    with patch(model, "var", **VAR_ARGS):
        assert (_real(_logits(model, inputs), inputs) - _real(ref, inputs)).abs().max() > 10 * atol(arch)


@pytest.mark.parametrize("side", ["left", "right"])
def test_var_matches_reference_layer_by_layer(arch, side):
    """One layer at a time (its input is then the stock model's): recorded maps == the plain reference on the
    stock maps with sinks from the stock hidden states; the fused path == the tiled path."""
    model = tiny_vlm(arch, layers=5)
    inputs = vlm_inputs(model, _rows(model), side=side)
    valid = inputs["attention_mask"].bool()
    image = inputs["input_ids"] == IMAGE_TOKEN
    base, base_out = _maps(model, inputs)
    tol = map_tolerances(model, inputs)
    edited_layers = 0
    for layer in (2, 3):
        with patch(model, "var", layers=[layer], **VAR_ARGS):
            fused = _logits(model, inputs)
            maps, out = _maps(model, inputs)
            recorded = Engine.of(model).request.extras
            (slot,) = [k for k in recorded if k[0] == "var"]
            detected = recorded[slot]
        torch.testing.assert_close(_real(fused, inputs), _real(out.logits, inputs), atol=atol(arch), rtol=0)
        hidden = base_out.hidden_states[layer]
        sinks = sink_tokens(hidden, [0, 1], 1.5)
        x = hidden.double()
        phi = (x[..., [0, 1]].abs() / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()).amax(-1)
        # fp32 detection vs this fp64 reference can disagree only within float32 rounding of phi at the threshold
        borderline = (phi - 1.5).abs() < KERNEL_NOISE_FACTOR * torch.finfo(torch.float32).eps * float(
            phi.max()
        )
        assert torch.equal(detected[~borderline], sinks[~borderline])
        expected = var_reference(base[layer], image, detected & valid, 0.3, 0.5, 0.05, query_valid=valid)
        rows = valid[:, None, :, None] & valid[:, None, None, :]
        torch.testing.assert_close(
            maps[layer].double() * rows, expected * rows, atol=tol["abs"], rtol=tol["rel"]
        )
        edited_layers += bool((expected - base[layer].double()).abs().max() > 100 * tol["abs"])
        for other in set(range(5)) - {layer}:  # earlier layers untouched
            if other < layer:
                torch.testing.assert_close(maps[other], base[other], atol=tol["abs"], rtol=0)
    assert edited_layers == 2


def test_var_invariants(arch):
    model = tiny_vlm(arch, layers=5)
    inputs = vlm_inputs(model, _rows(model))
    valid = inputs["attention_mask"].bool()
    image = inputs["input_ids"] == IMAGE_TOKEN
    base, _ = _maps(model, inputs)
    tol = map_tolerances(model, inputs)
    with patch(model, "var", layers=[2], **VAR_ARGS):
        maps, _ = _maps(model, inputs)
        sinks = [v for k, v in Engine.of(model).request.extras.items() if k[0] == "var"][0] & valid
    a, new = base[2].double(), maps[2].double()  # (B, H, T, T)
    real_rows = valid[:, None, :]
    sums = new.sum(-1)[real_rows.expand_as(new.sum(-1))]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=tol["sums"], rtol=0)  # rows sum to 1
    assert torch.all(new >= 0)
    other = ~image & ~sinks  # non-visual, non-sink columns: unchanged
    torch.testing.assert_close(new * other[:, None, None], a * other[:, None, None], atol=tol["abs"], rtol=0)
    changed = (new - a).abs().amax(-1) > tol["abs"]  # (B, H, T) edited rows
    assert changed.any()
    rest = image & ~sinks
    for b, h, i in changed.nonzero().tolist():
        torch.testing.assert_close(
            new[b, h, i, sinks[b]], 0.3 * a[b, h, i, sinks[b]], atol=tol["abs"], rtol=tol["rel"]
        )
        # proportional: one factor on all visual non-sinks (a ratio of two maps: twice their relative rounding)
        ratio = new[b, h, i, rest[b]] / a[b, h, i, rest[b]]
        torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), atol=0, rtol=2 * tol["rel"])
        assert ratio[0] > 1
        assert i > int(image[b].nonzero().max())  # only queries after the image


@pytest.mark.parametrize("side", ["left", "right"])
def test_var_batched_padded_equals_one_by_one(arch, side):
    model = tiny_vlm(arch)
    rows = _rows(model)
    inputs = vlm_inputs(model, rows, side=side)
    with patch(model, "var", **VAR_ARGS):
        batched = _logits(model, inputs)
        for i, row in enumerate(rows):
            single = _logits(model, vlm_inputs(model, [row], seed=i))
            real = inputs["attention_mask"][i].bool()
            torch.testing.assert_close(batched[i, real], single[0], atol=atol(arch), rtol=0)


def test_var_cached_decode(arch):
    model = tiny_vlm(arch)
    inputs = vlm_inputs(model, _rows(model))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with patch(model, "var", decode="detect", **VAR_ARGS):
            cached = model.generate(**inputs, use_cache=True, **kw)
            uncached = model.generate(**inputs, use_cache=False, **kw)
            # prefill + cached decode == one full forward over prompt + generated tokens
            full_inputs = {**inputs, "input_ids": cached, "attention_mask": torch.ones_like(cached)}
            full_inputs["attention_mask"][:, : inputs["input_ids"].shape[1]] = inputs["attention_mask"]
            if "mm_token_type_ids" in inputs:
                full_inputs["mm_token_type_ids"] = (cached == IMAGE_TOKEN).int()
            full = model(**full_inputs).logits
        assert torch.equal(cached, uncached)
        width = inputs["input_ids"].shape[1]
        assert torch.equal(full[:, width - 1 : -1].argmax(-1), cached[:, width:])
        with patch(model, "var", **VAR_ARGS) as handle:  # frozen: generated tokens never become sinks
            assert handle.surgeries[0].config.decode == "frozen"
            out = model.generate(**inputs, **kw)
            extras = Engine.of(model).request.extras
            sinks = [v for k, v in extras.items() if k[0] == "var"]
        assert out.shape == cached.shape
        assert sinks and all(s.shape[1] == out.shape[1] - 1 and not s[:, width:].any() for s in sinks)


def test_var_beam_search(arch):
    """decode="detect" tests each generated token, so its sink columns are per beam: they must follow the beams
    when beam search reorders the cache (cached decoding then equals full forwards, which re-detect everything).
    "frozen" keeps only the prompt's sinks, the same for every beam of a prompt."""
    model = tiny_vlm(arch)
    inputs = vlm_inputs(model, _rows(model)[:2])
    kw = dict(
        max_new_tokens=5,
        num_beams=2,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        with patch(model, "var", decode="detect", **VAR_ARGS):
            cached = model.generate(**inputs, **kw)
            uncached = model.generate(**inputs, use_cache=False, **kw)
        assert torch.equal(cached.sequences, uncached.sequences)
        torch.testing.assert_close(
            cached.sequences_scores, uncached.sequences_scores, atol=atol(arch), rtol=0
        )
        with patch(model, "var", **VAR_ARGS):
            frozen = model.generate(**inputs, **kw)
            sinks = [v for k, v in Engine.of(model).request.extras.items() if k[0] == "var"]
        assert sinks and all(torch.equal(s[0::2], s[1::2]) for s in sinks)  # beams of one prompt agree
        assert frozen.sequences.shape[0] == 2


def test_var_last_layer(arch):
    model = tiny_vlm(arch)
    inputs = vlm_inputs(model, _rows(model))
    with patch(model, "var", layers=[3], **VAR_ARGS):
        assert Engine.of(model).info.num_layers == 4
        torch.testing.assert_close(_logits(model, inputs), _logits(model, inputs))
        maps, _ = _maps(model, inputs)
    base, _ = _maps(model, inputs)
    torch.testing.assert_close(maps[3], base[3], atol=0, rtol=0)  # the paper skips the last layer
    with patch(model, "var", layers=[3], skip_last_layer=False, **VAR_ARGS):
        maps, _ = _maps(model, inputs)
    assert (maps[3] - base[3]).abs().max() > 100 * map_tolerances(model, inputs)[
        "abs"
    ]  # the released code does


def test_var_remove_restores_and_fused_off_agrees(arch):
    model = tiny_vlm(arch)
    inputs = vlm_inputs(model, _rows(model))
    ref = _logits(model, inputs)
    handle = patch(model, "var", **VAR_ARGS)
    fused = _logits(model, inputs)
    engine_module.FUSED_KERNELS = False
    try:
        Engine.of(model).refresh()
        tiled = _logits(model, inputs)
    finally:
        engine_module.FUSED_KERNELS = True
    handle.remove()
    torch.testing.assert_close(_real(fused, inputs), _real(tiled, inputs), atol=atol(arch), rtol=0)
    assert torch.equal(_logits(model, inputs), ref)
    assert not [(n, a) for n, m in model.named_modules() for a in vars(m) if a.startswith("attnsurgery")]


def test_var_bad_input():
    text_model = tiny_model("llama")
    with pytest.raises(UnsupportedModelError, match="vision-language"):
        patch(text_model, "var", sink_dims=[0])
    model = tiny_vlm("llava")
    with pytest.raises(SurgeryConfigError, match="out of range"):
        patch(model, "var", sink_dims=[0, 64])
    with pytest.raises(SurgeryConfigError, match="no known sink dimensions"):
        patch(model, "var")
    with pytest.raises(SurgeryConfigError, match="p=1.5 is out of range"):
        patch(model, "var", p=1.5, sink_dims=[0])
    with pytest.raises(SurgeryConfigError, match="whole numbers"):
        patch(model, "var", sink_dims=["a"])
    assert Engine.of(model, create=False) is None  # nothing half-applied
    text_only = vlm_inputs(model, [torch.tensor([1, 5, 6, 7, 8, 9])])
    ref = _logits(model, text_only)
    with patch(model, "var", **VAR_ARGS), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _logits(model, text_only)
    assert torch.equal(out, ref)
    assert any("no image tokens" in str(w.message) for w in caught)


def test_var_known_sink_dims():
    from attnsurgery.patches.var.config import lookup_sink_dims, near_sink_dims

    assert lookup_sink_dims("llama", 4096, 32, 32064) == ("llava-1.5-7b", [2533, 1415])
    assert lookup_sink_dims("llama", 4096, 32, 32000) == ("llava-1.5-7b", [2533, 1415])
    assert lookup_sink_dims("llama", 5120, 40, 32064) == ("llava-1.5-13b", [2100, 4743])
    assert lookup_sink_dims("qwen2_vl_text", 3584, 28, 152064) == ("qwen2-vl-7b", [458, 2570])
    assert lookup_sink_dims("mistral", 4096, 32, 32064) is None
    # a Llama-3-based LLaVA has Llama-2-7B's shape but not its vocabulary: only a partial match
    assert lookup_sink_dims("llama", 4096, 32, 128320) is None
    assert lookup_sink_dims("llama", 4096, 32, None) is None
    assert near_sink_dims("llama", 4096, 32) == "llava-1.5-7b"
    assert near_sink_dims("mistral", 4096, 32) is None


def test_var_sink_dims_full_and_partial_match(monkeypatch):
    """Known dims are used only when shape and vocabulary match; a shape-only match is a clear error, not the
    wrong backbone's dims."""
    from attnsurgery.patches.var import config as var_config

    model = tiny_vlm("llava")  # llama, hidden 64, 4 layers, vocabulary 128
    inputs = vlm_inputs(model, _rows(model))
    entry = dict(
        model_type="llama", hidden_size=64, layers=4, vocab=(128, 128), base="Tiny-Llama", dims=[0, 1]
    )
    monkeypatch.setitem(var_config.KNOWN_SINK_DIMS, "tiny-llava", entry)
    args = {k: v for k, v in VAR_ARGS.items() if k != "sink_dims"}
    with patch(model, "var", sink_dims=[0, 1], **args):
        explicit = _logits(model, inputs)
    with patch(model, "var", **args) as handle:
        assert handle.surgeries[0]._dims == [0, 1]
        torch.testing.assert_close(_logits(model, inputs), explicit, atol=0, rtol=0)
    monkeypatch.setitem(var_config.KNOWN_SINK_DIMS, "tiny-llava", {**entry, "vocab": (200, 256)})
    with pytest.raises(SurgeryConfigError) as caught:
        patch(model, "var", **args)
    message = str(caught.value)
    for part in (
        "shape of tiny-llava",
        "vocabulary 128",
        "not Tiny-Llama",
        "calibrate var",
        "sink_dims=[0, 1]",
    ):
        assert part in message
    assert Engine.of(model, create=False) is None  # nothing half-applied


# ----------------------------------------------------------------------------------------------------------
# VHR
# ----------------------------------------------------------------------------------------------------------


def _text_only(model, row):
    """The paper's text-only prompt: image tokens (and Qwen2-VL's vision start/end) and pixels removed."""
    keep = ~torch.isin(row, torch.tensor(Engine.of(model).info.vision_token_ids))
    ids = row[keep][None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _chosen(model):
    extras = Engine.of(model).request.extras
    return {k[2]: v.clone() for k, v in extras.items() if k[0] == "vhr"}


def test_vhr_paper_layers():
    from attnsurgery.patches.vhr.config import paper_layers

    assert paper_layers(32) == [1, *range(18, 32)]
    assert paper_layers(40) == [1, *range(22, 40)]  # round(14 / 32 * 40) = 18 layers
    assert paper_layers(4) == [1, 2, 3]


def test_vhr_identity_and_reference(arch):
    from attnsurgery.patches.vhr.reference import vhr_reference

    model = tiny_vlm(arch, layers=6)
    row = prompt(model, 3, 6)
    inputs = vlm_inputs(model, [row])
    ref = _logits(model, inputs)
    with patch(model, "vhr", alpha=1.0):
        torch.testing.assert_close(_logits(model, inputs), ref, atol=0, rtol=0)
    with patch(model, "vhr", alpha=1.0) as handle:  # its head-output stage on every targeted layer
        force_real_path(handle)
        torch.testing.assert_close(_logits(model, inputs), ref, atol=atol(arch), rtol=0)
    with patch(model, "vhr", alpha=2.0):
        layers = sorted(Engine.of(model).surgeries[0]._layers)
        text_inputs = _text_only(model, row)
        out = _logits(model, inputs)
        chosen = _chosen(model)
    assert layers == [1, 3, 4, 5]  # layer 1 + the last round(14 / 32 * 6) = 3
    expected, expected_heads = vhr_reference(model, inputs, text_inputs, layers, 2.0)
    assert sorted(chosen) == layers
    for layer in layers:
        assert torch.equal(chosen[layer][0], expected_heads[layer])
    torch.testing.assert_close(out, expected, atol=atol(arch), rtol=0)
    assert (out - ref).abs().max() > 10 * atol(arch)


def test_vhr_text_pass_sees_the_other_surgeries(arch):
    """Both branches of the divergence run on the model as it is used: other surgeries act in the text-only pass
    as in the with-image pass (VHR's own reinforcement is off there, docs/vlm.md choice 1)."""
    model = tiny_vlm(arch)
    row = prompt(model, 3, 6)
    inputs = vlm_inputs(model, [row])
    o_proj = model.get_decoder().layers[3].self_attn.o_proj
    seen = []
    hook = o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][:, -1].clone()))
    with torch.no_grad(), patch(model, "head_scale", heads={0: [0, 1]}, scale=0.2):
        model(**_text_only(model, row))  # the text-only prompt with head_scale alone
        with patch(model, "vhr", alpha=2.0) as handle:
            model(**inputs)
            recorded = handle.surgeries[0]._text[3]
    hook.remove()
    stock_scaled, in_pass = seen[0], seen[1]
    torch.testing.assert_close(in_pass, stock_scaled, atol=0, rtol=0)
    torch.testing.assert_close(recorded.flatten(1), stock_scaled, atol=0, rtol=0)


def test_vhr_scales_at_most_half_and_leaves_the_rest(arch):
    model = tiny_vlm(arch, heads=8, kv_heads=4, hidden=64, layers=4)
    inputs = vlm_inputs(model, _rows(model))
    o_proj = model.get_decoder().layers[1].self_attn.o_proj
    seen = []
    handle = o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    with torch.no_grad():
        model(**inputs)
        with patch(model, "vhr", alpha=2.0):
            model(**inputs)
            chosen = _chosen(model)
    handle.remove()
    assert len(seen) == 3  # stock, the text-only pass, the with-image pass
    stock, scaled = (x.view(*x.shape[:-1], 8, -1) for x in (seen[0], seen[2]))  # (B, T, H, Dh)
    for heads in chosen.values():
        assert torch.all(heads.sum(-1) <= 4) and heads.any()
    heads = chosen[1]  # layer 1: its input is the stock model's, so unscaled heads are bit-identical
    for b in range(3):
        torch.testing.assert_close(scaled[b][:, ~heads[b]], stock[b][:, ~heads[b]], atol=0, rtol=0)
        torch.testing.assert_close(scaled[b][:, heads[b]], 2.0 * stock[b][:, heads[b]], atol=0, rtol=0)


def test_vhr_heads_fixed_through_decode(arch):
    model = tiny_vlm(arch)
    row = prompt(model, 3, 6)
    inputs = vlm_inputs(model, [row])
    kw = dict(
        max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True
    )
    with torch.no_grad():
        with patch(model, "vhr", alpha=2.0):
            model(**inputs)
            at_prefill = _chosen(model)
            out = model.generate(**inputs, **kw)
            after = _chosen(model)
        assert at_prefill.keys() == after.keys() and all(torch.equal(at_prefill[k], after[k]) for k in after)
        # decode steps == the stock model with those heads scaled at every position (one full forward)
        heads = {layer: v[0].nonzero().flatten().tolist() for layer, v in after.items()}
        seq = out.sequences
        full_inputs = {**inputs, "input_ids": seq, "attention_mask": torch.ones_like(seq)}
        if "mm_token_type_ids" in inputs:
            full_inputs["mm_token_type_ids"] = (seq == IMAGE_TOKEN).int()
        with patch(model, "head_scale", heads=heads, scale=2.0):
            full = model(**full_inputs).logits
    width = inputs["input_ids"].shape[1]
    steps = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(steps, full[:, width - 1 : -1], atol=atol(arch), rtol=0)


def test_vhr_heads_fixed_without_cache(arch):
    """generate(use_cache=False) runs a full forward per step; each extends the prompt whose heads were chosen at
    the first step, so the heads stay (no new text-only pass) and the output equals cached generation."""
    model = tiny_vlm(arch)
    inputs = vlm_inputs(model, _rows(model)[:2])
    kw = dict(
        max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
    )
    steps, text_passes = [], []
    with patch(model, "vhr", alpha=2.0), torch.no_grad():
        engine = Engine.of(model)
        cached = model.generate(**inputs, **kw)
        at_prefill = _chosen(model)
        side_forward = engine.side_forward
        engine.side_forward = lambda **kw: text_passes.append(1) or side_forward(**kw)
        hook = model.register_forward_hook(lambda *a: steps.append(_chosen(model)))
        uncached = model.generate(**inputs, use_cache=False, **kw)
        hook.remove()
        assert len(text_passes) == 1
        # plain forwards: a longer prompt with the same images continues; other pixels make a new prompt
        seq = uncached.sequences
        longer = {**inputs, "input_ids": seq, "attention_mask": torch.ones_like(seq)}
        longer["attention_mask"][:, : inputs["input_ids"].shape[1]] = inputs["attention_mask"]
        if "mm_token_type_ids" in inputs:
            longer["mm_token_type_ids"] = (seq == IMAGE_TOKEN).int()
        model(**inputs)
        model(**longer)
        assert len(text_passes) == 2
        model(**{**longer, "pixel_values": longer["pixel_values"] + 1})
        assert len(text_passes) == 3
    steps = [chosen for chosen in steps if chosen]  # the text-only pass (a nested forward) chooses nothing
    assert len(steps) == 4
    for chosen in steps:
        assert chosen.keys() == at_prefill.keys()
        assert all(torch.equal(chosen[k], at_prefill[k]) for k in chosen)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=atol(arch), rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_vhr_batched_padded_equals_one_by_one(arch, side):
    model = tiny_vlm(arch)
    rows = [*_rows(model), torch.tensor([1, 5, 6, 7, 8])]  # a text-only row is left unchanged
    inputs = vlm_inputs(model, rows, side=side)
    ref = _logits(model, inputs)
    with patch(model, "vhr", alpha=2.0), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = _logits(model, inputs)
        chosen = _chosen(model)
        assert not any(v[3].any() for v in chosen.values())
        for i, row in enumerate(rows[:3]):
            single = _logits(model, vlm_inputs(model, [row], seed=i))
            real = inputs["attention_mask"][i].bool()
            torch.testing.assert_close(batched[i, real], single[0], atol=atol(arch), rtol=0)
            assert all(torch.equal(v[0], chosen[k][i]) for k, v in _chosen(model).items())
    real = inputs["attention_mask"][3].bool()
    torch.testing.assert_close(batched[3, real], ref[3, real], atol=atol(arch), rtol=0)


def test_vhr_generate_and_bad_input(arch):
    model = tiny_vlm(arch)
    inputs = vlm_inputs(model, _rows(model))
    kw = dict(
        max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        with patch(model, "vhr", alpha=2.0):
            out = model.generate(**inputs, **kw)
            # generated tokens go through the cache: the first step's scores are the full forward's last position
            full = model(**inputs).logits[:, -1]
        stock = model.generate(**inputs, **kw)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 4
    torch.testing.assert_close(out.scores[0], full, atol=atol(arch), rtol=0)
    assert all(torch.isfinite(s).all() for s in out.scores)
    assert not torch.allclose(
        torch.stack(out.scores), torch.stack(stock.scores), atol=10 * atol(arch), rtol=0
    )  # it changes generation
    with pytest.raises(UnsupportedModelError, match="vision-language"):
        patch(tiny_model("llama"), "vhr")
    text_only = vlm_inputs(model, [torch.tensor([1, 5, 6, 7, 8, 9])])
    ref = _logits(model, text_only)
    with patch(model, "vhr"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _logits(model, text_only)
    assert torch.equal(out, ref)
    assert any("no image tokens" in str(w.message) for w in caught)


def test_var_and_vhr_compose(arch):
    model = tiny_vlm(arch)
    inputs = vlm_inputs(model, _rows(model))
    ref = _logits(model, inputs)
    with patch(model, "var", **VAR_ARGS):
        var_only = _logits(model, inputs)
        with patch(model, "vhr", alpha=2.0):
            both = _logits(model, inputs)
        torch.testing.assert_close(_logits(model, inputs), var_only, atol=0, rtol=0)
    assert (_real(both, inputs) - _real(var_only, inputs)).abs().max() > 10 * atol(arch)
    assert torch.equal(_logits(model, inputs), ref)


@pytest.mark.parametrize(("name", "args"), [("var", VAR_ARGS), ("vhr", dict(alpha=2.0))])
def test_remove_drops_per_request_state(name, args):
    """Removing VAR / VHR while another surgery stays leaves none of their per-request slots behind (a later
    surgery object could reuse the id they are keyed by), and the model is the other surgery alone."""
    model = tiny_vlm("llava")
    inputs = vlm_inputs(model, _rows(model))
    with patch(model, "head_scale", heads={1: [0]}, scale=0.5):
        only_other = _logits(model, inputs)
        handle = patch(model, name, **args)
        _logits(model, inputs)
        gone = id(handle.surgeries[0])
        request = Engine.of(model).request
        assert any(k[1] == gone for k in request.extras)
        handle.remove()
        assert not any(isinstance(k, tuple) and gone in k for k in request.extras)
        torch.testing.assert_close(_logits(model, inputs), only_other, atol=0, rtol=0)


VIDEO_TOKEN = 103  # the tiny Qwen2-VL's video_token_id


def _video_inputs(model, before=3, after=6, seed=0):
    """One Qwen2-VL row with a video (2 frames = one temporal patch, an 8 x 8 grid: 16 video tokens)."""
    g = torch.Generator().manual_seed(seed)
    text = lambda k: torch.randint(3, 99, (k,), generator=g).tolist()  # noqa: E731
    ids = torch.tensor([[1, *text(before), VISION_START, *[VIDEO_TOKEN] * 16, VISION_END, *text(after)]])
    vc = model.config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    out = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": torch.randn(64, patch_dim, generator=g),
        "video_grid_thw": torch.tensor([[1, 8, 8]]),
    }
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        out["mm_token_type_ids"] = (ids == VIDEO_TOKEN).int() * 2  # text 0, image 1, video 2
    return out


def test_video_tokens_are_visual_tokens():
    """Qwen2-VL video placeholders are visual tokens: VAR redistributes to them, VHR removes them (with the vision
    start/end tokens and the video pixels) for its text-only pass."""
    from attnsurgery.patches.vhr.reference import vhr_reference

    model = tiny_vlm("qwen2_vl", layers=6)
    inputs = _video_inputs(model)
    ids = inputs["input_ids"]
    ref = _logits(model, inputs)
    with patch(model, "head_scale", scale=0.5):
        _logits(model, inputs)
        info = Engine.of(model).info
        assert VIDEO_TOKEN in info.vision_token_ids
        assert torch.equal(Engine.of(model).request.image_mask, ids == VIDEO_TOKEN)
    with patch(model, "var", **VAR_ARGS), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no image tokens" notice
        assert (_logits(model, inputs) - ref).abs().max() > 10 * atol("qwen2_vl")
    with patch(model, "vhr", alpha=2.0), warnings.catch_warnings():
        warnings.simplefilter("error")
        layers = sorted(Engine.of(model).surgeries[0]._layers)
        out = _logits(model, inputs)
        chosen = _chosen(model)
    text = ids[:, ~torch.isin(ids[0], torch.tensor([VISION_START, VISION_END, VIDEO_TOKEN]))]
    expected, expected_heads = vhr_reference(
        model, inputs, {"input_ids": text, "attention_mask": torch.ones_like(text)}, layers, 2.0
    )
    assert sorted(chosen) == layers and all(torch.equal(chosen[k][0], expected_heads[k]) for k in layers)
    torch.testing.assert_close(out, expected, atol=atol("qwen2_vl"), rtol=0)


# ----------------------------------------------------------------------------------------------------------
# calibrate var
# ----------------------------------------------------------------------------------------------------------


def test_find_sink_dims_recovers_planted_massive_activations(arch):
    from attnsurgery.patches.var.calibrate import find_sink_dims

    model = tiny_vlm(arch)
    embed = model.get_input_embeddings().weight
    with torch.no_grad():  # BOS carries massive activations in channels 3 and 41, as sink tokens do
        embed[1, [3, 41]] = 50 * embed[1].abs().mean()
    prompts = [vlm_inputs(model, [prompt(model, 2 + i, 4, seed=i)], seed=i) for i in range(3)]
    assert find_sink_dims(model, None, prompts, tau=5.0) == [3, 41]
    with pytest.raises(SurgeryConfigError, match="no channel reaches"):
        find_sink_dims(model, None, prompts, tau=50.0)
    with pytest.raises(SurgeryConfigError, match="at least one prompt"):
        find_sink_dims(model, None, [])
    # BOS is then a text sink for VAR at every detected layer
    with patch(model, "var", sink_dims=[3, 41], tau=5.0, summ=0.05) as handle:
        _logits(model, prompts[0])
        sinks = [v for k, v in Engine.of(model).request.extras.items() if k[0] == "var"]
    assert sinks and all(bool(s[0, 0]) for s in sinks)
    assert handle.surgeries[0].config.sink_dims == [3, 41]


@pytest.mark.parametrize(
    ("name", "args"),
    [("var", dict(p=0.3, tau=1.5, summ=0.05, rho=0.5, sink_dims=[0, 1])), ("vhr", dict(alpha=2.0))],
)
def test_static_cache_generate_equals_dynamic(name, args):
    """A static cache has more key columns than tokens, and generate hands the model a 4D mask with it."""
    model = tiny_vlm("llava")
    inputs = vlm_inputs(model, [prompt(model, 3, 6, seed=0), prompt(model, 1, 3, seed=1)])
    kw = dict(
        max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
    )
    with warnings.catch_warnings(), torch.no_grad(), patch(model, name, **args):
        warnings.simplefilter("ignore")
        dynamic = model.generate(**inputs, **kw)
        static = model.generate(**inputs, cache_implementation="static", **kw)
    for a, b in zip(dynamic.scores, static.scores):
        torch.testing.assert_close(a, b, atol=atol("llava"), rtol=0)
