"""End to end on the real packaged SmolLM2-135M (slow, but part of CI)."""

from __future__ import annotations

import pytest
import torch
from tiny import NOISE_FACTOR, stock_noise

from attnsurgery import attention_maps, load_model, load_surgery, patch, save_surgery
from attnsurgery.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer


def test_surgeries_on_smollm2(smollm2, tmp_path):
    model, tokenizer = smollm2
    prompts = ["The capital of France is", "Water boils at a temperature of"]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    atol = NOISE_FACTOR * stock_noise(model, batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        ref = model(**batch).logits
        for name in ("temperature", "head_scale", "clipped_softmax"):
            with patch(model, name):  # identity defaults
                torch.testing.assert_close(model(**batch).logits, ref, atol=atol, rtol=0)
        # an active surgery: generation works with the cache, and equals generation without it
        handle = patch(model, "temperature", tau=0.9, c=0.02, layers="2:")
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        cached = model.generate(**batch, use_cache=True, **kw)
        uncached = model.generate(**batch, use_cache=False, **kw)
        assert torch.equal(cached, uncached)
        patched = model(**batch).logits
        assert (patched - ref).abs().max() > 10 * atol  # far beyond the identity checks' tolerance
        save_surgery(handle, tmp_path / "t")
        handle.remove()
        assert torch.equal(model(**batch).logits, ref)
        with load_surgery(model, tmp_path / "t"):
            torch.testing.assert_close(model(**batch).logits, patched, atol=0, rtol=0)
        # clipped softmax on the tiled path: real model, padded batch, finite and close to the baseline
        with patch(model, "clipped_softmax", gamma=-12 / 512):
            clipped = model(**batch).logits
        real = batch["attention_mask"].bool()
        assert torch.isfinite(clipped[real]).all()
        assert (clipped - ref)[real].abs().max() > 10 * atol  # ... yet edited, far beyond rounding
    text = tokenizer.decode(cached[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) > 0


def test_attention_maps_on_smollm2(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    maps = attention_maps(model, inputs, layers=[0, 15, 29])
    assert sorted(maps) == [0, 15, 29]
    n = inputs["input_ids"].shape[1]
    assert maps[15].shape == (1, 9, n, n)
    # rows sum to 1 up to the rounding of a float32 sum of n probabilities
    torch.testing.assert_close(
        maps[15].sum(-1), torch.ones(1, 9, n), atol=n * torch.finfo(torch.float32).eps, rtol=0
    )
    # SmolLM2 has a strong sink on the first token in middle layers
    assert maps[15][0, :, 1:, 0].mean() > 0.3


def test_cli_apply_and_inspect_on_smollm2(tmp_path, capsys):
    assert (
        main(
            [
                "apply",
                "--recipe",
                "temperature",
                "smollm2-135m",
                "--max-new-tokens",
                "5",
                "--save",
                str(tmp_path / "s"),
                "--prompt",
                "Hello",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "baseline" in out and "patched" in out and (tmp_path / "s" / "attnsurgery_config.json").is_file()
    png = tmp_path / "maps.png"
    assert main(["inspect", "smollm2-135m", "--show-layers", "0,15", "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000 and png.with_suffix(".json").is_file()


def test_eval_baseline_vs_act_on_smollm2(smollm2, tmp_path):
    """The whole scoring path on the real model: offline task, lm-eval, baseline and an ACT arm, a table."""
    from attnsurgery.eval.text import evaluate_arms
    from attnsurgery.eval.text_report import write_report
    from attnsurgery.eval.text_results import Arm
    from attnsurgery.recipe import parse_recipe

    act = parse_recipe({"name": "act-all", "surgeries": [{"surgery": "act", "layers": "2:"}]})
    report = evaluate_arms(
        "smollm2-135m",
        [Arm("baseline"), Arm("act-all", act)],
        ["bb_general_knowledge"],
        limit=8,
        loaded=smollm2,
    )
    base, patched = report.arms
    assert base.valid and patched.valid
    assert base.n_docs == patched.n_docs == {"bb_general_knowledge": 8}
    # ACT really ran: the choices' log-likelihoods moved far beyond rounding. A token's log-likelihood (logit minus
    # log-sum-exp) rounds by about twice the logits' (NOISE_FACTOR x SmolLM2's own fp32 rounding of them) and a
    # choice is a few tokens; measured: the largest move 6.1 nats, 150x the threshold
    ids = smollm2[1]("The capital of France is", return_tensors="pt")["input_ids"]
    atol = NOISE_FACTOR * 2 * stock_noise(smollm2[0], ids)
    lls = [
        (base.per_doc[t][d]["_choice_lls"], patched.per_doc[t][d]["_choice_lls"])
        for t in base.per_doc
        for d in base.per_doc[t]
    ]
    assert len(lls) == 8 and any(abs(a - b) > 10 * atol for x, y in lls for a, b in zip(x, y))
    row = {(r["task"], r["metric"]): r for r in report.rows()}[("bb_general_knowledge", "acc")]
    assert row["arms"]["act-all"]["n"] == 8
    paths = write_report([report], tmp_path)
    assert "act-all" in paths["md"].read_text()


def test_cli_calibrate_act_and_temperature_on_smollm2(smollm2, tmp_path, capsys):
    """The calibration commands end to end on the real model (few records, two heads, two steps)."""
    from attnsurgery import find_recipe

    out, png, state = tmp_path / "act.yaml", tmp_path / "sweep.png", tmp_path / "state.jsonl"
    args = [
        "calibrate",
        "act",
        "smollm2-135m",
        "--data",
        "bb_general_knowledge",
        "--limit",
        "6",
        "--layers",
        "20",
    ]
    args += ["--heads", "[0, 5]", "--confidence", "0", "--min-delta=-inf", "--state", str(state)]
    assert main([*args, "--out", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "2 heads swept, 2 kept" in text and "kept heads together" in text
    recipe = find_recipe(out)
    assert recipe.surgeries[0].heads == {20: [0, 5]} and recipe.calibration["n"] == 6
    assert "together" in recipe.calibration and png.stat().st_size > 5_000
    model, tokenizer = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        stock = model(ids).logits
        with patch(model, out):
            patched = model(ids).logits
        with patch(model, "act", layers=[20], heads={20: [0, 5]}, beta=0.4, threshold=0.1):
            by_hand = model(ids).logits
    torch.testing.assert_close(patched, by_hand, atol=0, rtol=0)
    assert not torch.equal(patched, stock)
    # resumed from the state: re-selection only, no new heads (confidence 0: FDR keeps both)
    assert main([*args, "--rule", "fdr"]) == 0
    assert "2 heads swept, 2 kept" in capsys.readouterr().out

    temp = tmp_path / "temp.yaml"
    targs = ["calibrate", "temperature", "smollm2-135m", "--data", "gutenberg_ppl", "--limit", "4"]
    targs += ["--steps", "2", "--eval-every", "1", "--seq-len", "64", "--min-c", "-0.05", "--out", str(temp)]
    assert main(targs) == 0
    text = capsys.readouterr().out
    assert "held-out" in text.lower()
    assert find_recipe(temp).calibration["heldout"]["windows"] > 0
