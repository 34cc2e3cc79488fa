"""Calibration: ACT head sweep (fast == slow, resume, selection, recipe) and temperature fitting."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from attnsurgery.patches.act.calibrate import calibrate_act_heads, write_act_recipe
from attnsurgery.patches.temperature.calibrate import fit_temperature, write_temperature_recipe
from tiny import KERNEL_NOISE_FACTOR, NOISE_FACTOR, VOCAB, float_noise, random_ids, tiny_model

from attnsurgery import (
    AttnSurgeryError,
    SurgeryConfigError,
    find_recipe,
    load_surgery,
    patch,
)
from attnsurgery.eval.scoring import ChoiceScorer, encode_pair, record_scores, score_choices, text_windows


class CharTokenizer:
    """Character-level tokenizer over the tiny models' 128-id vocabulary (ids 0-2 are pad/bos/eos)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    name_or_path = "char"

    def __init__(self, bos: bool = False) -> None:
        self.bos = bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        ids = [3 + (ord(ch) - 32) % (VOCAB - 3) for ch in text]
        if add_special_tokens and self.bos:
            ids = [self.bos_token_id, *ids]
        return SimpleNamespace(input_ids=ids)


class PairTokenizer(CharTokenizer):
    """Merges ' x' (space + letter) into one token, like BPE tokenizers merge a leading space into a word."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        ids, i = [], 0
        while i < len(text):
            if text[i] == " " and i + 1 < len(text) and text[i + 1].isalpha():
                ids.append(100 + (ord(text[i + 1]) % 20))
                i += 2
            else:
                ids.append(3 + (ord(text[i]) - 32) % 90)
                i += 1
        return SimpleNamespace(input_ids=ids)


WORDS = "alpha beta gamma delta river stone cloud ember maple quartz".split()


def mc_records(n: int = 6, choices: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        pick = lambda k: [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g)]  # noqa: E731
        query = "Q: " + " ".join(pick(3 + i % 4)) + " ? A:"
        out.append(
            {
                "id": f"r{i}",
                "query": query,
                "choices": [" ".join(pick(1 + (i + c) % 3)) for c in range(choices)],
                "gold": i % choices,
            }
        )
    return out


# ------------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------------


def test_encode_pair_moves_context_whitespace_like_lm_eval():
    tok = PairTokenizer()
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    # the space moves to the continuation and merges with 'y' there, as it would in the full string
    assert ctx == tok("Answer:").input_ids
    assert cont == tok("Answer: yes").input_ids[len(ctx) :]
    assert cont[0] == 100 + ord("y") % 20


def score_atol(model, tok, records, **kw) -> float:
    """KERNEL_NOISE_FACTOR x the float32 rounding of the *stock* model's choice log-likelihoods on these records
    (against a float64 copy): the scale for two float32 computations of the same scores (batched vs one by one, fast
    vs slow sweep). A different CPU or BLAS moves it; a wrong score misses by far more."""
    single = score_choices(model, tok, records, **kw)
    exact = score_choices(copy.deepcopy(model).double(), tok, records, **kw)
    return KERNEL_NOISE_FACTOR * float_noise(single, exact)


def test_batched_scoring_matches_one_sequence_at_a_time():
    model = tiny_model("llama")
    tok = CharTokenizer()
    records = mc_records()
    tol = score_atol(model, tok, records, batch_size=1)
    batched = score_choices(model, tok, records, batch_size=5)
    single = score_choices(model, tok, records, batch_size=1)
    for a, b in zip(batched, single):
        assert a == pytest.approx(b, abs=tol)
    # against a direct computation on the full logits
    ctx, cont = encode_pair(tok, records[0]["query"], records[0]["choices"][0])
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids[:, :-1]).logits.log_softmax(-1)[0]
    direct = sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
    assert batched[0][0] == pytest.approx(direct, abs=tol)


def test_bos_prefix_and_truncation():
    tok = CharTokenizer(bos=True)
    records = mc_records(2)
    scorer = ChoiceScorer(tok, records, max_length=6)
    tokens, n_cont = scorer.sequences[0]
    assert len(tokens) == 7 and 1 <= n_cont <= 6
    full = ChoiceScorer(tok, records)
    assert full.sequences[0][0][0] == tok.bos_token_id  # BOS once, in front of the context


def test_record_scores_metrics():
    lls = [[-1.0, -2.0, -3.0], [-2.0, -1.0, -1.5]]
    golds = [0, 0]
    lp = record_scores(lls, golds, "choice_logprob")
    assert float(lp[0]) == pytest.approx(-1.0 - math.log(math.exp(-1) + math.exp(-2) + math.exp(-3)))
    assert record_scores(lls, golds, "acc").tolist() == [1.0, 0.0]
    assert record_scores(lls, golds, "margin").tolist() == [1.0, -1.0]


# ------------------------------------------------------------------------------------------------------------
# ACT head calibration
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fast_sweep_equals_slow_sweep(arch):
    model = tiny_model(arch)
    tok = CharTokenizer()
    records = mc_records()
    kw = dict(beta=0.3, threshold=0.08, batch_size=5, progress=False)
    tol = score_atol(model, tok, records, batch_size=5)  # the README's claim: within float32 noise
    slow = calibrate_act_heads(model, tok, records, fast=False, **kw)
    fast = calibrate_act_heads(model, tok, records, fast=True, head_batch=3, **kw)
    assert (
        set(fast.head_ll)
        == set(slow.head_ll)
        == {(layer, h) for layer in range(len(fast.head_ll) // 4) for h in range(4)}
    )
    moved = 0
    for key in slow.head_ll:
        for a, b, base in zip(fast.head_ll[key], slow.head_ll[key], slow.baseline_ll):
            assert a == pytest.approx(b, abs=tol)
            moved += max(abs(x - y) for x, y in zip(b, base)) > 10 * tol
    assert moved > 0  # ACT moved some heads' scores far beyond the tolerance: the comparison is not vacuous
    for f, s in zip(fast.table(), slow.table()):
        assert f.delta == pytest.approx(s.delta, abs=tol)
    # the model is left unpatched
    ids = random_ids(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model(arch)(ids).logits, atol=0, rtol=0)


def test_single_head_sweep_matches_patch():
    model = tiny_model("llama")
    tok = CharTokenizer()
    records = mc_records(4)
    tol = score_atol(model, tok, records)
    result = calibrate_act_heads(model, tok, records, layers=[1], heads=[2], threshold=0.08, progress=False)
    assert list(result.head_ll) == [(1, 2)]
    with patch(model, "act", layers=[1], heads={1: [2]}, beta=0.4, threshold=0.08):
        direct = score_choices(model, tok, records)
    for a, b in zip(result.head_ll[(1, 2)], direct):
        assert a == pytest.approx(b, abs=tol)


def test_resume_skips_finished_heads_and_refuses_other_configs(tmp_path):
    model = tiny_model("llama")
    tok = CharTokenizer()
    records = mc_records(4)
    state = tmp_path / "act_state.jsonl"
    first = calibrate_act_heads(
        model, tok, records, layers=[0], threshold=0.08, state_path=state, progress=False
    )
    lines = state.read_text().splitlines()
    assert json.loads(lines[0])["type"] == "header" and len(lines) == 2 + 4  # header, baseline, 4 heads

    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    again = calibrate_act_heads(
        model, tok, records, layers=[0], threshold=0.08, state_path=state, progress=False
    )
    assert calls == [] and again.head_ll == first.head_ll  # nothing recomputed
    # an interrupted write leaves half a line: it is dropped and that head redone
    with open(state, "a") as f:
        f.write('{"type": "head", "layer": 1, "he')
    grown = calibrate_act_heads(
        model, tok, records, layers="0:2", threshold=0.08, state_path=state, progress=False
    )
    handle.remove()
    assert len(grown.head_ll) == 8 and calls  # layer 1 computed, layer 0 reused
    assert len(state.read_text().splitlines()) == 2 + 8
    fresh = calibrate_act_heads(model, tok, records, layers="0:2", threshold=0.08, progress=False)
    tol = score_atol(model, tok, records)
    for key in fresh.head_ll:
        for a, b in zip(fresh.head_ll[key], grown.head_ll[key]):
            assert a == pytest.approx(b, abs=tol)

    with pytest.raises(AttnSurgeryError, match="act differ"):
        calibrate_act_heads(model, tok, records, layers=[0], beta=0.5, threshold=0.08, state_path=state)
    with pytest.raises(AttnSurgeryError, match="data"):
        calibrate_act_heads(model, tok, mc_records(5), layers=[0], threshold=0.08, state_path=state)
    with pytest.raises(AttnSurgeryError, match="model"):
        calibrate_act_heads(
            tiny_model("llama", seed=3), tok, records, layers=[0], threshold=0.08, state_path=state
        )


def test_act_calibration_errors():
    model = tiny_model("llama")
    tok = CharTokenizer()
    good = mc_records(2)
    with pytest.raises(AttnSurgeryError, match="no calibration records"):
        calibrate_act_heads(model, tok, [])
    with pytest.raises(AttnSurgeryError, match="perplexity record"):
        calibrate_act_heads(model, tok, [{"id": "t", "text": "some text"}])
    with pytest.raises(AttnSurgeryError, match="gold"):
        calibrate_act_heads(model, tok, [{**good[0], "gold": 7}])
    with pytest.raises(AttnSurgeryError, match="query"):
        calibrate_act_heads(model, tok, [{"choices": ["a", "b"], "gold": 0}])
    with pytest.raises(SurgeryConfigError, match="layer 5 is out of range"):
        calibrate_act_heads(model, tok, good, layers=[5])
    with pytest.raises(SurgeryConfigError, match="head 4 is out of range"):
        calibrate_act_heads(model, tok, good, heads=[4])
    with pytest.raises(SurgeryConfigError, match="beta"):
        calibrate_act_heads(model, tok, good, beta=1.5)
    with pytest.raises(SurgeryConfigError, match="threshold"):
        calibrate_act_heads(model, tok, good, threshold=0.0)
    with pytest.raises(SurgeryConfigError, match="not both"):
        calibrate_act_heads(model, tok, good, threshold=0.1, alpha=5.0)
    with pytest.raises(AttnSurgeryError, match="metric"):
        calibrate_act_heads(model, tok, good, metric="f1")
    with pytest.raises(AttnSurgeryError, match="confidence"):
        calibrate_act_heads(model, tok, good, confidence=1.0)


def test_selection_and_recipe_round_trip(tmp_path):
    model = tiny_model("llama")
    tok = CharTokenizer()
    records = mc_records(8)
    result = calibrate_act_heads(
        model, tok, records, threshold=0.08, progress=False, data="synthetic/calibration"
    )
    rows = result.table()
    assert len(rows) == 12 and all(r.kept == (r.delta > 0 and r.p_improve >= 0.95) for r in rows)
    loose = result.select(confidence=0.0, min_delta=-math.inf)  # every head
    assert sum(len(v) for v in loose.values()) == 12
    helped = result.select(confidence=0.0)
    assert all(r.kept == (r.delta > 0) for r in result.table(confidence=0.0))
    assert "heads swept" in result.summary()

    heads = helped or {1: [0, 2]}
    path = write_act_recipe(result, tmp_path / "act" / "tiny.yaml", "tiny-llama", heads=heads)
    recipe = find_recipe(path)
    assert recipe.model == "tiny-llama" and recipe.calibration["n"] == 8
    assert recipe.calibration["data"] == "synthetic/calibration"
    assert len(recipe.calibration["scores"]) == 3 and len(recipe.calibration["scores"][0]) == 4
    ids = random_ids(2, 14)
    with torch.no_grad():
        with patch(model, path):
            from_recipe = model(ids).logits
        with result.patch(model, heads):
            direct = model(ids).logits
        with patch(model, "act", heads=heads, beta=0.4, threshold=0.08):
            by_hand = model(ids).logits
    torch.testing.assert_close(from_recipe, by_hand, atol=0, rtol=0)
    torch.testing.assert_close(direct, by_hand, atol=0, rtol=0)
    with pytest.raises(AttnSurgeryError, match="no head passed"):
        write_act_recipe(result, tmp_path / "empty.yaml", "tiny-llama", heads={})


def test_benjamini_hochberg_and_ztest():
    from attnsurgery.patches.act.selection import _bh_pass, _ztest_p

    # m=5, q=0.05: thresholds 0.01 .. 0.05; sorted p 0.001 0.012 0.03 0.045 0.2 -> largest k with p_(k) <= q k / m is 3
    p = torch.tensor([0.045, 0.001, 0.012, 0.2, 0.03], dtype=torch.float64)
    assert _bh_pass(p, 0.05).tolist() == [False, True, True, False, True]
    assert _bh_pass(p, 0.06).tolist() == [True, True, True, False, True]  # 0.045 <= 0.048 now
    assert not _bh_pass(torch.tensor([0.5, 0.9], dtype=torch.float64), 0.05).any()
    d = torch.tensor(
        [[1.0, 1.2, 0.8, 1.1], [-1.0, -0.9, -1.1, -1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64
    )
    z = _ztest_p(d)
    assert z[0] < 1e-3 and z[1] > 0.999 and z[2] == 1.0  # no spread and no mean: never a discovery


def test_fdr_rule_and_kept_heads_scored_together(tmp_path):
    model = tiny_model("llama")
    tok = CharTokenizer()
    records = mc_records(8)
    result = calibrate_act_heads(model, tok, records, threshold=0.08, progress=False, rule="fdr")
    from attnsurgery.patches.act.selection import _bh_pass, _ztest_p

    base = record_scores(result.baseline_ll, result.golds, "choice_logprob")
    keys = sorted(result.head_ll)
    deltas = (
        torch.stack([record_scores(result.head_ll[k], result.golds, "choice_logprob") for k in keys]) - base
    )
    want = _bh_pass(_ztest_p(deltas), 0.05) & (deltas.mean(-1) > 0)
    assert [r.kept for r in result.table()] == want.tolist()
    # a lax FDR keeps a superset of a strict one (BH is monotone in q)
    strict = {(r.layer, r.head) for r in result.table(confidence=0.99) if r.kept}
    lax = {(r.layer, r.head) for r in result.table(confidence=0.5) if r.kept}
    assert strict <= lax
    assert "false discovery rate" in result.summary()
    with pytest.raises(AttnSurgeryError, match="selection rule"):
        result.table(rule="holm")

    heads = {1: [0, 2], 2: [1]}
    assert result.combined() == {}
    together = result.score_selection(model, tok, records, heads=heads)
    with torch.no_grad(), patch(model, "act", heads=heads, beta=0.4, threshold=0.08):
        want_ll = score_choices(model, tok, records)
    assert result.combined_ll == want_ll
    got = record_scores(want_ll, result.golds, "choice_logprob") - base
    assert together["delta"] == pytest.approx(float(got.mean()))
    assert "kept heads together" in result.summary()
    path = write_act_recipe(result, tmp_path / "act.yaml", "tiny-llama", heads=heads)
    cal = find_recipe(path).calibration
    assert cal["together"]["delta"] == pytest.approx(
        together["delta"], abs=0.5e-5
    )  # the recipe rounds to 5 places
    assert "Benjamini-Hochberg" in cal["selection"]["rule"]
    other = write_act_recipe(result, tmp_path / "other.yaml", "tiny-llama", heads={1: [3]})
    assert "together" not in find_recipe(other).calibration  # measured for another head set
    with pytest.raises(AttnSurgeryError, match="same records"):
        result.score_selection(model, tok, records[:3], heads=heads)


# ------------------------------------------------------------------------------------------------------------
# Temperature: the trainable flag and fitting
# ------------------------------------------------------------------------------------------------------------

PROSE = [
    "the river runs past the old stone mill and the miller counts the sacks of grain each evening. " * 3,
    "a small boat drifts on the lake while the wind moves the reeds along the muddy shore. " * 3,
    "in the morning the market fills with bread, apples, cheese and the noise of a hundred voices. " * 3,
    "the clockmaker opens his shop, winds every clock on the wall and listens to them tick together. " * 3,
    "snow falls on the mountain village and the children build a fort behind the church. " * 3,
]


def test_temperature_trainable_flag():
    model = tiny_model("llama")
    ids = random_ids(2, 12)
    with torch.no_grad():
        base = model(ids).logits
    with patch(model, "temperature", trainable=True, layers="1:") as handle:
        params = list(handle.parameters())
        assert len(params) == 1 and params[0].shape == (3, 4)
        assert handle.surgeries[0].active_stages(1) and not handle.surgeries[0].active_stages(0)
        out = model(ids).logits
        torch.testing.assert_close(out, base, atol=0, rtol=0)  # c = 0: the identity, exactly
        model(ids, labels=ids).loss.backward()
    grad = params[0].grad
    assert grad[1:].abs().sum() > 0 and grad[0].abs().sum() == 0


def test_fit_temperature_lowers_loss_and_touches_only_c(tmp_path):
    model = tiny_model("llama")
    tok = CharTokenizer()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    # full batch (batch_size > windows): the training objective itself must go down
    result = fit_temperature(
        model,
        tok,
        PROSE,
        steps=30,
        lr=0.05,
        seq_len=48,
        batch_size=64,
        eval_every=10,
        patience=10,
        progress=False,
    )
    assert result.train_loss[-1] < result.train_loss[0] - 1e-4
    # model weights and their requires_grad flags are untouched
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=0, rtol=0)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert result.fitted_coef.abs().sum() > 0
    # per-layer: one value per layer, shared by its heads; never below min_c = 0
    assert torch.all(result.fitted_coef == result.fitted_coef[:, :1]) and result.fitted_coef.min() >= 0
    # shipped table: never worse than the identity on validation
    assert result.best_val_loss <= result.identity_val_loss
    assert result.improved == bool(result.coef.any())
    assert "held-out ppl" in result.summary()

    # round trips with a non-identity table, whether or not it beat the identity on these random weights
    result.coef = result.fitted_coef.clone()
    ids = torch.tensor([tok(PROSE[0]).input_ids[:40]])
    with torch.no_grad():
        with result.apply(model):
            expected = model(ids).logits
        result.save(model, tmp_path / "fit")
        with load_surgery(model, tmp_path / "fit"):
            torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
        base = model(ids).logits
    assert not torch.equal(expected, base)
    path = write_temperature_recipe(result, tmp_path / "temperature" / "tiny.yaml", "tiny-llama", force=True)
    assert (tmp_path / "temperature" / "tiny.safetensors").is_file()
    recipe = find_recipe(path)
    assert recipe.calibration["heldout"]["ppl_before"] == pytest.approx(
        result.heldout_ppl_before, abs=0.5e-4
    )  # the recipe rounds to 4 places
    with patch(model, path), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)


def test_fit_temperature_per_head_and_guard(tmp_path):
    model = tiny_model("qwen2")
    tok = CharTokenizer()
    result = fit_temperature(
        model,
        tok,
        PROSE[:4],
        heldout_texts=PROSE[4:],
        per="head",
        layers="1:",
        steps=6,
        seq_len=32,
        eval_every=3,
        progress=False,
    )
    assert result.layers == [1, 2] and result.fitted_coef[0].abs().sum() == 0
    # no table beat the identity: the identity ships and the recipe writer refuses
    result.best_val_loss = result.identity_val_loss
    result.coef = torch.zeros_like(result.coef)
    with pytest.raises(AttnSurgeryError, match="did not beat the identity"):
        write_temperature_recipe(result, tmp_path / "t.yaml", "tiny")
    result.best_val_loss, result.heldout_loss_after = (
        result.identity_val_loss - 1,
        result.heldout_loss_before + 1,
    )
    with pytest.raises(AttnSurgeryError, match=r"worse.*--force"):
        write_temperature_recipe(result, tmp_path / "t.yaml", "tiny")
    assert not (tmp_path / "t.yaml").exists()  # nothing half-written
    # an experiment may still be written on purpose (`calibrate temperature ... --force`)
    written = write_temperature_recipe(result, tmp_path / "t.yaml", "tiny", force=True)
    assert (
        yaml.safe_load(written.read_text())["calibration"]["heldout"]["ppl_after"]
        > yaml.safe_load(written.read_text())["calibration"]["heldout"]["ppl_before"]
    )


def test_fit_temperature_errors():
    model = tiny_model("llama")
    tok = CharTokenizer()
    with pytest.raises(AttnSurgeryError, match="per"):
        fit_temperature(model, tok, PROSE, per="token")
    with pytest.raises(AttnSurgeryError, match="at least two texts"):
        fit_temperature(model, tok, PROSE[:1])
    with pytest.raises(AttnSurgeryError, match="held-out"):
        fit_temperature(model, tok, PROSE, heldout_texts=PROSE[:1])
    with pytest.raises(SurgeryConfigError, match="seq_len"):
        fit_temperature(model, tok, PROSE, seq_len=4)
    with pytest.raises(SurgeryConfigError, match="layer 9"):
        fit_temperature(model, tok, PROSE, layers=[9])
    n = model.config.max_position_embeddings
    with pytest.raises(SurgeryConfigError, match="attention would invert"):
        fit_temperature(model, tok, PROSE, min_c=-1.01 / math.log(n))
    assert text_windows(tok, ["ab", "cd"], 64).shape == (1, 6)  # shorter than a window: one short window


def _reference_temperature_fit(model, train, val, *, layers, steps, lr, eval_every, patience, min_c=0.0):
    """The fit written out by hand: full-batch Adam on the per-layer-tied c, projected onto c >= min_c, validated
    every eval_every steps, the best table (step 0's identity included) kept, early stop after patience."""
    from attnsurgery.train.freeze import frozen

    with frozen(model), patch(model, "temperature", layers=layers, trainable=True) as handle:
        surgery = handle.surgeries[0]
        coef = surgery.coef
        mask = torch.stack([surgery.targets.head_mask(i) for i in range(coef.shape[0])]).float()
        opt = torch.optim.Adam([coef], lr=lr)

        def val_loss() -> float:
            with torch.no_grad():
                return float(model(input_ids=val, labels=val, use_cache=False).loss)

        history, losses = [(0, val_loss())], []
        best, best_val, stale = coef.detach().clone(), history[0][1], 0
        for step in range(1, steps + 1):
            opt.zero_grad()
            loss = model(input_ids=train, labels=train, use_cache=False).loss
            loss.backward()
            coef.grad = (coef.grad * mask).sum(-1, keepdim=True).expand_as(coef) * mask
            opt.step()
            with torch.no_grad():
                coef.clamp_(min=min_c).mul_(mask)
            losses.append(float(loss.detach()))
            if step % eval_every == 0 or step == steps:
                history.append((step, val_loss()))
                if history[-1][1] < best_val:
                    best, best_val, stale = coef.detach().clone(), history[-1][1], 0
                else:
                    stale += 1
                if stale >= patience:
                    break
        return best, coef.detach().clone(), history, losses


def test_fit_temperature_runs_on_the_shared_trainer(monkeypatch):
    from attnsurgery.train import trainer as shared

    calls = []
    real_train = shared.train

    def spy(model, handle, data, config, **kwargs):
        calls.append((data, config, kwargs))
        result = real_train(model, handle, data, config, **kwargs)
        calls[-1] += (result,)
        return result

    monkeypatch.setattr(shared, "train", spy)
    model = tiny_model("llama")
    model64 = copy.deepcopy(model).double()  # for the noise scale below, before the fit touches the model
    tok = CharTokenizer()
    settings = dict(layers="1:", steps=12, lr=0.05, eval_every=4, patience=10)
    result = fit_temperature(model, tok, PROSE, seq_len=48, batch_size=64, progress=False, **settings)

    # one call of the shared trainer, with the fit's settings as TrainConfig-level behaviour
    assert len(calls) == 1
    data, config, kwargs, trained = calls[0]
    assert (config.objective, config.keep, config.patience, config.val_every) == ("lm", "best", 10, 4)
    assert config.max_grad_norm is None and config.lr == 0.05 and callable(kwargs["after_step"])
    assert config.batch_size == len(data.train) == result.n_train_windows  # full batch
    assert len(data.val) == result.n_val_windows
    # the fit's curves are the trainer's
    assert result.val_history == [(r["step"], r["lm"]) for r in trained.val_history]
    assert result.train_loss == trained.train_loss and result.steps == trained.steps

    # the same windows as before: training texts only (the held-out text never enters), validation = the last ones
    windows = text_windows(tok, PROSE[:-1], 48)
    n_val = result.n_val_windows
    torch.testing.assert_close(data.train, windows[:-n_val], atol=0, rtol=0)
    torch.testing.assert_close(data.val, windows[-n_val:], atol=0, rtol=0)

    # and the result matches the hand-written fit (full batch: window order only changes the rounding)
    best, final, history, losses = _reference_temperature_fit(
        model, windows[:-n_val], windows[-n_val:], **settings
    )
    # the fit's float noise on this machine: the hand-written fit against the same fit on a float64 copy of the
    # model. transformers computes the loss in float32 either way, so a loss is known to its float32 resolution at
    # best, and the coefficients (float32 parameters) to theirs.
    _, final64, _, _ = _reference_temperature_fit(model64, windows[:-n_val], windows[-n_val:], **settings)
    eps = torch.finfo(torch.float32).eps
    coef_atol = NOISE_FACTOR * max(float((final - final64).abs().max()), eps * float(final.abs().max()))
    loss_atol = NOISE_FACTOR * eps * max(losses + [v for _, v in history])
    torch.testing.assert_close(result.fitted_coef, final, atol=coef_atol, rtol=0)
    assert result.fitted_coef.abs().sum() > 0
    torch.testing.assert_close(torch.tensor(result.train_loss), torch.tensor(losses), atol=loss_atol, rtol=0)
    assert [s for s, _ in result.val_history] == [s for s, _ in history]
    torch.testing.assert_close(
        torch.tensor([v for _, v in result.val_history]),
        torch.tensor([v for _, v in history]),
        atol=loss_atol,
        rtol=0,
    )
    expected = best if min(v for _, v in history) < history[0][1] else torch.zeros_like(best)
    torch.testing.assert_close(result.coef, expected, atol=coef_atol, rtol=0)
    # the model is left unpatched, with its weights trainable again
    assert all(p.requires_grad for p in model.parameters())
