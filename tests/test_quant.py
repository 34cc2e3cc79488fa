"""Simulated static W8A8: the fake-quantiser against a float64 reference, the paper's MSE weight grid, static
(per-tensor, frozen) activation ranges, exact restore, the LM head left alone; bitsandbytes LLM.int8 on CPU."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from tiny import logit_atol, random_ids, tiny_model

from attnsurgery.discovery import discover
from attnsurgery.errors import AttnSurgeryError
from attnsurgery.eval import quant
from attnsurgery.eval.quant import (
    ActQuantizer,
    Int8UnavailableError,
    fake_quantize,
    int8_unavailable_reason,
    load_int8,
    mse_weight_range,
    perplexity,
    quant_params,
    quantize_w8a8,
    reference_quantize,
)

ARCHS = ["llama", "gemma3", "gpt2", "opt"]


def _hooks(model):
    return {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()}


def _linears(model):
    decoder = discover(model).decoder
    return [m for m in decoder.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]


# ----------------------------------------------------------------------------------------------------------
# the quantiser
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("lo_hi", [(-1.3, 2.7), (0.4, 3.0), (-5.0, -0.2), (-0.01, 0.02)])
def test_fake_quantize_matches_float64_reference(symmetric, lo_hi):
    lo, hi = lo_hi
    g = torch.Generator().manual_seed(0)
    x = torch.empty(4000, dtype=torch.float64).uniform_(lo - 1.0, hi + 1.0, generator=g)  # some values clip
    p = quant_params(lo, hi, symmetric=symmetric)
    ref = reference_quantize(x, lo, hi, symmetric=symmetric)
    assert torch.equal(fake_quantize(x, p), ref)  # float64 in: bit-identical to the textbook formula
    assert len(torch.unique(ref)) <= 256
    # float32 (the model's dtype) rounds x/scale in float32: the same code except at exact .5 ties
    got32 = fake_quantize(x.float(), p).double()
    assert (got32 - ref).abs().max() <= p.scale * 1.0001
    assert (got32 - ref).abs().gt(p.scale * 1e-3).float().mean() < 1e-3
    # the grid contains 0 exactly and the range is widened to it
    assert float(fake_quantize(torch.zeros(1, dtype=torch.float64), p)) == 0.0


def test_quant_params_follow_the_paper():
    p = quant_params(-1.0, 3.0)  # asymmetric uint8
    assert (
        (p.qmin, p.qmax) == (0, 255)
        and p.scale == pytest.approx(4.0 / 255)
        and p.zero_point == round(255 / 4)
    )
    w = quant_params(-0.5, 0.5, symmetric=True)  # signed int8, zero point 0
    assert (w.qmin, w.qmax, w.zero_point) == (-128, 127, 0) and w.scale == pytest.approx(0.5 / 127)
    pos = quant_params(0.2, 2.0, symmetric=True)  # no negatives: unsigned grid from 0
    assert (pos.qmin, pos.qmax) == (0, 255) and pos.scale == pytest.approx(2.0 / 255)


def _brute_force_losses(w: torch.Tensor, grid: int = 100, margin: float = 0.5) -> tuple[np.ndarray, float]:
    step = (float(w.abs().max()) + margin) / grid
    losses = [
        float(((w.double() - reference_quantize(w, -step * i, step * i, symmetric=True)) ** 2).sum())
        for i in range(1, grid + 1)
    ]
    return np.array(losses), step


@pytest.mark.parametrize("kind", ["float32", "bf16-valued"])
def test_mse_grid_matches_brute_force(kind):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 48, generator=g) * 0.05
    w[3, 7], w[10, 2] = 1.5, -1.2  # heavy tail: the best range clips it
    if kind == "bf16-valued":  # few distinct values: the compact (values x counts) path
        w = w.bfloat16().float()
    a = mse_weight_range(w)
    losses, step = _brute_force_losses(w)
    chosen = int(round(a / step)) - 1
    assert a == pytest.approx(step * (chosen + 1))
    assert losses[chosen] <= losses.min() * (1 + 1e-6)
    assert a < float(w.abs().max())  # MSE prefers clipping the two outliers to a coarser grid for all


# ----------------------------------------------------------------------------------------------------------
# static, per-tensor activation ranges
# ----------------------------------------------------------------------------------------------------------


def _per_token_reference(x: torch.Tensor) -> torch.Tensor:
    """A dynamic per-token scheme: each row's own min/max (what the paper's setup is not)."""
    return torch.stack([reference_quantize(row, float(row.min()), float(row.max())) for row in x])


def test_outlier_in_one_token_degrades_every_other_token():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 32, generator=g, dtype=torch.float64)
    spiked = x.clone()
    spiked[3] *= 60.0  # one outlier token
    others = torch.arange(16) != 3
    errors = {}
    for name, calib in (("clean", x), ("spiked", spiked)):
        q = ActQuantizer(momentum=None, percentile=None)
        q.observe(calib)
        q.freeze()
        errors[name] = float(((fake_quantize(x, q.params) - x)[others] ** 2).mean())
    assert errors["spiked"] > 100 * errors["clean"]  # one token's range is every token's range
    # a per-token scheme would leave the other tokens exactly as they were
    assert torch.equal(_per_token_reference(spiked)[others], _per_token_reference(x)[others])


def test_running_min_max_and_freeze():
    q = ActQuantizer(momentum=0.9, percentile=None)
    q(torch.tensor([[-1.0, 2.0]]))
    q(torch.tensor([[-3.0, 4.0]]))
    assert (q.x_min, q.x_max) == pytest.approx(
        (0.1 * -3.0 + 0.9 * -1.0, 0.1 * 4.0 + 0.9 * 2.0)
    )  # the paper's EMA
    cumulative = ActQuantizer(momentum=None, percentile=None)
    for batch in ([-1.0, 2.0], [-3.0, 1.0]):
        cumulative(torch.tensor(batch))
    assert (cumulative.x_min, cumulative.x_max) == (-3.0, 2.0)
    cumulative.freeze()
    params = cumulative.params
    out = cumulative(torch.tensor([100.0, -100.0]))  # after calibration: clipped, the range stays
    assert cumulative.params == params and out.tolist() == pytest.approx([2.0, -3.0], abs=params.scale)
    pct = ActQuantizer(momentum=None, percentile=99.0)
    pct(torch.arange(101, dtype=torch.float32))
    assert (pct.x_min, pct.x_max) == pytest.approx((1.0, 99.0))  # np.percentile, linear interpolation


def test_model_ranges_are_static_across_batch_mates():
    """After calibration a sequence's W8A8 logits do not depend on what else is in the batch, even a batch mate
    with a huge outlier; a dynamic per-tensor scheme would re-range on it."""
    model = tiny_model("llama")
    ids = random_ids(2, 10, seed=3)
    with quantize_w8a8(model, [random_ids(2, 10, seed=4)]):
        with torch.no_grad():
            alone = model(ids[:1]).logits
            embed = model.get_input_embeddings()
            handle = embed.register_forward_hook(
                lambda m, a, o: o * torch.tensor([1.0, 300.0])[:, None, None]
            )
            try:
                together = model(ids).logits
            finally:
                handle.remove()
    torch.testing.assert_close(together[:1], alone, atol=logit_atol("llama"), rtol=0)
    # the batch mate is another input (not a copy of row 0): its logits differ far beyond the tolerance above
    assert (together[1] - alone[0]).abs().max() > 10 * logit_atol("llama")


def test_padding_left_out_of_ranges():
    """Ranges from a right-padded batch equal those from its sequences run one by one (plain running min/max)."""
    model = tiny_model("llama")
    a, b = random_ids(1, 12, seed=5), random_ids(1, 7, seed=6)
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, :7], mask[1, :7] = b[0], 1
    kw = dict(act_momentum=None, act_percentile=None)
    with quantize_w8a8(model, {"input_ids": ids, "attention_mask": mask}, **kw) as padded:
        ranges_padded = padded.summary()["act_ranges"]
    with quantize_w8a8(model, [a, b], **kw) as alone:
        ranges_alone = alone.summary()["act_ranges"]
    assert ranges_padded.keys() == ranges_alone.keys()
    for key, value in ranges_alone.items():
        # the first quantiser sees float activations; later ones sit behind quantised layers, where a one-ulp
        # difference between batch shapes can move a value by one step
        np.testing.assert_allclose(ranges_padded[key], value, rtol=2e-2, atol=1e-6, err_msg=key)
    first = next(iter(ranges_alone))
    np.testing.assert_allclose(ranges_padded[first], ranges_alone[first], rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# on models: restore, LM head, what is quantised
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_remove_restores_bit_for_bit(arch):
    model = tiny_model(arch)
    ids = random_ids(2, 12, seed=7)
    with torch.no_grad():
        ref = model(ids).logits
    params = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    hooks = _hooks(model)
    head = model.get_output_embeddings()
    head_ptr, head_weight = head.weight.data_ptr(), head.weight.detach().clone()

    handle = quantize_w8a8(model, [random_ids(2, 12, seed=8), random_ids(2, 12, seed=9)])
    assert len(handle.weight_ranges) == len(_linears(model)) > 0  # every decoder linear / Conv1D
    with torch.no_grad():
        quantised = model(ids).logits
    # W8A8 changed the logits beyond float rounding (measured: 0.04-0.11, >= 370x this bound). Float noise, not
    # the quantisation step, is the scale of this check: it asks whether the quantiser ran at all; that it
    # quantises to int8 is the grid check below
    assert torch.isfinite(quantised).all()
    assert (quantised - ref).abs().max() > 10 * logit_atol(arch)
    # weights sit on their int8 grid: integer multiples of a / 127 in [-128, 127]
    for name, module in discover(model).decoder.named_modules():
        if name in handle.weight_ranges:
            codes = module.weight.double() / (handle.weight_ranges[name] / 127)
            assert (
                (codes - codes.round()).abs().max() < 1e-3
                and codes.min() >= -128.001
                and codes.max() <= 127.001
            )
    # the LM head is untouched: same tensor, same values, no hooks (GPT-2's is tied to the input embedding)
    assert head.weight.data_ptr() == head_ptr and torch.equal(head.weight, head_weight)
    assert not head._forward_hooks and not head._forward_pre_hooks
    json_ready = handle.summary()
    assert json_ready["lm_head"] == "full precision" and json_ready["num_quantized_linears"] == len(
        _linears(model)
    )

    handle.remove()
    handle.remove()  # idempotent
    for n, p in model.named_parameters():
        assert p.data_ptr() == params[n][0] and torch.equal(p, params[n][1]), n
    assert _hooks(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    with quantize_w8a8(model, random_ids(2, 12, seed=8)):  # the context-manager form
        with torch.no_grad():
            assert not torch.equal(model(ids).logits, ref)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_switches_and_errors_restore():
    model = tiny_model("gpt2")
    ids = random_ids(1, 8, seed=10)
    with quantize_w8a8(
        model, ids, quantize_inputs=False, quantize_outputs=False, quantize_residual=False
    ) as h:
        assert h.act_quantizers == {} and len(h.weight_ranges) == 12  # weights only: 4 Conv1D x 3 layers
    absmax = float(model.transformer.h[0].attn.c_attn.weight.detach().abs().max())
    with quantize_w8a8(model, ids, weight_range="minmax") as h:
        assert h.weight_ranges["h.0.attn.c_attn"] == absmax
    hooks, state = _hooks(model), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IndexError):  # an id outside the vocabulary fails mid-calibration
        quantize_w8a8(model, torch.tensor([[1, 2, 10_000]]))
    assert _hooks(model) == hooks and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(AttnSurgeryError, match="at least one calibration batch"):
        quantize_w8a8(model, [])
    with pytest.raises(AttnSurgeryError, match="weight_range"):
        quantize_w8a8(model, ids, weight_range="percentile")
    assert _hooks(model) == hooks


def test_perplexity_pads_and_pools():
    model = tiny_model("llama")
    a, b = random_ids(1, 9, seed=11), random_ids(1, 5, seed=12)
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, 4:], mask[1, 4:] = b[0], 1  # left padded
    nll, count = 0.0, 0
    with torch.no_grad():
        for seq in (a, b):
            logits = model(seq).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, seq[0, 1:], reduction="sum"))
            count += seq.shape[1] - 1
    assert perplexity(model, ids, attention_mask=mask) == pytest.approx(np.exp(nll / count), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# bitsandbytes LLM.int8
# ----------------------------------------------------------------------------------------------------------


def _tiny_checkpoint(path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tiny_model("llama").save_pretrained(path)
    backend = Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="a").save_pretrained(path)


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
def test_load_int8_runs_on_cpu_close_to_fp(tmp_path):
    """bitsandbytes >= 0.46 has a CPU backend for LLM.int8 (0.50 is installed): it loads and runs here."""
    reason = int8_unavailable_reason("cpu")
    assert reason is None, reason
    _tiny_checkpoint(tmp_path)
    model, _ = load_int8(str(tmp_path))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    ids = random_ids(2, 12, seed=13)
    with torch.no_grad():
        got, ref = model(ids).logits, tiny_model("llama")(ids).logits
    # int8 weights with fp16 activations: close, not equal (tolerance: 5% of the logit range; r > 0.999)
    assert 0 < (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert np.corrcoef(got.flatten().numpy(), ref.flatten().numpy())[0, 1] > 0.999


def test_load_int8_errors_name_reason_and_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if it were not installed
    with pytest.raises(Int8UnavailableError, match=r"not installed.*pip install bitsandbytes"):
        load_int8(str(tmp_path))
    monkeypatch.undo()

    def no_kernel(device):
        raise NotImplementedError("no int8 kernel for this device")

    monkeypatch.setattr(quant, "_probe_int8", no_kernel)
    with pytest.raises(
        Int8UnavailableError, match=r"cannot run LLM.int8 on cpu: NotImplementedError: no int8 kernel.*Fix: "
    ):
        load_int8(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# the real model
# ----------------------------------------------------------------------------------------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the park and children were playing.",
    "Water boils at a temperature of one hundred degrees Celsius at sea level, but at a lower one on mountains.",
]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
def test_outliers_and_w8a8_on_smollm2():
    """SmolLM2-135M has a massive activation (~2e4) on the first token, which the paper's static per-tensor W8A8
    cannot hold: the logits stay finite but perplexity collapses; keeping the residual stream and linear outputs
    in float (and min-max weights) keeps W8A8 correlated with FP, and bitsandbytes LLM.int8 stays close."""
    from attnsurgery import load_model
    from attnsurgery.eval.outliers import outlier_stats

    model, tokenizer = load_model("smollm2-135m")
    tokenizer.padding_side = "right"
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()

    stats = outlier_stats(model, batch)
    assert stats.max_inf_norm > 1_000 and stats.max_kurtosis > 100
    assert stats.max_activation.token_index == 0  # the attention sink's token
    assert stats.mean_sink_share > 0.3  # most attention goes to the first token from layer 2 on

    with torch.no_grad():
        fp = model(**batch).logits
    ppl_fp = perplexity(model, batch)
    with quantize_w8a8(model, batch) as handle:
        assert handle.setup["act_percentile"] == 99.999 and handle.setup["weight_range"] == "mse"
        with torch.no_grad():
            w8a8 = model(**batch).logits
        ppl_w8a8 = perplexity(model, batch)
    with quantize_w8a8(model, batch, weight_range="minmax", quantize_outputs=False, quantize_residual=False):
        with torch.no_grad():
            mild = model(**batch).logits
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fp)
    assert torch.isfinite(w8a8[real]).all() and (w8a8 - fp)[real].abs().max() > 1.0
    assert ppl_w8a8 > 2 * ppl_fp
    mild_r = np.corrcoef(mild[real].flatten().numpy(), fp[real].flatten().numpy())[0, 1]
    assert mild_r > 0.8 and (mild - fp)[real].abs().max() > 0.1
    # LLM.int8 (dynamic, outlier columns in fp16) keeps it: measured here ppl 30.8 vs 29.7, r = 0.994
    int8, _ = load_int8("smollm2-135m")
    with torch.no_grad():
        got = int8(**batch).logits
    assert perplexity(int8, batch) < 1.2 * ppl_fp
    assert np.corrcoef(got[real].flatten().numpy(), fp[real].flatten().numpy())[0, 1] > 0.98
