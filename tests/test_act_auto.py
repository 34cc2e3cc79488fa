"""`--recipe act MODEL` for a model without a recipe: calibrate one on demand, cache it per model, reuse it; the
reference code's head sets and the uncalibrated act/all-heads as recipes."""

from __future__ import annotations

import json
from dataclasses import replace

import attnsurgery.patches.act.calibrate as act_calibrate
import pytest
from attnsurgery.patches.act.auto import AutoSettings
from tiny import tiny_model, tiny_tokenizer

from attnsurgery.cli import main
from attnsurgery.recipe import cached_recipe_path, find_recipe, model_slug


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture
def small_sweep(monkeypatch, tmp_path):
    """Cache under tmp_path; the sweep shrunk to 6 records, and loosened so the random tiny model keeps heads
    (its attention has few keys above the reference threshold 0.1 on these long character-level inputs)."""
    monkeypatch.setenv("ATTNSURGERY_CACHE", str(tmp_path / "cache"))
    settings = replace(AutoSettings(), limit=6, threshold=0.01, confidence=0.5)
    monkeypatch.setattr(AutoSettings, "from_env", classmethod(lambda cls: settings))
    return tmp_path / "cache"


def _err(capsys) -> tuple[str, str]:
    cap = capsys.readouterr()
    return cap.out, " ".join(cap.err.split())  # rich wraps long lines


def test_apply_calibrates_caches_and_reuses(tiny_dir, small_sweep, capsys):
    argv = ["apply", "--recipe", "act", str(tiny_dir), "--prompt", "Hello", "--max-new-tokens", "2"]
    assert main(argv) == 0
    out, err = _err(capsys)
    assert "no ACT recipe is made for" in err and "calibrating one" in err
    assert "estimated time: about" in err and "batch forwards" in err
    path = cached_recipe_path("act", str(tiny_dir))
    assert path.is_file() and path.parent == small_sweep / "recipes" / "act"
    assert f"cached the act recipe calibrated for {tiny_dir}" in err
    recipe = find_recipe("act", model=str(tiny_dir))
    assert recipe.path == path and recipe.model == str(tiny_dir) and recipe.name == f"act/{path.stem}"
    assert recipe.calibration["n"] == 6 and recipe.calibration["kept"] > 0
    heads = recipe.surgeries[0].heads
    assert heads and all(0 <= h < 4 for hs in heads.values() for h in hs)
    assert "patched:" in out and "baseline" in out
    mtime = path.stat().st_mtime_ns
    state = path.with_name(path.stem + ".state.jsonl")
    state_size = state.stat().st_size

    assert main(argv) == 0  # second run: no sweep, the cached recipe is reused and said so
    out, err = _err(capsys)
    assert "calibrating" not in err and "estimated time" not in err
    assert f"using the act/{path.stem} recipe calibrated for {tiny_dir} earlier" in err
    assert path.stat().st_mtime_ns == mtime and state.stat().st_size == state_size
    assert "patched:" in out


def test_interrupt_keeps_state_and_resumes(tiny_dir, small_sweep, capsys, monkeypatch):
    real = act_calibrate.sweep_fast

    def interrupted(model, scorer, todo, act_args, head_batch, baseline, bar, done):
        finished = []

        def then_stop(layer, head, values, seconds):
            done(layer, head, values, seconds)
            finished.append((layer, head))
            if len(finished) == 4:  # one layer done: Ctrl-C
                raise KeyboardInterrupt

        real(model, scorer, todo, act_args, head_batch, baseline, bar, then_stop)

    monkeypatch.setattr(act_calibrate, "sweep_fast", interrupted)
    argv = ["apply", "--recipe", "act", str(tiny_dir), "--prompt", "Hi", "--max-new-tokens", "1"]
    assert main(argv) == 130
    _, err = _err(capsys)
    path = cached_recipe_path("act", str(tiny_dir))
    state = path.with_name(path.stem + ".state.jsonl")
    assert not path.exists() and "run the same command to resume" in err
    kinds = [json.loads(line)["type"] for line in state.read_text().splitlines()]
    assert kinds == ["header", "baseline", "head", "head", "head", "head"]

    monkeypatch.setattr(act_calibrate, "sweep_fast", real)
    assert main(argv) == 0
    _, err = _err(capsys)
    assert "resuming from" in err and "4 of 12 heads already swept" in err
    assert path.is_file() and find_recipe("act", model=str(tiny_dir)).path == path


def test_no_calibrate_refuses(tiny_dir, small_sweep, capsys):
    assert main(["apply", "--recipe", "act", str(tiny_dir), "--no-calibrate"]) == 5
    _, err = _err(capsys)
    assert "has several recipes and none is made for" in err
    assert "Without --no-calibrate" in err and "act/all-heads" in err
    assert not small_sweep.exists()


def test_unreachable_hub_model_fails_before_calibrating(small_sweep, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["apply", "--recipe", "act", "nonexistent-org/nonexistent-model"]) == 7
    _, err = _err(capsys)
    assert "nonexistent-org/nonexistent-model" in err and "calibrat" not in err
    assert not small_sweep.exists()


def test_model_slug_and_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNSURGERY_CACHE", str(tmp_path))
    assert model_slug("llama-7b") == model_slug("huggyllama/llama-7b") == "huggyllama--llama-7b"
    assert cached_recipe_path("act", "llama-7b") == tmp_path / "recipes" / "act" / "huggyllama--llama-7b.yaml"
    (tmp_path / "a" / "m").mkdir(parents=True)
    (tmp_path / "b" / "m").mkdir(parents=True)  # same folder name, another model: another slug
    slugs = {model_slug(str(tmp_path / d / "m")) for d in "ab"}
    assert len(slugs) == 2 and all(s.startswith("m-") for s in slugs)
    monkeypatch.delenv("ATTNSURGERY_CACHE")
    assert str(cached_recipe_path("act", "llama-7b")).endswith(
        ".cache/attnsurgery/recipes/act/huggyllama--llama-7b.yaml"
    )


# the reference code's head sets (GATECH-EIC/ACT models/augment_index.py, mt-bench/augment_index.py):
# (recipe, layers, (layer, head) pairs, threshold); counts as in /work/shared's method notes
REFERENCE_SETS = [
    ("act/llama2-7b-chat", "2:31", 184, 0.1),
    ("act/llama2-7b-chat-mc", "2:32", 74, 0.1),
    ("act/mistral-7b-instruct", "2:32", 16, 0.1),
    ("act/mistral-7b-instruct-mc", "2:32", 104, 0.1),
    ("act/mt-bench", "2:32", 25, 0.15),
]


@pytest.mark.parametrize("name, layers, pairs, threshold", REFERENCE_SETS)
def test_reference_head_sets(name, layers, pairs, threshold):
    recipe = find_recipe(name)
    (spec,) = recipe.surgeries
    assert spec.layers == layers and spec.args == {"beta": 0.4, "threshold": threshold}
    assert sum(len(v) for v in spec.heads.values()) == pairs
    assert all(0 <= h < 32 for hs in spec.heads.values() for h in hs)
    assert "augment_index.py" in recipe.notes


def test_model_specific_lookup_and_all_heads():
    assert find_recipe("act", model="llama2-7b-chat").name == "act/llama2-7b-chat"  # not the -mc variant
    mistral = find_recipe("act", model="mistralai/Mistral-7B-Instruct-v0.2")
    assert mistral.name == "act/mistral-7b-instruct"  # the shortest-named recipe made for it
    recipe = find_recipe("act/all-heads")
    (spec,) = recipe.surgeries
    assert recipe.model is None and spec.layers == "2:" and spec.heads is None
    assert "-0.15 to +0.12" in recipe.description


def test_eval_goes_through_the_same_resolver(tiny_dir, small_sweep, capsys, tmp_path, monkeypatch):
    assert (
        main(
            [
                "eval",
                str(tiny_dir),
                "--recipe",
                "act",
                "--tasks",
                "bb_general_knowledge",
                "--no-calibrate",
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 5
    )
    assert "Without --no-calibrate" in _err(capsys)[1]
    assert not small_sweep.exists()
    import attnsurgery.models

    loads = []
    real_load = attnsurgery.models.load_model
    monkeypatch.setattr(
        attnsurgery.models, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k)
    )
    code = main(
        [
            "eval",
            str(tiny_dir),
            "--recipe",
            "act",
            "--tasks",
            "bb_general_knowledge",
            "--limit",
            "2",
            "--out",
            str(tmp_path / "e"),
        ]
    )
    assert code in (0, 1)  # 1: an arm flagged INVALID (a random tiny model may tie its choices); it ran
    assert cached_recipe_path("act", str(tiny_dir)).is_file()
    assert len(loads) == 1  # the model the calibration loaded is the one the arms ran on
