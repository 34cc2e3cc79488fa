"""Bad input, table-driven: every case must fail with a clear error (an AttnSurgeryError from the API; the documented
exit code and no traceback from the CLI) that names the bad value or the fix, leave the model exactly as it was, and
leave no file behind (nothing half-written, nothing overwritten).

Exit codes (README): 2 bad input, 3 unknown surgery, 4 bad surgery argument, 5 bad recipe, 7 model not found.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny import tiny_model, tiny_tokenizer

from attnsurgery import attention_maps, find_recipe, load_model, load_surgery, patch, save_surgery
from attnsurgery.engine import Engine
from attnsurgery.errors import AttnSurgeryError

# -- the API ----------------------------------------------------------------------------------------------------------


def _p(surgery, **kw):
    return lambda m, tmp: patch(m, surgery, **kw)


def _twice(surgery, first, second):
    def run(m, tmp):
        handle = patch(m, surgery, **first)
        try:
            patch(m, surgery, **second)
        finally:
            handle.remove()

    return run


def _with_removed(m, tmp):
    handle = patch(m, "temperature", tau=0.8)
    handle.remove()
    with handle:
        pass


def _save(target, **kw):
    def run(m, tmp):
        handle = patch(m, "temperature", tau=0.8)
        try:
            save_surgery(handle, tmp / target, **kw)
        finally:
            handle.remove()

    return run


def _load(folder):
    return lambda m, tmp: load_surgery(m, tmp / folder)


def _patch_path(folder):
    return lambda m, tmp: patch(m, str(tmp / folder))


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4
    )
    return T5ForConditionalGeneration(config).eval()


def _recipe(data):
    def run(m, tmp):
        import tempfile

        path = Path(tempfile.mkdtemp()) / "r.yaml"  # outside the folder whose files the test watches
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
        (path.parent / "statedir").mkdir()
        return patch(m, str(path))

    return run


def _save_to(target):
    def run(m, tmp):
        handle = patch(m, "temperature", tau=0.8)
        try:
            save_surgery(handle, target(tmp))
        finally:
            handle.remove()

    return run


API_CASES = [
    # argument types: coerced once or refused with the name, the value and the type
    ("tau-word", _p("temperature", tau="abc"), "tau='abc'"),
    ("tau-empty", _p("temperature", tau=""), "tau=''"),
    ("tau-nan-string", _p("temperature", tau="nan"), "tau='nan'"),
    ("tau-nan", _p("temperature", tau=float("nan")), "tau"),
    ("tau-none", _p("temperature", tau=None), "tau=None"),
    ("tau-bool", _p("temperature", tau=True), "tau=True"),
    ("tau-zero", _p("temperature", tau=0), "out of range"),
    ("tau-negative-string", _p("temperature", tau="-1e-1"), "out of range"),
    ("tau-empty-list", _p("temperature", tau=[]), "tau=\\[\\]"),
    ("tau-list-word", _p("temperature", tau=[0.5, "x", 1, 1]), "tau="),
    ("tau-wrong-length", _p("temperature", tau=[0.5, 0.5]), "4 values"),
    ("tau-dict-word", _p("temperature", tau={1: "sharp"}), "tau="),
    ("c-word", _p("temperature", c="big"), "c='big'"),
    ("scale-bool", _p("head_scale", scale=True), "scale=True"),
    ("scale-negative", _p("head_scale", scale=-1.0), "out of range"),
    ("trainable-maybe", _p("head_scale", trainable="maybe"), "true or false"),
    ("trainable-one", _p("head_scale", trainable=1), "true or false"),
    ("lora-r-fraction", _p("lora", r=2.5), "whole number"),
    ("lora-r-zero", _p("lora", r=0), r"r=0 is out of range"),  # as given, not as 0.0
    ("lora-r-word", _p("lora", r="eight"), "whole number"),
    ("lora-targets-number", _p("lora", targets=5), "name"),
    ("lora-targets-unknown", _p("lora", targets="qq_proj"), "qq_proj"),
    ("lora-init-unknown", _p("lora", init="zeros"), "init"),
    ("gamma-positive", _p("clipped_softmax", gamma=0.1), "out of range"),
    ("gamma-word", _p("clipped_softmax", gamma="low"), "gamma='low'"),
    ("zeta-below-one", _p("clipped_softmax", zeta=0.5), "out of range"),
    ("act-beta-above-one", _p("act", beta=1.5), "out of range"),
    ("act-beta-word", _p("act", beta="half"), "beta='half'"),
    ("act-threshold-negative", _p("act", threshold=-0.1), "out of range"),
    ("act-decode-unknown", _p("act", decode="freeze"), "(?i)did you mean 'frozen'"),
    ("gates-form-unknown", _p("gated_attention", form="elementwse"), "(?i)did you mean 'elementwise'"),
    ("gates-form-number", _p("gated_attention", form=3), "one of"),
    ("gates-init-one", _p("gated_attention", gate_init=1.0), "gate_init"),
    ("gates-seed-fraction", _p("gated_attention", seed=1.5), "whole number"),
    ("moh-router-unknown", _p("moh", router="learnt"), "(?i)did you mean 'learned'"),
    ("moh-active-above-one", _p("moh", active=1.5), "active"),
    ("moh-top-k-and-active", _p("moh", top_k=1, active=0.5), "not both"),
    ("moh-shared-all", _p("moh", shared=4), "shared"),
    ("moh-top-k-word", _p("moh", top_k="two"), "top_k"),
    ("moh-skip-string", _p("moh", skip_compute="yes"), "true or false"),
    ("hedgehog-window-negative", _p("hedgehog", window=-1), "window"),
    ("hedgehog-feature-dim-fraction", _p("hedgehog", feature_dim=6.5), "integer|whole number"),
    ("hedgehog-linear-only-string", _p("hedgehog", linear_only="true"), "true or false"),
    ("reweight-p-word", _p("reweight", p="many"), "p='many'"),
    ("unknown-argument", _p("temperature", tua=0.8), "(?i)did you mean 'tau'"),
    # names
    ("unknown-surgery", _p("tempreature"), "(?i)did you mean 'temperature'"),
    ("surgery-upper-case", _p("TEMPERATURE"), "(?i)did you mean 'temperature'"),
    ("surgery-empty", _p(""), "unknown surgery|recipe"),
    ("var-on-a-text-model", _p("var"), "vision-language"),
    ("vhr-on-a-text-model", _p("vhr"), "vision-language"),
    # layers and heads
    ("layer-string-out-of-range", _p("temperature", tau=0.8, layers="30"), "layer 30 is out of range"),
    ("layer-negative-out-of-range", _p("temperature", tau=0.8, layers="-31"), "layer -31 is out of range"),
    ("layer-int-out-of-range", _p("temperature", tau=0.8, layers=3), "out of range"),
    ("layer-slice-step-zero", _p("temperature", tau=0.8, layers="0:3:0"), "step 0"),
    ("layer-slice-past", _p("temperature", tau=0.8, layers="2:10"), "reaches past"),
    ("layer-slice-empty", _p("temperature", tau=0.8, layers="2:1"), "selects no layer"),
    ("layer-slice-words", _p("temperature", tau=0.8, layers="a:b"), "not a slice"),
    ("layer-empty-list", _p("temperature", tau=0.8, layers=[]), "empty list"),
    ("layer-float", _p("temperature", tau=0.8, layers=1.5), "not a layer index"),
    ("layer-bool", _p("temperature", tau=0.8, layers=True), "not a layer index"),
    ("layer-word", _p("temperature", tau=0.8, layers="last"), "not a layer index"),
    ("heads-out-of-range", _p("temperature", tau=0.8, heads=[7]), "head 7 is out of range"),
    ("heads-negative", _p("temperature", tau=0.8, heads=[-1]), "out of range"),
    ("heads-unclosed", _p("temperature", tau=0.8, heads="[0, 1"), "brackets"),
    ("heads-empty", _p("temperature", tau=0.8, heads=[]), "empty list"),
    ("heads-word", _p("temperature", tau=0.8, heads=["first"]), "not a head index"),
    ("heads-layer-out-of-range", _p("temperature", tau=0.8, heads={5: [0]}), "layer 5 is out of range"),
    ("heads-outside-layers", _p("temperature", tau=0.8, layers=[0], heads={2: [0]}), "outside layers"),
    # lifecycle and composition
    ("same-surgery-twice", _twice("temperature", {"tau": 0.8}, {"tau": 0.8}), "already patched"),
    (
        "same-surgery-overlapping",
        _twice("head_scale", {"scale": 0.5, "layers": "0:2"}, {"scale": 0.5, "layers": "1:"}),
        "already patched on layers 1",
    ),
    ("with-removed-handle", _with_removed, "was removed"),
    ("not-a-model", lambda m, tmp: patch(object(), "temperature"), "not a transformers PreTrainedModel"),
    # files
    ("save-onto-saved", _save("saved"), "overwrite"),
    ("save-onto-file", _save("fixtures/a-file.txt"), "is a file"),
    ("load-missing-folder", _load("nothing-here"), "holds no attnsurgery_config.json"),
    ("load-not-json", _load("fixtures/not-json"), "not valid JSON"),
    ("load-no-surgeries", _load("fixtures/no-surgeries"), "no 'surgeries'"),
    ("load-truncated-state", _load("fixtures/truncated"), "cannot be read as safetensors"),
    ("load-other-shape", _load("fixtures/other-shape"), "(?i)layer|head|shape"),
    ("patch-missing-yaml", lambda m, tmp: patch(m, str(tmp / "none.yaml")), "does not exist"),
    ("patch-truncated-folder", _patch_path("fixtures/truncated"), "cannot be read as safetensors"),
    (
        "patch-saved-with-overrides",
        lambda m, tmp: patch(m, str(tmp / "saved"), tau=0.5),
        "no keyword overrides",
    ),
    ("recipe-not-mapping", _recipe("- a\n- b\n"), "mapping|recipe"),
    ("recipe-bad-yaml", _recipe("surgeries: [\n"), "YAML|yaml"),
    (
        "recipe-unknown-key",
        _recipe({"surgeries": [{"surgery": "temperature"}], "modle": "x"}),
        "(?i)did you mean 'model'",
    ),
    (
        "recipe-unknown-surgery",
        _recipe({"surgeries": [{"surgery": "tempreature"}]}),
        "(?i)did you mean 'temperature'",
    ),
    (
        "recipe-bad-argument",
        _recipe({"surgeries": [{"surgery": "temperature", "args": {"tau": "abc"}}]}),
        "tau='abc'",
    ),
    (
        "recipe-layers-string",
        _recipe({"surgeries": [{"surgery": "temperature", "layers": "9"}]}),
        "layer 9 is out of range",
    ),
    (
        "recipe-missing-state",
        _recipe({"surgeries": [{"surgery": "head_scale", "state": "gone.safetensors"}]}),
        "gone.safetensors",
    ),
    ("encoder-decoder-model", lambda m, tmp: patch(_t5(), "temperature", tau=0.8), "encoder-decoder model"),
    # issue 27's sweep (evals/bad_inputs.py): each of these was a bare exception or a silent acceptance
    ("heads-fraction", _p("temperature", tau=0.8, heads=[0.5]), "0.5 is not a head index"),
    ("heads-bool", _p("temperature", tau=0.8, heads=[True]), "True is not a head index"),
    ("tau-layer-key-word", _p("temperature", tau={"x": 0.5}), "'x'.*does not name a layer"),
    ("tau-inf", _p("temperature", tau=float("inf")), "tau=inf is out of range"),
    ("scale-inf", _p("head_scale", scale=float("inf")), "scale=inf is out of range"),
    ("find-recipe-none", lambda m, tmp: find_recipe(None), "recipe None: name a shipped recipe"),
    ("find-recipe-empty", lambda m, tmp: find_recipe(""), "recipe '': name a shipped recipe"),
    ("recipe-binary", _recipe(b"\xff\xfe\x00\x81binary"), "not a text file"),
    ("recipe-empty-file", _recipe(""), "is empty"),
    (
        "recipe-key-twice",
        _recipe("surgeries: [temperature]\nsurgeries: [head_scale]\n"),
        "key 'surgeries' twice",
    ),
    (
        "recipe-argument-twice",
        _recipe("surgeries:\n  - surgery: temperature\n    args: {tau: 0.8, tau: 0.5}\n"),
        "key 'tau' twice",
    ),
    (
        "recipe-model-list",
        _recipe({"model": ["a", "b"], "surgeries": ["temperature"]}),
        "'model' must be a string",
    ),
    (
        "recipe-state-folder",
        _recipe({"surgeries": [{"surgery": "head_scale", "args": {"trainable": True}, "state": "statedir"}]}),
        "statedir is a folder",
    ),
    ("save-not-a-handle", lambda m, tmp: save_surgery("temperature", tmp / "s"), "not a str 'temperature'"),
    ("save-empty-path", _save_to(lambda tmp: ""), "an empty name would write into the current folder"),
    (
        "save-under-a-file",
        _save_to(lambda tmp: tmp / "fixtures" / "a-file.txt" / "x"),
        "a-file.txt is a file",
    ),
    ("load-entry-without-name", _load("fixtures/entry-no-name"), r"surgeries\[0\] is .*not a mapping"),
    ("load-entry-string", _load("fixtures/entry-string"), r"surgeries\[0\] is 'temperature'"),
    ("load-heads-list", _load("fixtures/heads-list"), "'heads' is \\[0\\], not a mapping"),
    ("load-heads-word-key", _load("fixtures/heads-word"), "'heads' key 'x' is not a layer index"),
    ("load-args-list", _load("fixtures/args-list"), "'args' is \\[0.8\\], not a mapping"),
    ("load-model-none", lambda m, tmp: load_model(None), "model None: name a model"),
    ("load-model-empty", lambda m, tmp: load_model(""), "model '': name a model"),
    (
        "load-model-a-file",
        lambda m, tmp: load_model(str(tmp / "fixtures" / "a-file.txt")),
        "is a file, not a model",
    ),
    ("attention-maps-text", lambda m, tmp: attention_maps(m, "The capital"), "not a str: tokenize first"),
]


def _snapshot(model):
    engine = Engine.of(model, create=False)
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "impl": model.config._attn_implementation,
        "surgeries": [] if engine is None else [s.name for s in engine.surgeries],
        "hooks": [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()],
    }


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    model = tiny_model("llama")
    (root / "fixtures").mkdir()
    (root / "fixtures" / "a-file.txt").write_text("not a folder")
    handle = patch(model, "temperature", tau=0.8)
    save_surgery(handle, root / "saved")
    handle.remove()
    for name, text in (("not-json", "{not json"), ("no-surgeries", json.dumps({"attnsurgery_version": "0"}))):
        (root / "fixtures" / name).mkdir()
        (root / "fixtures" / name / "attnsurgery_config.json").write_text(text)
    for name, entry in (
        ("entry-no-name", {"args": {"tau": 0.8}}),
        ("entry-string", "temperature"),
        ("heads-list", {"surgery": "temperature", "args": {"tau": 0.8}, "heads": [0]}),
        ("heads-word", {"surgery": "temperature", "args": {"tau": 0.8}, "heads": {"x": [0]}}),
        ("args-list", {"surgery": "temperature", "args": [0.8]}),
    ):  # damaged saved configs: each was a bare KeyError / AttributeError / TypeError / ValueError
        (root / "fixtures" / name).mkdir()
        config = {"attnsurgery_version": "0", "surgeries": [entry]}
        (root / "fixtures" / name / "attnsurgery_config.json").write_text(json.dumps(config))
    handle = patch(model, "head_scale", scale=0.5, trainable=True)
    save_surgery(handle, root / "fixtures" / "truncated")
    handle.remove()
    state = root / "fixtures" / "truncated" / "attnsurgery_state.safetensors"
    state.write_bytes(state.read_bytes()[:40])
    other = tiny_model(
        "qwen2"
    )  # 3 layers too, but saved with per-layer heads that do not fit a 2-layer model
    handle = patch(other, "head_scale", scale=0.5, heads={2: [3]})
    save_surgery(handle, root / "fixtures" / "other-shape")
    handle.remove()
    config = root / "fixtures" / "other-shape" / "attnsurgery_config.json"
    data = json.loads(config.read_text())
    data["surgeries"][0]["heads"] = {"9": [3]}
    config.write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize("name, call, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refuses_clearly_and_changes_nothing(name, call, message, model, fixtures):
    before, files = _snapshot(model), _files(fixtures)
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    with pytest.raises(AttnSurgeryError, match=message):
        call(model, fixtures)
    after = _snapshot(model)
    assert after["surgeries"] == [] and after["impl"] == before["impl"] and after["hooks"] == before["hooks"]
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    assert _files(fixtures) == files  # nothing written, nothing overwritten


def test_at_least_100_cases():
    assert len(API_CASES) + len(CLI_CASES) >= 100


def test_saved_folders_are_one_format(tmp_path, model):
    """patch(model, folder) takes a save_surgery folder as load_surgery takes a training-run (recipe) folder."""
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), patch(model, "temperature", tau=0.7) as handle:
        expected = model(ids).logits
        save_surgery(handle, tmp_path / "saved")
    with torch.no_grad(), patch(model, str(tmp_path / "saved")):
        assert torch.equal(model(ids).logits, expected)
    with patch(model, "temperature", tau=0.5) as handle:
        save_surgery(handle, tmp_path / "saved", overwrite=True)  # replacing needs the word
    with torch.no_grad(), load_surgery(model, tmp_path / "saved"):
        assert not torch.equal(model(ids).logits, expected)


# -- the CLI ----------------------------------------------------------------------------------------------------------
M = "{model}"  # the tiny model folder
CLI_CASES = [
    # (id, argv, exit code, message)
    ("apply-tau-word", ["apply", "temperature", M, "--arg", "tau=abc"], 4, "tau='abc'"),
    ("apply-tau-empty", ["apply", "temperature", M, "--arg", "tau="], 4, "tau="),
    ("apply-tau-nan", ["apply", "temperature", M, "--arg", "tau=nan"], 4, "tau="),
    ("apply-gamma-positive", ["apply", "clipped_softmax", M, "--arg", "gamma=1e-2"], 4, "out of range"),
    ("apply-arg-no-equals", ["apply", "temperature", M, "--arg", "tau"], 2, "name=value"),
    ("apply-arg-bad-yaml", ["apply", "temperature", M, "--arg", "tau=[0.5"], 2, "YAML"),
    ("apply-unknown-arg", ["apply", "temperature", M, "--arg", "tua=0.8"], 4, "(?i)did you mean 'tau'"),
    ("apply-trainable-maybe", ["apply", "head_scale", M, "--arg", "trainable=maybe"], 4, "true or false"),
    ("apply-lora-r-fraction", ["apply", "lora", M, "--arg", "r=2.5"], 4, "whole number"),
    (
        "apply-layer-30",
        ["apply", "temperature", M, "--arg", "tau=0.8", "--layers", "30"],
        4,
        "layer 30 is out of range",
    ),
    (
        "apply-layer-minus-31",
        ["apply", "temperature", M, "--arg", "tau=0.8", "--layers=-31"],
        4,
        "out of range",
    ),
    (
        "apply-layer-step-zero",
        ["apply", "temperature", M, "--arg", "tau=0.8", "--layers", "0:3:0"],
        4,
        "step 0",
    ),
    (
        "apply-heads-unclosed",
        ["apply", "temperature", M, "--arg", "tau=0.8", "--heads", "[0, 1"],
        4,
        "brackets",
    ),
    (
        "apply-heads-out-of-range",
        ["apply", "temperature", M, "--arg", "tau=0.8", "--heads", "[9]"],
        4,
        "head 9",
    ),
    ("apply-max-new-tokens", ["apply", "temperature", M, "--max-new-tokens", "-1"], 2, "--max-new-tokens"),
    ("apply-unknown-surgery", ["apply", "tempreature", M], 3, "(?i)did you mean 'temperature'"),
    ("apply-upper-case", ["apply", "TEMPERATURE", M], 3, "(?i)did you mean 'temperature'"),
    ("apply-missing-recipe", ["apply", "--recipe", "temperature/sharpen", M], 5, "temperature"),
    ("apply-missing-model", ["apply", "temperature", "/no/such/model"], 7, "/no/such/model"),
    ("apply-encoder-decoder", ["apply", "temperature", "{tmp}/t5"], 6, "encoder-decoder language model"),
    (
        "apply-save-onto-saved",
        ["apply", "temperature", M, "--arg", "tau=0.8", "--save", "{tmp}/saved"],
        2,
        "overwrite",
    ),
    (
        "apply-save-onto-file",
        ["apply", "temperature", M, "--arg", "tau=0.8", "--save", "{tmp}/a-file.txt"],
        2,
        "is a file",
    ),
    ("eval-limit-zero", ["eval", M, "--tasks", "bb_emoji_movie", "--limit", "0"], 2, "--limit"),
    ("eval-limit-negative", ["eval", M, "--tasks", "bb_emoji_movie", "--limit", "-3"], 2, "--limit"),
    (
        "eval-batch-size-zero",
        ["eval", M, "--tasks", "bb_emoji_movie", "--batch-size", "0"],
        2,
        "--batch-size",
    ),
    (
        "eval-fewshot-negative",
        ["eval", M, "--tasks", "bb_emoji_movie", "--num-fewshot", "-1"],
        2,
        "--num-fewshot",
    ),
    ("train-steps-zero", ["train", M, "head_scale", "--steps", "0", "--out", "{tmp}/t"], 2, r"\[1, inf\)"),
    ("train-lr-negative", ["train", M, "head_scale", "--lr", "-0.01", "--out", "{tmp}/t"], 2, r"\(0, inf\)"),
    ("train-warmup", ["train", M, "head_scale", "--warmup", "1.5", "--out", "{tmp}/t"], 2, r"\[0, 1\)"),
    (
        "train-batch-zero",
        ["train", M, "head_scale", "--batch-size", "0", "--out", "{tmp}/t"],
        2,
        "--batch-size",
    ),
    ("train-seq-len", ["train", M, "head_scale", "--seq-len", "4", "--out", "{tmp}/t"], 2, "--seq-len"),
    ("train-lora-r-word", ["train", M, "--lora-r", "eight", "--out", "{tmp}/t"], 2, "whole number"),
    (
        "train-resume-overwrite",
        ["train", M, "head_scale", "--resume", "--overwrite", "--out", "{tmp}/t"],
        2,
        "not both",
    ),
    ("train-resume-nothing", ["train", M, "head_scale", "--resume", "--out", "{tmp}/t"], 2, "no checkpoint"),
    ("train-out-file", ["train", M, "head_scale", "--out", "{tmp}/a-file.txt"], 2, "is a file"),
    ("train-nothing-to-train", ["train", M, "--out", "{tmp}/t"], 2, "name a SURGERY"),
    (
        "train-objective",
        ["train", M, "head_scale", "--objective", "kld", "--out", "{tmp}/t"],
        2,
        "(?i)did you mean 'kd'",
    ),
    (
        "train-test-split",
        ["train", M, "head_scale", "--data", "gutenberg_ppl:test", "--out", "{tmp}/t"],
        2,
        "test",
    ),
    (
        "recipe-layers-out-of-range",
        ["apply", "--recipe", "{tmp}/far.yaml", M, "--prompt", "x"],
        5,
        "layer 9 is out",
    ),
    (
        "recipe-state-wrong-shape",
        ["apply", "--recipe", "{tmp}/shape/recipe.yaml", M, "--prompt", "x"],
        5,
        "shape|size",
    ),
    (
        "lm-eval-unknown-surgery",
        ["lm-eval", "run", "--model", "attnsurgery", "--model_args", "pretrained={model},surgery=tempreature"]
        + ["--tasks", "bb_emoji_movie", "--limit", "1"],
        3,
        "(?i)did you mean 'temperature'",
    ),
    (
        "calibrate-test-copy",
        ["calibrate", "act", M, "--data", "{tmp}/copy.jsonl", "--out", "{tmp}/a.yaml"],
        2,
        "test split",
    ),
    # issue 27's sweep (evals/bad_inputs.py): each was a traceback, the "unexpected error" catch-all, a silent
    # acceptance, an unclear message or a refusal only after the model had loaded and run
    (
        "apply-arg-twice",
        ["apply", "temperature", M, "--arg", "tau=0.8", "--arg", "tau=0.9"],
        2,
        r"more than once \(tau=0.8 and tau=0.9\)",
    ),
    ("apply-arg-no-name", ["apply", "temperature", M, "--arg", "=0.8"], 2, "no name before '='"),
    (
        "apply-arg-and-layers",
        ["apply", "temperature", M, "--arg", "layers=0", "--layers", "1"],
        2,
        "--layers only",
    ),
    (
        "apply-heads-empty",
        ["apply", "temperature", M, "--arg", "tau=0.8", "--heads", ""],
        4,
        "--heads is empty",
    ),
    (
        "apply-save-under-file",
        ["apply", "temperature", M, "--save", "{tmp}/a-file.txt/s"],
        2,
        "a-file.txt is a file",
    ),
    ("apply-save-empty", ["apply", "temperature", M, "--save", ""], 2, "an empty name"),
    (
        "apply-overwrite-alone",
        ["apply", "temperature", M, "--overwrite"],
        2,
        "without --save nothing is written",
    ),
    ("apply-prompt-empty", ["apply", "temperature", M, "--prompt", ""], 2, "--prompt '' is empty"),
    ("apply-recipe-empty", ["apply", "--recipe", "", M], 5, "recipe '': name a shipped recipe"),
    ("apply-recipe-and-surgery", ["apply", "--recipe", "temperature", "head_scale", M], 2, "not both"),
    (
        "apply-device-map",
        ["apply", "temperature", M, "--device-map", "gpu9"],
        2,
        "'gpu9' is neither a device map",
    ),
    ("recipe-binary", ["apply", "--recipe", "{tmp}/binary.yaml", M], 5, "not a text file"),
    ("recipe-key-twice", ["apply", "--recipe", "{tmp}/twice.yaml", M], 5, "key 'surgeries' twice"),
    ("recipe-state-folder", ["apply", "--recipe", "{tmp}/statedir.yaml", M], 5, "is a folder"),
    (
        "inspect-arg-alone",
        ["inspect", M, "--arg", "tau=0.8", "--out", "{tmp}/new.png"],
        2,
        "configure a surgery, but no surgery is named",
    ),
    (
        "inspect-surgery-and-recipe",
        ["inspect", M, "--surgery", "head_scale", "--recipe", "temperature", "--out", "{tmp}/new.png"],
        2,
        "give one of them",
    ),
    (
        "inspect-out-exists",
        ["inspect", M, "--out", "{tmp}/old.png"],
        2,
        "old.png already exists.*--overwrite",
    ),
    ("inspect-out-under-file", ["inspect", M, "--out", "{tmp}/a-file.txt/m.png"], 2, "a-file.txt is a file"),
    (
        "inspect-prompt-empty",
        ["inspect", M, "--prompt", " ", "--out", "{tmp}/new.png"],
        2,
        "--prompt ' ' is empty",
    ),
    (
        "eval-limit-1.5",
        ["eval", M, "--tasks", "bb_emoji_movie", "--limit", "1.5"],
        2,
        "neither a number of docs",
    ),
    (
        "eval-out-file",
        ["eval", M, "--tasks", "bb_emoji_movie", "--out", "{tmp}/a-file.txt"],
        2,
        "a-file.txt is a file",
    ),
    ("reproduce-binary", ["reproduce", "{tmp}/binary.yaml"], 2, "not a text file"),
    ("reproduce-folder", ["reproduce", "{tmp}/emptydir"], 2, "is a folder"),
    (
        "calibrate-heads-unclosed",
        ["calibrate", "act", M, "--data", "bb_general_knowledge", "--heads", "[0,"],
        4,
        "brackets",
    ),
    (
        "calibrate-limit-negative",
        ["calibrate", "act", M, "--data", "bb_general_knowledge", "--limit", "-5"],
        2,
        r"--limit -5 is out of range",
    ),
    (
        "calibrate-out-exists",
        ["calibrate", "act", M, "--data", "bb_general_knowledge", "--out", "{tmp}/a-file.txt"],
        2,
        "exists; pass --overwrite",
    ),
    (
        "calibrate-records-without-choices",
        ["calibrate", "act", M, "--data", "{tmp}/norecords.jsonl"],
        2,
        "norecords.jsonl: calibration record 0",
    ),
    (
        "calibrate-temperature-steps",
        ["calibrate", "temperature", M, "--data", "gutenberg_ppl", "--steps", "0"],
        2,
        r"--steps.*\[1, inf\)",
    ),
    ("calibrate-var-tau", ["calibrate", "var", M, "--tau", "-1"], 2, r"--tau.*\(0, inf\)"),
    (  # checked before any model loads: a model path that does not exist is never reached
        "calibrate-act-beta-before-load",
        ["calibrate", "act", "{tmp}/no-such-model", "--data", "bb_general_knowledge", "--beta", "2"],
        4,
        r"beta.*2",
    ),
    (
        "train-surgery-and-recipe",
        ["train", M, "head_scale", "--recipe", "temperature", "--out", "{tmp}/t"],
        2,
        "both name what to train",
    ),
    (
        "train-lora-targets-alone",
        ["train", M, "head_scale", "--lora-targets", "q_proj", "--out", "{tmp}/t"],
        2,
        "--lora-r is 0",
    ),
    ("train-out-empty", ["train", M, "head_scale", "--out", ""], 2, "--out is empty"),
    (
        "train-data-empty-file",
        ["train", M, "head_scale", "--data", "{tmp}/empty.txt", "--seq-len", "16", "--out", "{tmp}/t"],
        2,
        "empty.txt: the file is empty",
    ),
    (
        "linearize-linear-only-window",
        ["linearize", M, "--out", "{tmp}/l", "--linear-only", "--window", "32"],
        2,
        "give one of them",
    ),
    ("linearize-out-under-file", ["linearize", M, "--out", "{tmp}/a-file.txt/l"], 2, "a-file.txt is a file"),
    (
        "lm-eval-no-pretrained",
        ["lm-eval", "run", "--model", "attnsurgery", "--model_args", "surgery=temperature"]
        + ["--tasks", "bb_emoji_movie", "--limit", "1"],
        2,
        "pretrained=MODEL",
    ),
    (
        "lm-eval-surgery-argument",
        [
            "lm-eval",
            "run",
            "--model",
            "attnsurgery",
            "--model_args",
            "pretrained={model},surgery=temperature,tau=0.8",
        ]
        + ["--tasks", "bb_emoji_movie", "--limit", "1"],
        2,
        "surgery_args=tau:0.8",
    ),
]


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory):
    from attnsurgery.tasks import include_path

    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    (root / "a-file.txt").write_text("not a folder")
    _t5().save_pretrained(root / "t5")
    tiny_tokenizer().save_pretrained(root / "t5")
    handle = patch(tiny_model("llama"), "temperature", tau=0.8)
    save_surgery(handle, root / "saved")
    (root / "far.yaml").write_text(yaml.safe_dump({"surgeries": [{"surgery": "temperature", "layers": [9]}]}))
    (root / "shape").mkdir()
    from safetensors.torch import save_file

    save_file({"scale": torch.ones(7, 7)}, str(root / "shape" / "s.safetensors"))
    (root / "shape" / "recipe.yaml").write_text(
        yaml.safe_dump(
            {"surgeries": [{"surgery": "head_scale", "args": {"trainable": True}, "state": "s.safetensors"}]}
        )
    )
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81binary")
    (root / "twice.yaml").write_text("surgeries: [temperature]\nsurgeries: [head_scale]\n")
    (root / "statedir").mkdir()
    (root / "statedir.yaml").write_text(
        "surgeries:\n  - surgery: head_scale\n    args: {trainable: true}\n    state: statedir\n"
    )
    (root / "old.png").write_bytes(b"an earlier plot")
    (root / "emptydir").mkdir()
    (root / "empty.txt").write_text("")
    (root / "norecords.jsonl").write_text('{"foo": 1}\n')
    test = Path(include_path()) / "data" / "bb_general_knowledge.test.jsonl"
    (root / "copy.jsonl").write_text(test.read_text())  # a test split under another name
    return root


@pytest.mark.parametrize("name, argv, code, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_with_its_exit_code_and_no_traceback(
    name, argv, code, message, cli_root, capsys, monkeypatch
):
    import re

    from attnsurgery.cli import main

    monkeypatch.setenv("ATTNSURGERY_CACHE", str(cli_root / "cache"))
    monkeypatch.delenv("ATTNSURGERY_DEBUG", raising=False)
    argv = [a.replace("{model}", str(cli_root / "model")).replace("{tmp}", str(cli_root)) for a in argv]
    files = _files(cli_root)
    if (
        argv[0] == "lm-eval"
    ):  # lm-eval's handlers keep the stderr of the first test that ran it (closed by now)
        import logging
        import sys

        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for handler in getattr(logger, "handlers", []):
                if type(handler) is logging.StreamHandler and getattr(handler.stream, "closed", False):
                    handler.stream = sys.stderr
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse: usage error
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    assert re.search(message, " ".join(err.split())), err
    after = {k: v for k, v in _files(cli_root).items() if not k.startswith("cache")}
    assert after == {
        k: v for k, v in files.items() if not k.startswith("cache")
    }  # no file written or replaced
