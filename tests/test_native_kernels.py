"""Models loaded with another attention kernel (flash-attention, flex attention, hub kernels) keep it.

Untouched layers run the model's own kernel on its own mask; the layers a surgery changes get that mask turned into
SDPA's boolean mask (`engine.sdpa_style_mask`). Every surgery patched on such a model must give what it gives on
the SDPA-loaded model, under padding and through cached decoding, and removal must hand the kernel back.

flash-attention needs CUDA and the `flash_attn` package, so on CPU a stand-in registered with flash's mask
function reproduces flash's contract from scratch (un-padding through a 2D mask, causality aligned bottom-right, the
sliding window as ``q - k < window``); `tests/test_cuda.py` runs the real kernel where it exists. Flex attention
runs on CPU (no gradients there).
"""

from __future__ import annotations

import pytest
import torch
from tiny import cache_kwarg, logit_atol, padded_batch, random_ids, tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from attnsurgery import list_surgeries, patch
from attnsurgery.engine import NATIVE_PREFIX, native_name, sdpa_style_mask
from attnsurgery.registry import get_surgery_class

SURGERIES = [
    info.name
    for info in list_surgeries()
    if get_surgery_class(info.name).__module__.startswith("attnsurgery.patches.")
    and not getattr(get_surgery_class(info.name), "requires_vision", False)
]
ARCHS = ["llama", "gemma3"]  # GQA; sliding-window + global layers with one kv head
# not named "flash...": transformers would try to import a flash kernel by that name
FLASH = "standin_fa2"


def flash_standin(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash-attention's semantics written out plainly: a (B, Tk) padding mask or None, causal bottom-right."""
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    groups = heads // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = (query.float() @ key.float().transpose(-1, -2)) * (dim**-0.5 if scaling is None else scaling)
    if kwargs.get("softcap") is not None:
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    rows = torch.arange(q_len)[:, None] + (k_len - q_len)
    cols = torch.arange(k_len)[None, :]
    ok = (cols <= rows) if getattr(module, "is_causal", True) else torch.ones(q_len, k_len, dtype=torch.bool)
    window = kwargs.get("sliding_window")
    if window is not None:
        ok = ok & (rows - cols < window)
    ok = ok[None, None].expand(batch, 1, q_len, k_len)
    if attention_mask is not None:
        ok = ok & attention_mask[:, None, None, -k_len:].bool()
    probs = scores.masked_fill(~ok, float("-inf")).softmax(-1).nan_to_num(0.0)  # a padded query outputs 0
    out = (probs @ value.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(FLASH, flash_standin)
AttentionMaskInterface.register(FLASH, flash_attention_mask)


def _model(arch: str, impl: str):
    model = tiny_model(arch)
    model.set_attn_implementation(impl)
    return model


def _padded(lengths=(9, 14)):
    return padded_batch([random_ids(1, n, seed=n)[0] for n in lengths], "left")


def _run(model, surgery, ids, mask, decode_steps=0):
    """Logits of a padded prompt, then of ``decode_steps`` single-token steps through the cache, patched."""
    torch.manual_seed(0)  # surgeries with random init get the same parameters on both models
    kwargs = get_surgery_class(surgery).example_args
    with patch(model, surgery, **kwargs), torch.no_grad():
        assert model.config._attn_implementation.startswith(
            NATIVE_PREFIX
        ) or model.config._attn_implementation in (
            "attnsurgery",
            "attnsurgery_eager",
        )
        out = model(ids, attention_mask=mask, use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for step in range(decode_steps):
            token = random_ids(ids.shape[0], 1, seed=100 + step)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(token, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache})
            logits.append(out.logits)
            cache = out.past_key_values
    return torch.cat(logits, dim=1), mask


def test_flash_standin_matches_sdpa_unpatched():
    """The stand-in is a faithful flash: unpatched, it gives the SDPA model's logits on real tokens."""
    ids, mask = _padded()
    for arch in ARCHS:
        with torch.no_grad():
            ref = _model(arch, "sdpa")(ids, attention_mask=mask).logits
            out = _model(arch, FLASH)(ids, attention_mask=mask).logits
        torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=logit_atol(arch), rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("surgery", SURGERIES)
def test_flash_model_patched_equals_sdpa_model_patched(arch, surgery):
    ids, mask = _padded()
    ref, full_mask = _run(_model(arch, "sdpa"), surgery, ids, mask, decode_steps=3)
    flash = _model(arch, FLASH)
    out, _ = _run(flash, surgery, ids, mask, decode_steps=3)
    real = full_mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=logit_atol(arch), rtol=0)
    assert flash.config._attn_implementation == FLASH  # removal hands the kernel back


def test_untouched_layers_keep_the_native_kernel(monkeypatch):
    calls = []

    def spy(module, *args, **kwargs):
        assert module.config._attn_implementation == FLASH  # the kernel sees the config it was loaded with
        calls.append(module.layer_idx)
        return flash_standin(module, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, FLASH, spy)
    model = _model("llama", FLASH)
    ids, mask = _padded()
    with patch(model, "clipped_softmax", layers=[1], **get_surgery_class("clipped_softmax").example_args):
        assert model.config._attn_implementation == native_name(FLASH)
        with torch.no_grad():
            model(ids, attention_mask=mask)
        assert calls == [0, 2]  # layer 1 ran attnsurgery's tiled kernel, the others flash
        calls.clear()
    with patch(model, "temperature", layers=[1], tau=0.7), torch.no_grad():
        model(ids, attention_mask=mask)
        assert calls == [0, 1, 2]  # a query-level surgery runs the model's own kernel on the changed query


@pytest.mark.parametrize(
    "q_len,k_len,window,padded",
    [
        (12, 12, None, True),
        (12, 12, 5, False),
        (1, 20, None, True),
        (1, 20, 6, True),
        (4, 20, None, False),
        (4, 20, 6, True),
    ],
)
def test_flash_mask_conversion_matches_transformers_sdpa_mask(q_len, k_len, window, padded):
    """The 2D-mask conversion against transformers' own SDPA mask for the same request (offset = cached tokens)."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    mask2d = torch.ones(2, k_len, dtype=torch.bool)
    if padded:
        mask2d[0, :3] = False
    offset = k_len - q_len
    factory = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    ref = sdpa_mask(
        batch_size=2,
        cache_position=torch.arange(offset, k_len),
        q_length=q_len,
        kv_length=k_len,
        q_offset=offset,
        kv_offset=0,
        mask_function=factory,
        attention_mask=mask2d,
        allow_is_causal_skip=False,
    )
    native = flash_attention_mask(2, q_len, k_len, attention_mask=mask2d)
    out = sdpa_style_mask(native, 2, q_len, k_len, torch.device("cpu"), True, window)
    if out is None:
        out = torch.ones(q_len, k_len, dtype=torch.bool).tril(offset)[None, None].expand(2, 1, -1, -1)
    assert torch.equal(out.expand_as(ref), ref)


# -- flex attention: real on CPU, compiled once per shape (seconds), so a smaller set and no decode steps: torch
# 2.13's CPU inductor fails to compile flex attention for a one-token query against a padded cache (CppCompileError,
# unpatched models alike); the decode-step conversion of a BlockMask is the same code as the prefill's ------------
FLEX_SURGERIES = ["temperature", "head_scale", "clipped_softmax", "act", "moh", "hedgehog"]


@pytest.mark.filterwarnings(
    "ignore:_compile flag on create_block_mask:DeprecationWarning"
)  # transformers' call
@pytest.mark.parametrize("arch", ARCHS)
def test_flex_model_patched_equals_sdpa_model_patched(arch):
    ids, mask = _padded()
    sdpa, flex = _model(arch, "sdpa"), _model(arch, "flex_attention")
    for surgery in FLEX_SURGERIES:
        ref, full_mask = _run(sdpa, surgery, ids, mask)
        out, _ = _run(flex, surgery, ids, mask)
        real = full_mask.bool()
        torch.testing.assert_close(
            out[real], ref[real], atol=logit_atol(arch), rtol=0, msg=lambda m, s=surgery: f"{s}: {m}"
        )
        assert flex.config._attn_implementation == "flex_attention"
