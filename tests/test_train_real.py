"""The trainer on the real packaged SmolLM2-135M: gates + LoRA, a few steps through the CLI (slow, part of CI)."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from tiny import KERNEL_NOISE_FACTOR, NOISE_FACTOR, float_noise, stock_noise

from attnsurgery import load_model, patch
from attnsurgery.cli import main

pytestmark = pytest.mark.slow


def test_train_gates_and_lora_on_smollm2(tmp_path):
    out = tmp_path / "run"
    argv = [
        "train",
        "smollm2-135m",
        "gated_attention",
        "--arg",
        "form=headwise",
        "--layers",
        "2:",
        "--objective",
        "lm+kd",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--val-every",
        "3",
        "--val-windows",
        "2",
        "--lr",
        "0.05",
        "--lora-r",
        "4",
        "--lora-targets",
        "q_proj,v_proj",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    training = recipe["training"]
    before, last = training["validation"]["before"], training["validation"]["last"]
    # at init both surgeries are the identity: the kd term is 0 and the objective is the plain lm loss
    # (up to float32 resolution of the loss, at the model-level noise factor)
    assert before["objective"] == pytest.approx(
        before["lm"], abs=NOISE_FACTOR * torch.finfo(torch.float32).eps * before["lm"]
    )
    assert all(torch.isfinite(torch.tensor([last["lm"], last["objective"]])))
    assert training["data"]["source"] == "gutenberg_ppl" and training["steps"] == 3
    # the folder is a recipe: it applies to the real model, changes it, and removal restores it exactly
    model, tokenizer = load_model("smollm2-135m")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    atol = NOISE_FACTOR * stock_noise(model, ids)  # the logit tolerance the identity checks of the suite use
    with torch.no_grad():
        ref = model(ids).logits
        with patch(model, str(out)) as handle:
            assert [s.name for s in handle.surgeries] == ["gated_attention", "lora"]
            change = float((model(ids).logits - ref).abs().max())
            assert change > 10 * atol, (change, atol)  # three steps moved it far beyond rounding
        assert torch.equal(model(ids).logits, ref)
    # the same folder again without --resume/--overwrite is refused (exit 2), nothing touched
    assert main(argv) == 2


def test_penalty_terms_on_smollm2_read_what_the_outlier_tables_report():
    """On the real model (first-token share ~0.4 on layers >= 2, a ~2e4 residual activation from layer 11): the sink
    probe's share is outlier_stats' mean_sink_share, and the outlier term is high where the massive activation is."""
    from attnsurgery.engine import Engine
    from attnsurgery.eval.outliers import outlier_stats
    from attnsurgery.train.outlier import OutlierReader
    from attnsurgery.train.sink import attach_probe

    model, tokenizer = load_model("smollm2-135m")
    text = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness."
    ids = tokenizer(text, return_tensors="pt").input_ids
    batch = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    stats = outlier_stats(model, batch)
    assert stats.mean_sink_share > 0.2  # the sink is there to be penalised
    # the stock model's float32 rounding of the share (against a float64 copy) is the scale
    exact = outlier_stats(copy.deepcopy(model).double(), batch).mean_sink_share
    tol = KERNEL_NOISE_FACTOR * float_noise(stats.mean_sink_share, exact)
    handle = patch(model, "gated_attention", form="headwise")  # identity at init
    engine = Engine.of(model)
    probe = attach_probe(model, engine)
    with torch.no_grad(), OutlierReader(engine.info.layers) as reader:
        model(ids)
    assert float(probe.take()) == pytest.approx(stats.mean_sink_share, abs=tol)
    crest = torch.stack(reader.values)
    assert float(crest[11:28].min()) > float(crest[:10].max())  # the massive activation lives in layers 11-27
    engine.remove(probe)
    handle.remove()
