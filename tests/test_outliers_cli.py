"""`attnsurgery inspect --outliers` and `attnsurgery eval --quant`, on a tiny random-weight Llama saved to disk
(character tokenizer), with the shipped offline tasks (local data, no Hub)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from tiny import KERNEL_NOISE_FACTOR, random_ids, stock_noise, tiny_model, tiny_tokenizer

import attnsurgery
from attnsurgery import load_model, patch
from attnsurgery.cli import main
from attnsurgery.eval.outliers import outlier_stats
from attnsurgery.train.data import load_texts, pack_windows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir))


def _windows(tokenizer, n: int, seq_len: int) -> torch.Tensor:
    """The CLI's windows, built independently: the whole calibration split packed, the first n kept."""
    return pack_windows(tokenizer, load_texts("gutenberg_ppl"), seq_len)[:n]


def _inspect(model_dir: Path, out: Path, *extra: str) -> dict:
    argv = ["inspect", str(model_dir), "--outliers", "--windows", "3", "--seq-len", "48"]
    assert main([*argv, "--batch-size", "2", "--out", str(out), *extra]) == 0
    return json.loads((out / "outliers.json").read_text())


def _same_rows(got: list[dict], stats) -> None:
    assert len(got) == len(stats.layers)
    for row, ref in zip(got, stats.layers):
        assert row == asdict(ref)  # the same forward on the same weights: the JSON holds the very numbers


# ------------------------------------------------------------------------------------------ inspect --outliers
def test_outlier_stats_is_a_top_level_export():
    assert attnsurgery.outlier_stats is outlier_stats
    assert "outlier_stats" in dir(attnsurgery)


def test_inspect_outliers_writes_json_md_png_equal_to_outlier_stats(model_dir, loaded, tmp_path, capsys):
    data = _inspect(model_dir, tmp_path / "out")
    out = capsys.readouterr().out
    assert "wrote" in out and "kurt attn" in out
    assert (data["data"], data["windows"], data["seq_len"]) == ("gutenberg_ppl:calibration", 3, 48)
    assert list(data["stats"]) == ["baseline"]
    model, tokenizer = loaded
    direct = outlier_stats(model, list(_windows(tokenizer, 3, 48).split(2)))
    stats = data["stats"]["baseline"]
    _same_rows(stats["layers"], direct)
    assert stats["num_sequences"] == 3 and stats["num_tokens"] == 3 * 48
    assert stats["max_activation"] == pytest.approx(asdict(direct.max_activation))
    assert all(row["sink_share"] is not None for row in stats["layers"])
    md = (tmp_path / "out" / "outliers.md").read_text()
    assert "| layer | kurt attn |" in md and md.count("\n| 2 |") == 1  # one per-layer table, 3 layers
    assert (tmp_path / "out" / "outliers.png").stat().st_size > 5000


def test_inspect_outliers_with_a_surgery_measures_baseline_and_patched(model_dir, loaded, tmp_path):
    data = _inspect(model_dir, tmp_path / "out", "--surgery", "temperature", "--arg", "tau=0.5")
    assert list(data["stats"]) == ["baseline", "temperature"]
    assert data["stats"]["temperature"]["label"] == "temperature"
    model, tokenizer = loaded
    batches = list(_windows(tokenizer, 3, 48).split(2))
    _same_rows(data["stats"]["baseline"]["layers"], outlier_stats(model, batches))
    with patch(model, "temperature", tau=0.5):
        patched = outlier_stats(model, batches)
    _same_rows(data["stats"]["temperature"]["layers"], patched)
    base, sharp = (data["stats"][k]["layers"] for k in ("baseline", "temperature"))
    assert [r["sink_share"] for r in base] != [r["sink_share"] for r in sharp]
    md = (tmp_path / "out" / "outliers.md").read_text()
    assert "**side by side** (baseline / temperature)" in md
    assert "| baseline |" in md and "| temperature |" in md


def test_inspect_outliers_refuses_a_test_split(model_dir, tmp_path, capsys):
    argv = ["inspect", str(model_dir), "--outliers", "--data", "gutenberg_ppl:test", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "calibration" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "outliers.json").exists()


def test_inspect_without_outliers_is_unchanged(model_dir, tmp_path):
    png = tmp_path / "maps.png"
    assert main(["inspect", str(model_dir), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    maps = json.loads(png.with_suffix(".json").read_text())
    assert set(maps) == {"prompt", "tokens", "layers"}
    assert maps["prompt"] in "".join(maps["tokens"])  # tokens as text: they join back into the prompt


# ---------------------------------------------------------------------------------------------- eval --quant
#: fewer, shorter W8A8 calibration windows than the shipped setting, to keep the tests quick
SMALL_CALIBRATION = {"data": "gutenberg_ppl", "windows": 4, "seq_len": 64, "batch_size": 2}


@pytest.fixture
def small_calibration(monkeypatch):
    monkeypatch.setattr("attnsurgery.eval.text.W8A8_CALIBRATION", SMALL_CALIBRATION)


def _eval(model_dir: Path, out: Path, recipe: Path, *extra: str) -> dict:
    argv = ["eval", str(model_dir), "--recipe", str(recipe), "--tasks", "gutenberg_ppl", "--limit", "2"]
    assert main([*argv, "--batch-size", "4", "--out", str(out), *extra]) == 0
    return json.loads((out / "results.json").read_text())["reports"][0]


def bpb_atol(model, tokenizer) -> float:
    """KERNEL_NOISE_FACTOR x the float32 rounding of one bits-per-byte value (as test_calibrate's score_atol for
    choice log-likelihoods), from the stock model's own logit rounding (fp32 against fp64) on windows of the eval's
    corpus: a token's log-likelihood (its logit minus the log-sum-exp) rounds by at most about twice its logits', a
    character token is at least one byte, and bits per byte average those over the corpus, / ln 2. A worst case
    per token: the average over the corpus rounds far less (measured through lm-eval: ~1e-11 bits per byte)."""
    noise = stock_noise(model, _windows(tokenizer, 2, 128))
    return KERNEL_NOISE_FACTOR * 2 * noise / math.log(2)


def _bpb(report: dict) -> dict[str, float]:
    return {
        arm: row["arms"][arm]["value"]
        for row in report["table"]
        if row["metric"] == "bits_per_byte"
        for arm in row["arms"]
    }


def test_eval_quant_w8a8_differs_from_fp_and_the_cache_keeps_them_apart(
    model_dir, loaded, tmp_path, capsys, monkeypatch, small_calibration
):
    recipe = tmp_path / "sharp.yaml"
    recipe.write_text(
        yaml.safe_dump({"name": "sharp", "surgeries": [{"surgery": "temperature", "args": {"tau": 0.5}}]})
    )
    out = tmp_path / "eval"
    fp = _eval(model_dir, out, recipe)
    w8a8 = _eval(model_dir, out, recipe, "--quant", "w8a8")
    assert "quant" not in fp["settings"]
    assert w8a8["settings"]["quant"]["scheme"] == "w8a8"
    assert w8a8["settings"]["quant"]["calibration"] == SMALL_CALIBRATION
    assert "quantisation: w8a8" in (out / "results.md").read_text()
    fp_bpb, q_bpb = _bpb(fp), _bpb(w8a8)
    assert set(fp_bpb) == set(q_bpb) == {"baseline", "sharp"}
    # effects far beyond float rounding: quantised in every arm, and the surgery active under W8A8 (measured here:
    # 5e-4 to 1.5e-3 bits per byte, 8x to 23x the bound; W8A8 moves this near-uniform random model little)
    atol = bpb_atol(*loaded)
    for arm in ("baseline", "sharp"):
        assert abs(q_bpb[arm] - fp_bpb[arm]) > 10 * atol, arm
        assert fp["arms"][arm]["fingerprint"] != w8a8["arms"][arm]["fingerprint"]
    assert abs(q_bpb["sharp"] - q_bpb["baseline"]) > 10 * atol
    assert len(list((out / "cache").rglob("*.json"))) == 4  # two arms x (FP, W8A8)
    capsys.readouterr()

    def no_run(*args, **kwargs):
        raise AssertionError("a cached arm ran again")

    monkeypatch.setattr("attnsurgery.eval.text.run_arm", no_run)
    assert _bpb(_eval(model_dir, out, recipe)) == fp_bpb
    assert _bpb(_eval(model_dir, out, recipe, "--quant", "w8a8")) == q_bpb
    assert capsys.readouterr().err.count(": cached") == 4


def test_w8a8_is_calibrated_with_the_surgery_active_and_removed_after_each_arm(
    monkeypatch, small_calibration
):
    import attnsurgery.eval.quant as quant
    from attnsurgery.eval.text import evaluate_arms
    from attnsurgery.eval.text_results import Arm
    from attnsurgery.recipe import parse_recipe

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    ids = random_ids(2, 16)
    with torch.no_grad():
        before = model(ids).logits
    seen = []
    original = quant.quantize_w8a8

    def spy(m, batches, **kwargs):
        seen.append((m.config._attn_implementation, sum(b.shape[0] for b in batches)))
        return original(m, batches, **kwargs)

    monkeypatch.setattr(quant, "quantize_w8a8", spy)
    sharp = parse_recipe({"name": "sharp", "surgeries": [{"surgery": "temperature", "args": {"tau": 0.5}}]})
    report = evaluate_arms(
        "tiny", [Arm("baseline"), Arm("sharp", sharp)], ["bb_general_knowledge"], loaded=(model, tokenizer),
        limit=2, quant="w8a8",
    )  # fmt: skip
    assert seen[0] == ("sdpa", 4) and seen[1][0] != "sdpa" and seen[1][1] == 4  # the 2nd with the surgery on
    assert all(a.quant["scheme"] == "w8a8" and a.quant["num_quantized_linears"] == 21 for a in report.arms)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # weights and hooks restored
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_eval_quant_bad_values(model_dir, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(model_dir), "--tasks", "gutenberg_ppl", "--quant", "fp4"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fp4'" in capsys.readouterr().err

    reason = "bitsandbytes 0.0 cannot run LLM.int8 on cpu: NotImplementedError: nope. Fix: run on a CUDA GPU."
    monkeypatch.setattr("attnsurgery.eval.quant.int8_unavailable_reason", lambda device=None: reason)
    monkeypatch.setattr("attnsurgery.models.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["eval", str(model_dir), "--tasks", "gutenberg_ppl", "--quant", "int8"]) == 2
    assert "--quant int8: bitsandbytes 0.0 cannot run LLM.int8" in " ".join(capsys.readouterr().err.split())


# -------------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_inspect_outliers_on_smollm2(tmp_path):
    data = _inspect_real(tmp_path)
    stats = data["stats"]["baseline"]
    assert len(stats["layers"]) == 30 and stats["num_tokens"] == 2 * 64
    assert stats["max_inf_norm"] > 1_000  # SmolLM2's massive first-token activation
    assert stats["max_activation"]["token_index"] == 0
    assert stats["mean_sink_share"] > 0.3


def _inspect_real(out: Path) -> dict:
    assert (
        main(
            ["inspect", "smollm2-135m", "--outliers", "--windows", "2", "--seq-len", "64", "--out", str(out)]
        )
        == 0
    )
    assert (out / "outliers.png").stat().st_size > 5000
    return json.loads((out / "outliers.json").read_text())
