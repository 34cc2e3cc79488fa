"""CUDA paths (run wherever CUDA exists; skipped on CPU-only machines such as CI, and not counted as passing
there): the fused CUDA attention with log-sum-exp against the exact tiled pass, and patched models on the GPU
against the same model on the CPU."""

from __future__ import annotations

import pytest
import torch
from tiny import (
    ARCHS,
    KERNEL_NOISE_FACTOR,
    NOISE_FACTOR,
    attention_noise,
    float_noise,
    random_ids,
    tiny_model,
)

from attnsurgery import patch
from attnsurgery.kernels import AttentionStats, sdpa_with_lse, tiled_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cross_device_atol(model, ids, attention_mask=None) -> float:
    """NOISE_FACTOR x how far the *stock* model's logits move from this CPU to the GPU on these inputs (and at least
    their float32 rounding on the CPU, against a float64 copy), over real positions: cuBLAS and the CPU's BLAS round
    differently, a wrong surgery on one device misses by far more. ``model`` stays where it is."""
    import copy

    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    real = slice(None) if attention_mask is None else attention_mask.bool()
    with torch.no_grad():
        cpu = model(ids, **kw).logits
        exact = copy.deepcopy(model).double()(ids, **kw).logits
        gpu = copy.deepcopy(model).to("cuda")(ids.cuda(), **{k: v.cuda() for k, v in kw.items()}).logits.cpu()
    return NOISE_FACTOR * max(float((gpu - cpu)[real].abs().max()), float_noise(cpu[real], exact[real]))


def stock_kernel_atol(q, k, v, allowed, scale, valid, dtype) -> dict[str, float]:
    """KERNEL_NOISE_FACTOR x the stock path's rounding on this GPU, against float64 of the inputs as the kernel sees
    them (CPU tensors already rounded to ``dtype``), over ``valid`` rows: for the output, stock SDPA in ``dtype``
    (its scores stay fp32 inside, as in the fused and flex passes; P and the output are rounded to ``dtype``); for
    the log-sum-exp and column sums (fp32 inside every path), this machine's float32 rounding of them."""
    import torch.nn.functional as F
    from test_kernels import reference

    exact_out, _, _ = reference(q, k, v, allowed, scale, valid)
    fp32 = attention_noise(q.float(), k.float(), v.float(), allowed, scale, valid)
    groups = q.shape[1] // k.shape[1]
    sdpa = F.scaled_dot_product_attention(
        q.to("cuda", dtype),
        k.repeat_interleave(groups, 1).to("cuda", dtype),
        v.repeat_interleave(groups, 1).to("cuda", dtype),
        attn_mask=allowed.to("cuda"),
        scale=scale,
    )
    rows = valid[:, None, :].expand(-1, q.shape[1], -1)
    sdpa_noise = float((sdpa.cpu().double() - exact_out)[rows].abs().max())
    return {
        "out": KERNEL_NOISE_FACTOR * max(sdpa_noise, fp32["out"]),
        "lse": KERNEL_NOISE_FACTOR * fp32["lse"],
        "sums": KERNEL_NOISE_FACTOR * fp32["sums"],
    }


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
    allowed = torch.ones(37, 37, dtype=torch.bool, device="cuda").tril()[None, None].repeat(2, 1, 1, 1)
    mask = None
    if masked:  # left padding on row 0: a 4D boolean mask, as transformers builds for SDPA
        allowed[0, :, :, :5] = False
        mask = allowed
    out, lse = sdpa_with_lse(q, k, v, mask, 32**-0.5, True, out_dtype=torch.float32)
    stats = AttentionStats()
    ref = tiled_attention(q.float(), k.float(), v.float(), mask, 32**-0.5, is_causal=True, stats=stats)
    valid = allowed.any(-1)[:, 0].cpu()  # fully masked rows are undefined
    tol = stock_kernel_atol(q.cpu(), k.cpu(), v.cpu(), allowed.cpu(), 32**-0.5, valid, dtype)
    rows = valid.cuda()
    torch.testing.assert_close(out.transpose(1, 2)[rows], ref[rows], atol=tol["out"], rtol=0)
    torch.testing.assert_close(
        lse.transpose(1, 2)[rows], stats.lse.transpose(1, 2)[rows], atol=tol["lse"], rtol=0
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("surgery", "args"), [("act", dict(beta=0.3, threshold=0.08)), ("clipped_softmax", dict(gamma=-0.03))]
)
def test_patched_model_on_cuda_equals_cpu(arch, surgery, args):
    model = tiny_model(arch)
    ids = random_ids(2, 24)
    tol = cross_device_atol(model, ids)
    with patch(model, surgery, **args), torch.no_grad():
        cpu = model(ids).logits
    model = model.to("cuda")
    with patch(model, surgery, **args), torch.no_grad():
        gpu = model(ids.to("cuda")).logits.cpu()
    torch.testing.assert_close(gpu, cpu, atol=tol, rtol=0)


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _flash_available(), reason="needs the flash_attn package")
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize(
    "surgery,args",
    [("act", {"beta": 0.3, "threshold": 0.08}), ("clipped_softmax", {"gamma": -0.03, "zeta": 1.02})],
)
def test_flash_attention_model_keeps_flash_and_matches_sdpa(arch, surgery, args):
    """A model loaded with flash_attention_2 keeps it on untouched layers; patched, it matches the SDPA model."""
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ids, mask = ids.cuda(), mask.cuda()
    outs, stock = {}, {}
    for impl in ("sdpa", "flash_attention_2"):
        model = tiny_model(arch, dtype=torch.bfloat16).cuda()
        model.set_attn_implementation(impl)
        with torch.no_grad():
            stock[impl] = model(ids, attention_mask=mask).logits.float()
        with patch(model, surgery, layers=[1], **args), torch.no_grad():
            outs[impl] = model(ids, attention_mask=mask).logits.float()
        assert model.config._attn_implementation == impl
    real = mask.bool()
    # the stock models' own flash-vs-sdpa gap (at least bf16's resolution of the logits) is the scale
    gap = float((stock["flash_attention_2"] - stock["sdpa"])[real].abs().max())
    gap = max(gap, torch.finfo(torch.bfloat16).eps * float(stock["sdpa"][real].abs().max()))
    torch.testing.assert_close(
        outs["flash_attention_2"][real], outs["sdpa"][real], atol=KERNEL_NOISE_FACTOR * gap, rtol=0
    )


# -- every shipped surgery on the GPU: the same logits as on the CPU, cached decode, bf16/fp16 error, training ---

from test_contract import CAUSAL, SURGERIES  # noqa: E402  (the shipped text surgeries, as the CPU contract runs them)
from tiny import decode_stepwise, padded_batch  # noqa: E402

from attnsurgery.registry import get_surgery_class  # noqa: E402

GPU_ARCHS = ["llama", "gemma3", "gpt2"]  # GQA; sliding-window + global with one kv head; fused qkv (Conv1D)


def _example(surgery):
    return get_surgery_class(surgery).example_args


@pytest.mark.parametrize("arch", GPU_ARCHS)
@pytest.mark.parametrize("surgery", SURGERIES)
def test_every_surgery_on_cuda_equals_cpu_on_a_padded_batch(arch, surgery):
    """Patched on each device from the same seed (random inits are drawn on the CPU, so both get the same
    parameters); left padding sends the masked inputs through the fused CUDA kernel's bias path."""
    ids, mask = padded_batch([random_ids(1, n, seed=n)[0] for n in (29, 40)], "left")
    model = tiny_model(arch)
    tol = cross_device_atol(model, ids, mask)
    torch.manual_seed(0)
    with patch(model, surgery, **_example(surgery)), torch.no_grad():
        cpu = model(ids, attention_mask=mask).logits
    model = model.to("cuda")
    torch.manual_seed(0)
    with patch(model, surgery, **_example(surgery)), torch.no_grad():
        gpu = model(ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
    real = mask.bool()
    torch.testing.assert_close(gpu[real], cpu[real], atol=tol, rtol=0)


@pytest.mark.parametrize("arch", GPU_ARCHS)
@pytest.mark.parametrize("surgery", CAUSAL)
def test_cached_decode_on_cuda_equals_full_forward(arch, surgery):
    model = tiny_model(arch).to("cuda")
    ids = random_ids(2, 20).cuda()
    with torch.no_grad():  # the stock model's own cached-vs-full gap on this GPU is the scale
        stock_full = model(ids).logits
        stock_step, _ = decode_stepwise(model, ids, 14)
    gap = max(
        float_noise(stock_step, stock_full), torch.finfo(torch.float32).eps * float(stock_full.abs().max())
    )
    with patch(model, surgery, **_example(surgery)), torch.no_grad():
        full = model(ids).logits
        stepwise, _ = decode_stepwise(model, ids, 14)
    torch.testing.assert_close(stepwise, full, atol=NOISE_FACTOR * gap, rtol=0)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("surgery", SURGERIES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_low_precision_on_cuda_within_twice_the_stock(arch, surgery, dtype):
    """test_lowprec's bound (error vs the surgery's own fp32 result <= 2x what precision allows) on the GPU's
    kernels: the fused CUDA attention, cuBLAS in bf16/fp16."""
    import copy

    from test_lowprec import EXTREME, LOW, _check

    args = {"layers": "1:", **EXTREME.get(surgery, _example(surgery))}
    model = tiny_model(arch)
    models = {"fp32": model.to("cuda"), dtype: copy.deepcopy(model).to("cuda", LOW[dtype])}
    inputs = {"input_ids": random_ids(2, 32).cuda()}
    _check(models, {"fp32": inputs, dtype: inputs}, surgery, args, dtype)


def test_fused_cuda_long_padded_gqa_and_chunked_queries_stay_fused():
    """Real shapes (head_dim 128, 2k keys, GQA 4:1, left padding, a chunk of queries against a longer cache): the
    fused kernel takes them (no fallback warning) and matches the exact tiled pass."""
    import warnings

    g = torch.Generator().manual_seed(0)
    for q_len, k_len in ((2048, 2048), (64, 2048), (1, 2047)):
        q = torch.randn(2, 8, q_len, 128, generator=g).to("cuda", torch.bfloat16)
        k = torch.randn(2, 2, k_len, 128, generator=g).to("cuda", torch.bfloat16)
        v = torch.randn(2, 2, k_len, 128, generator=g).to("cuda", torch.bfloat16)
        allowed = torch.ones(k_len, k_len, dtype=torch.bool, device="cuda").tril()[-q_len:][None, None]
        allowed = allowed.repeat(2, 1, 1, 1)
        allowed[0, :, :, :100] = False  # row 0 is left-padded by 100 tokens
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a refusal would warn and take the tiled pass
            out, lse = sdpa_with_lse(q, k, v, allowed, 128**-0.5, True, out_dtype=torch.float32)
        stats = AttentionStats()
        ref = tiled_attention(
            q.float(), k.float(), v.float(), allowed, 128**-0.5, is_causal=True, stats=stats
        )
        rows = allowed.any(-1)[:, 0]  # (B, Tq): rows that see a key
        tol = stock_kernel_atol(
            q.cpu(), k.cpu(), v.cpu(), allowed.cpu(), 128**-0.5, rows.cpu(), torch.bfloat16
        )
        torch.testing.assert_close(out.transpose(1, 2)[rows], ref[rows], atol=tol["out"], rtol=0)
        torch.testing.assert_close(
            lse.transpose(1, 2)[rows], stats.lse.transpose(1, 2)[rows], atol=tol["lse"], rtol=0
        )


def test_training_on_cuda_in_bf16_mixed_precision(tmp_path):
    """The trainer on the GPU (accelerate places the model and the surgery, bf16 autocast): gates + LoRA train,
    the run folder reloads onto a fresh model on the GPU with the same logits, and remove() restores the model."""
    from tiny import tiny_tokenizer

    from attnsurgery.api import SurgeryHandle
    from attnsurgery.train import TrainConfig, prepare_data, train

    data = prepare_data(tiny_tokenizer(), "gutenberg_ppl", 32, max_val_windows=4)
    model = tiny_model("llama").to("cuda")
    ids = random_ids(2, 24).cuda()
    with torch.no_grad():
        stock = model(ids).logits
        import copy

        noise = float_noise(stock, copy.deepcopy(model).double()(ids).logits)  # the stock fp32 rounding here
    gates = patch(model, "gated_attention", form="headwise")
    lora = patch(model, "lora", r=2, targets="q_proj,v_proj")
    handle = SurgeryHandle(model, gates.surgeries + lora.surgeries)
    config = TrainConfig(
        objective="lm", steps=6, batch_size=4, seq_len=32, lr=0.05, lora_lr=0.01, val_every=3,
        mixed_precision="bf16",
    )  # fmt: skip
    result = train(model, handle, data, config, out_dir=tmp_path / "run", progress=False)
    losses = result.train_loss
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    weights = [p for s in gates.surgeries for p in s.parameters()]
    assert all(p.is_cuda for p in weights) and any(p.abs().sum() > 0 for p in weights)
    with torch.no_grad():
        trained = model(ids).logits
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock, atol=0, rtol=0)
    fresh = tiny_model("llama").to("cuda")
    with patch(fresh, str(tmp_path / "run")), torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, trained, atol=NOISE_FACTOR * noise, rtol=0)


# -- the compiled flex_attention paths (attnsurgery.flex): ACT, clipped softmax and MoH prefills on a GPU ------------


def _flex_case(kind: str, dtype, t: int, h: int = 8, kv: int = 2, d: int = 64):
    from test_kernels import case

    q, k, v, mask, allowed, valid = case(kind, b=2, h=h, kv=kv, t=t, d=d)
    to = lambda x: None if x is None else x.to("cuda", dtype if x.is_floating_point() else x.dtype)  # noqa: E731
    return (to(q), to(k), to(v), to(mask)), (q, k, v, allowed, valid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kind", "t", "d"), [("none", 300, 64), ("bool", 300, 64), ("none", 2048, 128)])
def test_flex_kernels_on_cuda_match_float64(dtype, kind, t, d):
    """Each compiled pass against float64 on the CPU: log-sum-exp, column sums (padding rows excluded), the
    sink-shifted softmax, clipped softmax (some heads) and the packed MoH rows."""
    from types import SimpleNamespace

    from test_kernels import reference

    import attnsurgery.flex as flex

    (q, k, v, mask), (_, _, _, allowed, valid) = _flex_case(kind, dtype, t, d=d)
    q64, k64, v64 = (
        x.cpu().double() for x in (q, k, v)
    )  # the inputs as the kernels see them (rounded to dtype)
    scale = d**-0.5
    _, ref_lse, ref_sums = reference(q64, k64, v64, allowed, scale, valid)
    call = SimpleNamespace(query=q, query_len=t, key_len=t, attention_mask=mask, is_causal=True, kwargs={})
    vis = flex.Visibility.of(call)
    tol = stock_kernel_atol(q64, k64, v64, allowed, scale, valid, dtype)
    rows = valid[:, None, :].expand(-1, q.shape[1], -1)
    lse = flex.log_sum_exp(q, k, vis, scale)
    torch.testing.assert_close(lse.cpu()[rows], ref_lse.float()[rows], atol=tol["lse"], rtol=0)
    sums = flex.column_sums(q, k, lse, vis, scale, None if bool(valid.all()) else valid.cuda(), t)
    torch.testing.assert_close(sums.cpu(), ref_sums.float(), atol=tol["sums"], rtol=0)
    groups = q.shape[1] // k.shape[1]
    scores = q64.double() @ k64.repeat_interleave(groups, 1).double().transpose(-1, -2) * scale
    g = torch.Generator().manual_seed(2)
    columns = torch.rand(2, q.shape[1], t, generator=g) < 0.02
    shift = torch.randn(2, q.shape[1], t, generator=g)
    shifted = scores + torch.where(columns[:, :, None, :], shift.double()[..., None], 0.0)
    probs = torch.softmax(shifted.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    ref = probs @ v64.repeat_interleave(groups, 1).double()
    out = flex.shifted_columns(q, k, v, columns.cuda(), shift.cuda(), vis, scale).cpu().float()
    torch.testing.assert_close(out[rows], ref.float()[rows], atol=tol["out"], rtol=0)
    heads = torch.arange(q.shape[1]) % 3 != 1
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    clipped = torch.where(heads[None, :, None, None], (1.05 * probs - 0.03).clamp(0, 1), probs)
    ref = clipped @ v64.repeat_interleave(groups, 1).double()
    out = flex.clipped_softmax(q, k, v, vis, scale, 1.05, -0.03, heads.cuda()).cpu().float()
    torch.testing.assert_close(out[rows], ref.float()[rows], atol=tol["out"], rtol=0)
    if kind == "none":
        selected = torch.rand(2, q.shape[1], t, generator=g) < 0.75
        ref = torch.where(selected[..., None], probs @ v64.repeat_interleave(groups, 1).double(), 0.0)
        out = flex.routed_attention(q, k, v, selected.cuda(), scale).cpu().float()
        torch.testing.assert_close(out, ref.float(), atol=tol["out"], rtol=0)


@pytest.mark.parametrize(("surgery", "args", "entry"), [
    ("act", dict(beta=0.4, threshold=0.02), "column_sums"),
    ("clipped_softmax", dict(gamma=-0.03), "clipped_softmax"),
    ("moh", dict(active=0.75), "routed_attention"),
])  # fmt: skip
def test_gpu_prefill_takes_the_flex_path_and_matches_cpu(surgery, args, entry, monkeypatch):
    """A maskless prefill on the GPU runs the flex pass (spied), and its logits match the CPU's tiled path."""
    import attnsurgery.flex as flex

    calls = []
    real = getattr(flex, entry)
    monkeypatch.setattr(flex, entry, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = tiny_model("gemma3")
    ids = random_ids(2, 300)
    tol = cross_device_atol(model, ids)
    with patch(model, surgery, **args), torch.no_grad():
        cpu = model(ids).logits
    assert not calls
    model = model.to("cuda")
    with patch(model, surgery, **args), torch.no_grad():
        gpu = model(ids.cuda()).logits.cpu()
    assert calls
    if (
        surgery != "moh"
    ):  # MoH's top-k routing flips on near-ties between devices: its kernel is compared above
        torch.testing.assert_close(gpu, cpu, atol=tol, rtol=0)
