"""CUDA paths (run wherever CUDA exists; skipped on CPU-only machines such as CI, and not counted as passing
there): the fused CUDA attention with log-sum-exp against the exact tiled pass, and patched models on the GPU
against the same model on the CPU."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHS, random_ids, tiny_model

from attnsurgery import patch
from attnsurgery.kernels import AttentionStats, sdpa_with_lse, tiled_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(dtype, groups=2, q_len=37, k_len=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, q_len, 32, generator=g).to("cuda", dtype)
    k = torch.randn(2, 4 // groups, k_len, 32, generator=g).to("cuda", dtype)
    v = torch.randn(2, 4 // groups, k_len, 32, generator=g).to("cuda", dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_cuda_equals_tiled(dtype, masked):
    q, k, v = _inputs(dtype)
    mask = None
    if masked:  # left padding on row 0: a 4D boolean mask, as transformers builds for SDPA
        allowed = torch.ones(37, 37, dtype=torch.bool, device="cuda").tril()[None, None].repeat(2, 1, 1, 1)
        allowed[0, :, :, :5] = False
        mask = allowed
    out, lse = sdpa_with_lse(q, k, v, mask, 32**-0.5, True, out_dtype=torch.float32)
    stats = AttentionStats()
    ref = tiled_attention(q.float(), k.float(), v.float(), mask, 32**-0.5, is_causal=True, stats=stats)
    rows = slice(5, None) if masked else slice(None)  # fully masked rows are undefined
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.transpose(1, 2)[:, rows], ref[:, rows], atol=tol, rtol=0)
    torch.testing.assert_close(lse[..., rows], stats.lse[..., rows], atol=tol, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("surgery", "args"), [("act", dict(beta=0.3, threshold=0.08)), ("clipped_softmax", dict(gamma=-0.03))]
)
def test_patched_model_on_cuda_equals_cpu(arch, surgery, args):
    model = tiny_model(arch)
    ids = random_ids(2, 24)
    with patch(model, surgery, **args), torch.no_grad():
        cpu = model(ids).logits
    model = model.to("cuda")
    with patch(model, surgery, **args), torch.no_grad():
        gpu = model(ids.to("cuda")).logits.cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _flash_available(), reason="needs the flash_attn package")
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize(
    "surgery,args", [("act", {"beta": 0.3, "threshold": 0.08}), ("clipped_softmax", {"gamma": -0.03, "zeta": 1.02})]
)
def test_flash_attention_model_keeps_flash_and_matches_sdpa(arch, surgery, args):
    """A model loaded with flash_attention_2 keeps it on untouched layers; patched, it matches the SDPA model."""
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ids, mask = ids.cuda(), mask.cuda()
    outs = {}
    for impl in ("sdpa", "flash_attention_2"):
        model = tiny_model(arch, dtype=torch.bfloat16).cuda()
        model.set_attn_implementation(impl)
        with patch(model, surgery, layers=[1], **args), torch.no_grad():
            outs[impl] = model(ids, attention_mask=mask).logits.float()
        assert model.config._attn_implementation == impl
    real = mask.bool()
    torch.testing.assert_close(outs["flash_attention_2"][real], outs["sdpa"][real], atol=5e-2, rtol=0)
