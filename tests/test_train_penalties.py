"""The penalty terms of the trainer's objective.

``sink``: its differentiable first-token share is the number the outlier tables report, the trainer attaches its
probe for the run only, and training on it moves attention off the first token. ``outlier``: the residual
stream's log crest factor, by hand and under training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny import (
    KERNEL_NOISE_FACTOR,
    NOISE_FACTOR,
    float_noise,
    padded_batch,
    random_ids,
    tiny_model,
    tiny_tokenizer,
)

from attnsurgery import patch
from attnsurgery.engine import Engine
from attnsurgery.eval.outliers import outlier_stats
from attnsurgery.train import TrainConfig, TrainingError, prepare_data, train
from attnsurgery.train.outlier import OutlierReader, log_crest
from attnsurgery.train.sink import attach_probe, first_token_share
from attnsurgery.train.trainer import _Trainee

SEQ = 32


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gemma2"])
@pytest.mark.parametrize("padded", [False, True])
def test_probe_share_is_the_outlier_tables_share(arch, padded):
    """Same definition as outlier_stats (per sequence, then over sequences; layers >= 2), on GQA, sliding-window
    (gemma3), softcapped (gemma2) layers, with and without left padding."""
    model = tiny_model(arch)
    if padded:
        ids, mask = padded_batch([random_ids(1, 9, seed=3)[0], random_ids(1, 14, seed=4)[0]], "left")
        batch = {"input_ids": ids, "attention_mask": mask}
    else:
        ids = random_ids(2, 14)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    stats = outlier_stats(model, [batch])
    # the table's float noise on this machine: its shares from a float64 copy of the model
    stats64 = outlier_stats(copy.deepcopy(model).double(), [batch])
    atol = NOISE_FACTOR * float_noise(
        [r.sink_share for r in stats.layers[2:]], [r.sink_share for r in stats64.layers[2:]]
    )
    handle = patch(model, "head_scale", scale=1.0)  # an identity surgery: the engine is installed
    probe = attach_probe(model, Engine.of(model))
    with torch.no_grad():
        model(**batch)
    shares = dict(probe.shares)
    for row in stats.layers[2:]:
        assert float(shares[row.layer]) == pytest.approx(row.sink_share, abs=atol), row.layer
    assert float(probe.take()) == pytest.approx(stats.mean_sink_share, abs=atol)
    assert probe.take() is None  # taken: forgotten
    Engine.of(model).remove(probe)
    handle.remove()


def test_first_token_share_by_hand():
    """One head, three keys: the share is the softmax weight on key 0 of the queries after the first."""
    q = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])  # (1, 1, 3, 2)
    k = torch.tensor([[[[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    share = first_token_share(q, k, 1.0, None, valid, torch.arange(3)[None])

    def by_hand(q, k):
        s = q[0, 0] @ k[0, 0].T
        return (torch.softmax(s[1, :2], -1)[0] + torch.softmax(s[2, :3], -1)[0]) / 2

    exact = by_hand(q.double(), k.double())
    # one softmax's work: KERNEL_NOISE_FACTOR x the hand formula's own float32 rounding here
    atol = KERNEL_NOISE_FACTOR * float_noise(by_hand(q, k), exact)
    assert float(share) == pytest.approx(float(exact), abs=atol)


@pytest.fixture(scope="module")
def data():
    return prepare_data(tiny_tokenizer(), "gutenberg_ppl", SEQ, max_val_windows=4)


def test_training_on_sink_lowers_the_share_and_leaves_no_probe(data):
    model = tiny_model("llama")
    ids = data.val[:4]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    before = outlier_stats(model, [batch]).mean_sink_share
    before64 = outlier_stats(copy.deepcopy(model).double(), [batch]).mean_sink_share  # its float noise, below
    handle = patch(model, "lora", r=4, targets="q_proj,k_proj")
    # lora_lr 0.02: at 0.05 the loss reaches nan by step 11 for each of LoRA seeds 0-3 (0.02 passes for each)
    config = TrainConfig(
        steps=12, batch_size=2, seq_len=SEQ, lora_lr=0.02, objective="kd+5*sink", val_every=6
    )
    result = train(model, handle, data, config, progress=False)
    engine = Engine.of(model)
    assert [s.name for s in engine.surgeries] == ["lora"]  # the probe went with the run
    assert "sink" in result.parts and "sink" in result.val_history[-1]
    after = outlier_stats(model, [batch]).mean_sink_share
    assert after < 0.8 * before, (before, after)  # literal: how far training must move it, not a noise bound
    # the validation row's sink (step 0: LoRA adds exactly 0) is the table's share of the validation windows
    atol = NOISE_FACTOR * float_noise(before, before64)
    assert result.val_history[0]["sink"] == pytest.approx(before, abs=atol)
    handle.remove()


def test_probe_is_removed_when_training_fails(data, tmp_path):
    model = tiny_model("llama")
    handle = patch(model, "head_scale", trainable=True)
    config = TrainConfig(steps=2, batch_size=2, seq_len=SEQ, objective="kd+sink", val_every=1)
    train(model, handle, data, config, out_dir=tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="already exists"):
        train(model, handle, data, config, out_dir=tmp_path / "run", progress=False)
    other = TrainConfig(steps=3, batch_size=2, seq_len=SEQ, objective="lm+sink", val_every=1)
    with pytest.raises(TrainingError, match="another run"):
        train(model, handle, data, other, out_dir=tmp_path / "run", resume=True, progress=False)
    assert [s.name for s in Engine.of(model).surgeries] == ["head_scale"]
    handle.remove()


def test_sink_needs_a_third_layer():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    handle = patch(model, "head_scale", trainable=True)
    with pytest.raises(TrainingError, match="layers >= 2"):
        _Trainee(model, handle.surgeries, {"sink": 1.0}, 1.0)
    handle.remove()


def test_log_crest_by_hand_and_per_layer():
    x = torch.ones(2, 3, 4)
    x[1, 2, 1] = 10.0
    crest = log_crest(x)
    eps = 1e-6  # log_crest's guard: log(peak + eps) - log(sqrt(mean x^2 + eps))
    flat = math.log(1 + eps) - 0.5 * math.log(1 + eps)  # a flat tensor: peak = rms, so 0 but for the guard
    peaked = math.log(10 + eps) - 0.5 * math.log((11 * 1.0 + 100.0) / 12 + eps)  # log(10 / rms)

    def formula(x):  # the by-hand formula on any dtype: its float32 rounding on x is the scale
        x = x.flatten(1)
        return torch.log(x.abs().amax(1) + eps) - 0.5 * torch.log(x.pow(2).mean(1) + eps)

    atol = KERNEL_NOISE_FACTOR * float_noise(formula(x), formula(x.double()))
    torch.testing.assert_close(
        crest.double(), torch.tensor([flat, peaked], dtype=torch.float64), atol=atol, rtol=0
    )
    model = tiny_model("llama")
    ids = random_ids(2, 10)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
        with OutlierReader(Engine.of(model, create=True).info.layers) as reader:
            model(ids)
    want = torch.stack([log_crest(h).mean() for h in hidden[1:-1]])  # the last one is after the final norm
    got = torch.stack(reader.values)
    # exact: the reader applies log_crest to the very tensors output_hidden_states returns (the same forward)
    torch.testing.assert_close(got[:-1], want, atol=0, rtol=0)
    assert len(got) == model.config.num_hidden_layers
    assert float(reader.take()) == float(got.mean())  # exact: the same mean of the same values
    Engine.of(model).discard_if_unused()


def test_training_on_outlier_lowers_the_crest_factor(data):
    model = tiny_model("llama")
    model64 = copy.deepcopy(model).double()  # for the noise scale below
    ids = data.val[:4]

    def crest(model):
        with torch.no_grad(), OutlierReader(Engine.of(model, create=True).info.layers) as reader:
            model(ids)
        return float(reader.take())

    before = crest(model)
    handle = patch(model, "lora", r=4, targets="o_proj,down_proj")
    config = TrainConfig(
        steps=12, batch_size=2, seq_len=SEQ, lora_lr=0.05, objective="kd+10*outlier", val_every=6
    )
    result = train(model, handle, data, config, progress=False)
    # the validation row's crest (step 0: LoRA adds exactly 0) is the reader's on the validation windows, to the
    # reading's float noise (the float64 copy's residual stream; log_crest itself reads in float32)
    atol = NOISE_FACTOR * float_noise(before, crest(model64))
    assert "outlier" in result.parts and result.val_history[0]["outlier"] == pytest.approx(before, abs=atol)
    after = crest(model)
    assert after < before - 0.1, (before, after)  # literal: how far training must move it, not a noise bound
    handle.remove()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_kd_equals_the_textbook_kl_and_its_gradient(temperature):
    """kd_loss (one logsumexp pass forward, one softmax pass backward) against KL(teacher || student) written out with
    log_softmax, in float64: value and gradient at float64 noise; a wrong teacher fails."""
    import torch.nn.functional as F

    from attnsurgery.train.objectives import kd_loss

    g = torch.Generator().manual_seed(0)
    student = (torch.randn(3, 9, 40, generator=g, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.randn(3, 9, 40, generator=g, dtype=torch.float64) * 3
    plain = student.detach().clone().requires_grad_()
    log_s = F.log_softmax(plain[:, :-1] / temperature, -1)
    log_t = F.log_softmax(teacher[:, :-1] / temperature, -1)
    expected = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature**2
    expected.backward()
    got = kd_loss(student, teacher, temperature)
    got.backward()
    # literal: float64 vs float64 (both in float64 here); 1e-12 is ~1e4 float64 roundings, far below float32's
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(student.grad, plain.grad, atol=1e-12, rtol=1e-12)
    # literal: a wrong teacher's KL is off by O(1) here, not by rounding
    assert abs(float(kd_loss(student, teacher.flip(-1), temperature)) - float(expected)) > 1e-3
    same = torch.randn(2, 5, 49152, generator=g) * 8  # fp32, a real vocabulary: exactly 0 at identity
    assert float(kd_loss(same, same.clone(), temperature)) == 0.0
    assert torch.autograd.gradcheck(
        lambda x: kd_loss(x, teacher[:, :3, :6], temperature),
        (torch.randn(3, 3, 6, dtype=torch.float64, requires_grad=True),),
    )
