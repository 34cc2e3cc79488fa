"""Long-context evaluation (attnsurgery.eval.longctx): passkey prompts are deterministic and as long as asked, the key
sits at its depth, and perplexity by window length separates a windowed hybrid from softmax only past its window."""

from __future__ import annotations

import copy

import pytest
from tiny import NOISE_FACTOR, float_noise, tiny_model, tiny_tokenizer

from attnsurgery import patch
from attnsurgery.errors import AttnSurgeryError
from attnsurgery.eval.longctx import evaluate_long_context, passkey_prompt, passkey_trials, plot, render


def test_passkey_prompts_are_deterministic_and_sized():
    tok = tiny_tokenizer()
    assert passkey_trials(4, seed=3) == passkey_trials(4, seed=3) != passkey_trials(4, seed=4)
    for key, depth in passkey_trials(4):
        text = passkey_prompt(tok, 600, key, depth)
        n = len(tok(text)["input_ids"])
        assert 600 - 95 < n <= 600  # within one block of filler sentences of the length asked
        assert str(key) in text and text.endswith("The pass key is")
        position = text.index(str(key)) / len(text)
        assert abs(position - depth) < 0.3  # near its depth


def test_hybrid_equals_softmax_inside_its_window_and_not_past_it(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    hybrid = ("hybrid-w32", lambda m: patch(m, "hedgehog", window=32, feature_dim=8))
    results = evaluate_long_context(
        model, tok, [("baseline", None), hybrid], [32, 128], ppl_windows=2, passkey=2
    )
    base, hyb = results["arms"]["baseline"], results["arms"]["hybrid-w32"]
    assert base["32"]["windows"] == 2 and base["128"]["windows"] == 2
    # NOISE_FACTOR x the stock model's own float32 rounding of each perplexity (against a float64 copy)
    double = copy.deepcopy(model).double()
    exact = evaluate_long_context(double, tok, [("baseline", None)], [32, 128], ppl_windows=2, passkey=0)
    tol = {n: NOISE_FACTOR * float_noise(base[n]["ppl"], exact["arms"]["baseline"][n]["ppl"]) for n in base}
    # all keys inside the window: softmax, to rounding
    assert hyb["32"]["ppl"] == pytest.approx(base["32"]["ppl"], abs=tol["32"], rel=0)
    # past it, the linear part speaks: far beyond rounding (measured: 0.25 against 10 x 7.6e-4)
    assert abs(hyb["128"]["ppl"] - base["128"]["ppl"]) > 10 * tol["128"]
    assert 0 <= base["128"]["passkey_accuracy"] <= 1 and base["128"]["passkey_trials"] == 2
    assert "hybrid-w32" in render(results)
    assert plot(results, tmp_path / "l.png").is_file()
    with pytest.raises(AttnSurgeryError, match="exceed the model's context"):
        evaluate_long_context(model, tok, [("baseline", None)], [4096], passkey=0)
