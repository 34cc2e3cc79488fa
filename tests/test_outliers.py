"""Outlier statistics: Bondarenko et al.'s kurtosis / inf-norm against plain references, hook placement per
architecture, the first-token share against eager attention weights, padding, patched models, clean-up."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tiny import KERNEL_NOISE_FACTOR, NOISE_FACTOR, float_noise, random_ids, tiny_model

from attnsurgery import attention_maps, patch
from attnsurgery.engine import Engine
from attnsurgery.errors import AttnSurgeryError, UnsupportedModelError
from attnsurgery.eval.outliers import iter_batches, kurtosis, masked_stats, outlier_stats
from attnsurgery.eval.outliers_report import OutlierStats, plot_outliers, render_outlier_table

ARCHS = ["llama", "gemma3", "gpt2", "opt"]
#: the submodule each site should be read from, named independently of the code under test
ATTN_OUT = {
    "llama": "self_attn.o_proj",
    "gemma3": "self_attn.o_proj",
    "gpt2": "attn.c_proj",
    "opt": "self_attn.out_proj",
}
MLP_OUT = {"llama": "mlp.down_proj", "gemma3": "mlp.down_proj", "gpt2": "mlp.dropout", "opt": "fc2"}


def np_kurtosis(v: np.ndarray, eps: float = 1e-6) -> float:
    """validate_clm.py's formula, written out in numpy: non-excess, unbiased std."""
    v = v.astype(np.float64).ravel()
    return float(np.mean((v - v.mean()) ** 4) / (np.std(v, ddof=1) ** 4 + eps))


def share_atol(model, ids, eager) -> float:
    """KERNEL_NOISE_FACTOR x the float32 rounding of the stock eager attention's first-token shares on these inputs
    (against a float64 copy of the model): the scale for two float32 readings of the same share."""
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(ids, output_attentions=True).attentions
    shares = [p[:, :, 1:, 0].double().mean(dim=(1, 2)) for p in eager]
    return KERNEL_NOISE_FACTOR * float_noise(
        torch.stack(shares), torch.stack([p[:, :, 1:, 0].mean(dim=(1, 2)) for p in exact])
    )


def stats_atol(model, seqs) -> dict[str, float]:
    """Per statistic, NOISE_FACTOR x the float32 rounding of the *stock* model's statistics of each sequence alone
    (against a float64 copy of the model), the worst sequence: a padded batch rounds differently, a wrong mask does
    not fit under it."""
    exact_model = copy.deepcopy(model).double()
    noise: dict[str, float] = {}
    for s in seqs:
        single = _averaged([outlier_stats(model, s[None])])
        exact = _averaged([outlier_stats(exact_model, s[None])])
        for name in single:
            noise[name] = max(
                noise.get(name, 0.0), float_noise(torch.tensor(single[name]), torch.tensor(exact[name]))
            )
    return {name: NOISE_FACTOR * n for name, n in noise.items()}


def _hooks(model):
    return {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()}


def decoder_layers(model):
    from attnsurgery.discovery import discover

    return discover(model).layers


# ----------------------------------------------------------------------------------------------------------
# the metric itself
# ----------------------------------------------------------------------------------------------------------


def test_kurtosis_gaussian_and_outlier_against_numpy():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(2, 200_000, generator=g)
    k = kurtosis(gauss)
    assert abs(float(k[0]) - 3.0) < 0.05 and abs(float(k[1]) - 3.0) < 0.05  # non-excess: a Gaussian is 3
    for row in range(2):
        assert float(k[row]) == pytest.approx(np_kurtosis(gauss[row].numpy()), rel=1e-10)
    spiky = torch.randn(1, 10_000, generator=g)
    spiky[0, 1234] = 100.0  # one outlier: ~(100^4 / n) / (1 + 100^2 / n)^2 = 2500
    ks = float(kurtosis(spiky)[0])
    assert ks == pytest.approx(np_kurtosis(spiky.numpy()), rel=1e-10)
    assert 2_000 < ks < 3_000
    from scipy.stats import kurtosis as scipy_kurtosis  # biased std; equal up to (n/(n-1))^2

    assert ks == pytest.approx(scipy_kurtosis(spiky[0].numpy(), fisher=False), rel=1e-3)


def test_masked_stats_equal_per_sequence_flattened():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 5, generator=g) * torch.tensor([1.0, 3.0, 0.5])[:, None, None]
    x[1, 2, 4] = 40.0
    valid = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]]).bool()
    x[2, 5, 0] = 1e4  # in a padded row: must not count
    kurt, inf = masked_stats(x, valid)
    for b in range(3):
        rows = x[b][valid[b]].numpy()
        assert float(kurt[b]) == pytest.approx(np_kurtosis(rows), rel=1e-9)
        assert float(inf[b]) == pytest.approx(np.abs(rows).max(), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# hooks: where, and that they change nothing
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_stats_match_direct_reference(arch):
    """Each site's numbers equal numpy on the tensors read from named submodules / output_hidden_states, and the
    model computes exactly the same logits with the measuring hooks attached."""
    model = tiny_model(arch)
    ids = random_ids(3, 14, seed=2)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        for site, name in (("attn", ATTN_OUT[arch]), ("mlp", MLP_OUT[arch])):
            mod = layer.get_submodule(name)
            handles.append(
                mod.register_forward_hook(lambda m, a, o, k=f"{site}{i}": seen.setdefault(k, []).append(o))
            )
    logits_seen = []
    handles.append(model.get_output_embeddings().register_forward_hook(lambda m, a, o: logits_seen.append(o)))
    try:
        with torch.no_grad():
            plain = model(ids)
            hidden = model(ids, output_hidden_states=True).hidden_states
            seen.clear()
            logits_seen.clear()
            hooks_before = _hooks(model)
            stats = outlier_stats(model, ids)
            hooks_after = _hooks(model)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(logits_seen[0], plain.logits)  # the measured forward is the plain forward
    num_layers = len(decoder_layers(model))
    assert len(stats.layers) == num_layers
    for i, row in enumerate(stats.layers):
        for site in ("attn", "mlp"):
            x = seen[f"{site}{i}"][0].reshape(3, 14, -1)  # OPT's fc2 sees (B*T, d)
            ref_k = np.mean([np_kurtosis(x[b].numpy()) for b in range(3)])
            ref_inf = np.mean([np.abs(x[b].numpy()).max() for b in range(3)])
            assert getattr(row, f"{site}_kurtosis") == pytest.approx(ref_k, rel=1e-6)
            assert getattr(row, f"{site}_inf_norm") == pytest.approx(ref_inf, rel=1e-6)
        if i < num_layers - 1:  # the last hidden state is after the final norm
            x = hidden[i + 1]
            assert row.residual_kurtosis == pytest.approx(
                np.mean([np_kurtosis(x[b].numpy()) for b in range(3)]), rel=1e-6
            )
            assert row.residual_inf_norm == pytest.approx(float(x.abs().amax(dim=(1, 2)).mean()), rel=1e-6)
    assert stats.max_kurtosis == pytest.approx(
        max(max(r.attn_kurtosis, r.mlp_kurtosis, r.residual_kurtosis) for r in stats.layers)
    )
    # hooks and the recording are gone: the model runs exactly as before
    assert hooks_after == hooks_before
    assert Engine.of(model, create=False) is None and model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain.logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_sink_share_equals_eager_attention_weights(arch):
    model = tiny_model(arch, attn_implementation="eager")
    ids = random_ids(2, 12, seed=3)
    with torch.no_grad():
        eager = model(ids, output_attentions=True).attentions
    tol = share_atol(model, ids, eager)
    stats = outlier_stats(model, ids)
    for layer, probs in enumerate(eager):
        ref = probs[:, :, 1:, 0].double().mean(dim=(1, 2)).mean()  # queries >= 1 on token 0, per sequence
        assert stats.layers[layer].sink_share == pytest.approx(float(ref), abs=tol)
    late = [float(p[:, :, 1:, 0].double().mean()) for p in eager[2:]]
    assert stats.mean_sink_share == pytest.approx(sum(late) / len(late), abs=tol)
    # an sdpa model with the same weights measures the same (the recording, not the kernel, gives the maps)
    sdpa = outlier_stats(tiny_model(arch), ids)
    for a, b in zip(stats.layers, sdpa.layers):
        assert a.sink_share == pytest.approx(b.sink_share, abs=tol)


def _averaged(stats_list: list[OutlierStats]) -> dict[str, np.ndarray]:
    fields = ["attn_kurtosis", "attn_inf_norm", "mlp_kurtosis", "mlp_inf_norm", "residual_kurtosis",
              "residual_inf_norm", "sink_share"]  # fmt: skip
    return {f: np.mean([[getattr(r, f) for r in s.layers] for s in stats_list], axis=0) for f in fields}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_one_by_one(arch, side):
    """A padded batch measures each sequence as if it ran alone (GPT-2's absolute positions included)."""
    model = tiny_model(arch)
    seqs = [random_ids(1, n, seed=10 + n)[0] for n in (12, 7, 9)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[b, cols], mask[b, cols] = s, 1
    tol = stats_atol(model, seqs)
    batched = outlier_stats(model, ids, attention_mask=mask)
    alone = [outlier_stats(model, s[None]) for s in seqs]
    ref = _averaged(alone)
    got = _averaged([batched])
    for name, values in ref.items():
        np.testing.assert_allclose(got[name], values, rtol=0, atol=tol[name], err_msg=name)
    assert batched.num_tokens == sum(len(s) for s in seqs) and batched.num_sequences == 3
    # the same sequences as a list of batches (mappings) give the same again
    listed = outlier_stats(model, [{"input_ids": s[None]} for s in seqs])
    np.testing.assert_allclose(_averaged([listed])["mlp_kurtosis"], ref["mlp_kurtosis"], rtol=1e-9)


def test_patched_model_is_measured_as_it_runs():
    model = tiny_model("llama")
    ids = random_ids(2, 12, seed=4)
    base = outlier_stats(model, ids)
    stock = tiny_model("llama", attn_implementation="eager")  # the same weights: the stock noise probe
    with torch.no_grad():
        tol = share_atol(stock, ids, stock(ids, output_attentions=True).attentions)
    with patch(model, "temperature", tau=0.5):
        hot = outlier_stats(model, ids)
        maps = attention_maps(model, ids)
    for layer, probs in maps.items():
        ref = float(probs[:, :, 1:, 0].double().mean(dim=(1, 2)).mean())
        assert hot.layers[layer].sink_share == pytest.approx(ref, abs=tol)
        assert abs(hot.layers[layer].sink_share - base.layers[layer].sink_share) > 100 * tol
    assert Engine.of(model, create=False) is None  # the patch's removal still restores the model


def test_largest_activation_location():
    model = tiny_model("llama")
    ids = random_ids(2, 10, seed=5)
    last = decoder_layers(model)[-1]

    def plant(module, args, output):
        output = output.clone()
        output[1, 6, 13] = -1000.0
        return output

    handle = last.register_forward_hook(plant)
    try:
        stats = outlier_stats(model, ids, sink_share=False)
    finally:
        handle.remove()
    big = stats.max_activation
    assert (big.value, big.layer, big.site, big.sequence, big.position, big.channel) == (
        -1000.0,
        2,
        "residual",
        1,
        6,
        13,
    )
    assert big.token_id == int(ids[1, 6]) and big.token_index == 6
    assert stats.max_inf_norm == pytest.approx(stats.layers[2].residual_inf_norm)
    assert all(r.sink_share is None for r in stats.layers) and stats.mean_sink_share is None


def test_hooks_removed_on_error():
    model = tiny_model("gpt2")
    before = _hooks(model)

    def boom(module, args, output):
        raise RuntimeError("boom")

    layer = decoder_layers(model)[1]
    handle = layer.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            outlier_stats(model, random_ids(1, 8))
    finally:
        handle.remove()
    assert _hooks(model) == before
    assert Engine.of(model, create=False) is None and model.config._attn_implementation == "sdpa"


def test_unsupported_layout_names_the_model():
    model = tiny_model("llama")
    del decoder_layers(model)[0].mlp
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM.*LlamaDecoderLayer"):
        outlier_stats(model, random_ids(1, 6))


def test_inputs_validation():
    with pytest.raises(AttnSurgeryError, match="attention_mask= goes with a single"):
        list(iter_batches([random_ids(1, 4)], attention_mask=torch.ones(1, 4)))
    with pytest.raises(AttnSurgeryError, match="does not match"):
        list(iter_batches(random_ids(1, 4), attention_mask=torch.ones(1, 5)))
    with pytest.raises(AttnSurgeryError, match="no real tokens"):
        outlier_stats(
            tiny_model("llama"), random_ids(2, 4), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
        )


def test_json_table_and_plot(tmp_path):
    model = tiny_model("gemma3")
    ids = random_ids(2, 10, seed=6)
    base = outlier_stats(model, ids, label="baseline")
    with patch(model, "temperature", tau=0.7):
        hot = outlier_stats(model, ids, label="tau=0.7")
    data = json.loads(base.to_json(tmp_path / "s.json"))
    assert OutlierStats.from_dict(data) == base
    assert json.loads((tmp_path / "s.json").read_text())["max_kurtosis"] == base.max_kurtosis
    table = render_outlier_table({"baseline": base, "tau=0.7": hot})
    assert table.count("\n| 3 |") == 2 and "| baseline |" in table and "| tau=0.7 |" in table
    assert f"{base.max_kurtosis:.2f}" in table
    out = plot_outliers([base, hot], tmp_path / "o.png", title="tiny gemma3")
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
