"""Budget curves (attnsurgery.eval.budget): each point is the state a run reaches at that many tokens, continued
across budgets exactly as one run trained that long; later stages start from the earlier stage's state at the same
budget; points land as they finish and a rerun trains nothing twice; bad tables fail before any model loads."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import tiny_model, tiny_tokenizer

from attnsurgery.eval.budget import BudgetError, load_budget_table, run_budget_table

SEQ = 32
GATES = [{"surgery": "gated_attention", "args": {"form": "headwise", "init_std": 0.3}}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Plain text with enough windows for a few steps (the offline tasks are word-level; the tiny tokenizer is not)."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    words = "the cat sat on a mat while a dog ran past the old red barn and the sun set".split()
    g = torch.Generator().manual_seed(0)
    docs = [
        " ".join(words[i] for i in torch.randint(len(words), (60,), generator=g).tolist()) for _ in range(40)
    ]
    path.write_text("\n\n".join(docs))
    return path


def write_table(path, model_dir, corpus, budgets, arms=None):
    arms = arms or [
        {
            "name": "gates",
            "model": str(model_dir),
            "goal_pct": 5,
            "seq_len": SEQ,
            "eval": {"seq_len": SEQ, "windows": 2},
            "stages": [{"surgeries": GATES, "train": {"objective": "kd", "batch_size": 2, "lr": 0.05}}],
        },
        {
            "name": "gates-then-lora",
            "model": str(model_dir),
            "goal_pct": 2,
            "seq_len": SEQ,
            "eval": {"seq_len": SEQ, "windows": 2},
            "stages": [
                {
                    "name": "gates",
                    "surgeries": GATES,
                    "train": {"objective": "kd", "batch_size": 2, "lr": 0.05},
                    "share": 0.5,
                },
                {
                    "name": "lora",
                    "train": {"objective": "kd", "batch_size": 2, "lora": {"r": 2}},
                    "share": 0.5,
                },
            ],
        },
    ]
    path.write_text(
        yaml.safe_dump(
            {
                "name": "b",
                "kind": "budget",
                "data": str(corpus),
                "test_data": "gutenberg_ppl",
                "budgets": budgets,
                "arms": arms,
            }
        )
    )
    return path


def test_points_continue_one_run_and_stages_start_from_the_earlier_stage(tmp_path, model_dir, corpus):
    tokens = 2 * SEQ  # one step of 2 windows
    table = write_table(tmp_path / "b.yaml", model_dir, corpus, [2 * tokens, 4 * tokens])
    out = run_budget_table(table, tmp_path / "out")
    curve = json.loads((out / "curve.json").read_text())
    gates = curve["arms"]["gates"]
    assert gates["model"] == str(model_dir) and gates["goal_pct"] == 5
    assert [p["tokens"] for p in gates["points"]] == [2 * tokens, 4 * tokens]
    assert [p["steps"] for p in gates["points"]] == [[2], [4]]
    base = {p["baseline_ppl"] for p in gates["points"]}
    assert len(base) == 1  # one baseline, the unpatched model on the same windows
    assert all(p["ppl"] != p["baseline_ppl"] for p in gates["points"])
    assert all(
        p["rel_pct"] == pytest.approx(100 * (p["ppl"] / p["baseline_ppl"] - 1)) for p in gates["points"]
    )
    assert (out / "curve.png").is_file() and "| gates |" in (out / "curve.md").read_text()

    # the 4-step point continued the 2-step run: it equals one run trained 4 steps at once
    once = write_table(tmp_path / "once.yaml", model_dir, corpus, [4 * tokens])
    alone = json.loads((run_budget_table(once, tmp_path / "once", arms=["gates"]) / "curve.json").read_text())
    assert alone["arms"]["gates"]["points"][0]["ppl"] == pytest.approx(gates["points"][1]["ppl"], rel=1e-6)

    # the second stage starts from the first stage's state at the same budget, kept frozen
    staged = curve["arms"]["gates-then-lora"]["points"]
    assert [p["steps"] for p in staged] == [[1, 1], [2, 2]]
    runs = out / "runs" / "gates-then-lora"
    for budget in (2 * tokens, 4 * tokens):
        first = load_file(str(runs / f"gates@{budget}" / "state-0-gated_attention.safetensors"))
        second = load_file(str(runs / f"lora@{budget}" / "state-0-gated_attention.safetensors"))
        assert all(torch.equal(first[k], second[k]) for k in first)
        recipe = yaml.safe_load((runs / f"lora@{budget}" / "recipe.yaml").read_text())
        assert [s["surgery"] for s in recipe["surgeries"]] == ["gated_attention", "lora"]
    assert not (
        runs / f"lora@{2 * tokens}" / "checkpoint.pt"
    ).exists()  # snapshots hold states, not optimisers

    # a rerun trains nothing twice; a larger budget continues the runs
    stamp = (out / "curve.json").stat().st_mtime_ns
    run_budget_table(table, tmp_path / "out")
    assert (out / "curve.json").stat().st_mtime_ns == stamp
    write_table(table, model_dir, corpus, [2 * tokens, 4 * tokens, 6 * tokens])
    grown = json.loads((run_budget_table(table, tmp_path / "out", arms=["gates"]) / "curve.json").read_text())
    assert [p["tokens"] for p in grown["arms"]["gates"]["points"]] == [2 * tokens, 4 * tokens, 6 * tokens]
    assert grown["arms"]["gates"]["points"][:2] == gates["points"]


def test_up_to_stops_early(tmp_path, model_dir, corpus):
    tokens = 2 * SEQ
    table = write_table(tmp_path / "b.yaml", model_dir, corpus, [tokens, 4 * tokens])
    out = run_budget_table(table, tmp_path / "out", arms=["gates"], up_to=2 * tokens)
    curve = json.loads((out / "curve.json").read_text())
    assert [p["tokens"] for p in curve["arms"]["gates"]["points"]] == [tokens]


def test_an_arm_trains_on_its_own_data_and_the_curve_says_which(tmp_path, model_dir, corpus):
    """An arm's 'data' replaces the table's training text for that arm alone; curve.json records each arm's text."""
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(["a dog ran past the barn " * 12] * 30))
    tokens = 2 * SEQ
    arms = [
        {"name": n, "model": str(model_dir), "goal_pct": 5, "seq_len": SEQ, "eval": {"seq_len": SEQ, "windows": 2},
         "stages": [{"surgeries": GATES, "train": {"objective": "kd", "batch_size": 2, "lr": 0.05}}], **extra}
        for n, extra in (("table-text", {}), ("own-text", {"data": str(other)}))
    ]
    table = write_table(tmp_path / "b.yaml", model_dir, corpus, [tokens], arms=arms)
    out = run_budget_table(table, tmp_path / "out")
    curve = json.loads((out / "curve.json").read_text())
    assert curve["arms"]["table-text"]["data"] == str(corpus)
    assert curve["arms"]["own-text"]["data"] == str(other)
    assert "Regenerate: `attnsurgery reproduce /" in (out / "curve.md").read_text()  # this table's own path
    sources = {  # what each run trained on, as its recipe records it
        n: yaml.safe_load((out / curve["arms"][n]["points"][0]["state"] / "recipe.yaml").read_text())["training"][
            "data"
        ]["source"]
        for n in ("table-text", "own-text")
    }
    assert sources == {"table-text": str(corpus), "own-text": str(other)}
    # the same steps on other text give another state
    a, b = (load_file(next((out / curve["arms"][n]["points"][0]["state"]).glob("state-*.safetensors")))
            for n in ("table-text", "own-text"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    arms[1]["data"] = ""
    with pytest.raises(BudgetError, match="'data' is the arm's training text"):
        load_budget_table(write_table(tmp_path / "bad.yaml", model_dir, corpus, [tokens], arms=arms))


def test_a_stage_under_bf16_autocast_says_so_on_its_point(tmp_path, model_dir, corpus):
    tokens = 2 * SEQ
    arms = [
        {
            "name": "bf16",
            "model": str(model_dir),
            "goal_pct": 5,
            "seq_len": SEQ,
            "eval": {"seq_len": SEQ, "windows": 2},
            "stages": [
                {
                    "surgeries": GATES,
                    "train": {"objective": "kd", "batch_size": 2, "lr": 0.05, "mixed_precision": "bf16"},
                }
            ],
        }
    ]
    table = write_table(tmp_path / "b.yaml", model_dir, corpus, [tokens], arms=arms)
    point = json.loads((run_budget_table(table, tmp_path / "out") / "curve.json").read_text())["arms"][
        "bf16"
    ]["points"][0]
    assert point["mixed_precision"] == {"stage1": "bf16"}
    assert point["ppl"] != point["baseline_ppl"]  # it trained
    # fp32 training (the default) leaves no such field
    plain = write_table(tmp_path / "p.yaml", model_dir, corpus, [tokens])
    curve = json.loads((run_budget_table(plain, tmp_path / "p", arms=["gates"]) / "curve.json").read_text())
    assert "mixed_precision" not in curve["arms"]["gates"]["points"][0]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"budgets": [100, 50]}, "increasing"),
        ({"budgets": []}, "non-empty list"),
        ({"budgets": [0]}, "whole number >= 1"),
        ({"bugdets": [1]}, "Did you mean 'budgets'"),
        (
            {
                "arms": [
                    {
                        "name": "a",
                        "model": "m",
                        "goal_pct": 5,
                        "stages": [{"surgeries": GATES, "train": {"warmup": 0.1}}],
                    }
                ]
            },
            "constant learning rate",
        ),
        (
            {
                "arms": [
                    {
                        "name": "a",
                        "model": "m",
                        "goal_pct": 5,
                        "stages": [{"surgeries": GATES, "train": {"steps": 3}}],
                    }
                ]
            },
            "unknown key 'steps'",
        ),
        (
            {"arms": [{"name": "a", "model": "m", "goal_pct": "low", "stages": [{"surgeries": GATES}]}]},
            "goal_pct",
        ),
        (
            {
                "arms": [
                    {
                        "name": "a",
                        "model": "m",
                        "goal_pct": 5,
                        "stages": [
                            {"surgeries": GATES, "share": 0.5},
                            {"train": {"lora": {"r": 2}}, "share": 0.2},
                        ],
                    }
                ]
            },
            "add up to 1",
        ),
        (
            {
                "arms": [
                    {
                        "name": "a",
                        "model": "m",
                        "goal_pct": 5,
                        "stages": [{"surgeries": [{"surgery": "gatd"}]}],
                    }
                ]
            },
            "gated_attention",
        ),
    ],
)
def test_bad_tables_fail_before_a_model_loads(tmp_path, change, message):
    data = {
        "name": "b",
        "kind": "budget",
        "budgets": [100],
        "arms": [{"name": "a", "model": "no-such-model", "goal_pct": 5, "stages": [{"surgeries": GATES}]}],
    }
    data.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(BudgetError, match=message):
        load_budget_table(path)


def test_shipped_budget_table_loads():
    """evals/budget.yaml names the issue's arms, each with a goal, and budgets spaced x4 up to >= 1.6M tokens."""
    from pathlib import Path

    table = load_budget_table(Path(__file__).parent.parent / "evals" / "budget.yaml")
    assert {
        "moh-learned-75",
        "moh-learned-75+lora",
        "hedgehog-linear",
        "hedgehog-hybrid-w64",
        "gates-gemma-soft",
    } <= {a.name for a in table.arms}
    assert len(table.budgets) >= 5 and table.budgets[-1] >= 1_600_000
    gemma = next(a for a in table.arms if a.name == "gates-gemma-soft")
    assert gemma.w8a8_calib_windows  # its goal is half W8A8 gap: the curve scores it
    assert all(b / a == pytest.approx(4, rel=0.01) for a, b in zip(table.budgets, table.budgets[1:]))


def test_mixed_training_sources_interleave_and_still_refuse_test_splits(tmp_path):
    """'a+b' joins sources document by document, each spread evenly, so the held-back validation tail draws from all
    of them; a test split inside a mixture is refused as it is alone."""
    from attnsurgery.train.data import DataError, load_texts

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps({"text": f"a{i}"}) for i in range(4)) + "\n")
    b.write_text("\n".join(json.dumps({"text": f"b{i}"}) for i in range(8)) + "\n")
    texts = load_texts(f"{a}+{b}")
    assert sorted(texts) == sorted([f"a{i}" for i in range(4)] + [f"b{i}" for i in range(8)])
    assert {t[0] for t in texts[-3:]} == {"a", "b"}  # the tail holds both sources
    assert [t for t in texts if t[0] == "a"] == [f"a{i}" for i in range(4)]  # each source keeps its order
    with pytest.raises(DataError, match="test"):
        load_texts(f"{a}+gutenberg_ppl:test")
    with pytest.raises(DataError, match="corpora: pydocs"):
        load_texts(f"{a}+pydcos")


def test_gpu_train_script_runs_on_cpu_with_a_tiny_budget(tmp_path, model_dir, corpus):
    """evals/gpu_train.sh, the one prepared script for a session with the device: on CPU with a tiny table it trains
    every arm of the table within its time and writes the points (tagged with the device)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    table = write_table(tmp_path / "b.yaml", model_dir, corpus, [2 * SEQ * 2])
    script = Path(__file__).parent.parent / "evals" / "gpu_train.sh"
    env = {
        **os.environ,
        "GPU_TRAIN_TABLE": str(table),
        "GPU_TRAIN_OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
    }
    done = subprocess.run(["bash", str(script), "120"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    curve = json.loads((tmp_path / "out" / "curve.json").read_text())
    assert set(curve["arms"]) == {"gates", "gates-then-lora"}
    assert all(p["device"] == "cpu" for a in curve["arms"].values() for p in a["points"])
    assert "gates cpu" in done.stdout


def test_a_fresh_clone_continues_from_the_committed_snapshot(tmp_path, model_dir, corpus):
    """Checkpoints (optimiser state) are not committed; snapshot states are. With only the latest snapshot's state
    files left, a larger budget continues that run (its step count, history and data order), says so in the point,
    and refuses a snapshot of another run."""
    tokens = 2 * SEQ
    table = write_table(tmp_path / "b.yaml", model_dir, corpus, [2 * tokens, 4 * tokens])
    out = run_budget_table(table, tmp_path / "out", arms=["gates"])
    runs = out / "runs" / "gates"
    before = json.loads((runs / "stage1" / "training.json").read_text())["train_loss"]
    for path in list(runs.rglob("checkpoint.pt")) + list((runs / "stage1").glob("*.safetensors")):
        path.unlink()  # what a fresh clone lacks
    for path in (runs / f"stage1@{2 * tokens}").glob("*.safetensors"):
        path.unlink()  # only the latest snapshot's states are committed
    write_table(table, model_dir, corpus, [2 * tokens, 4 * tokens, 6 * tokens])
    curve = json.loads((run_budget_table(table, tmp_path / "out", arms=["gates"]) / "curve.json").read_text())
    point = curve["arms"]["gates"]["points"][-1]
    assert point["tokens"] == 6 * tokens and point["warm_start"] == f"runs/gates/stage1@{4 * tokens}"
    history = json.loads((runs / "stage1" / "training.json").read_text())
    after = history["train_loss"]
    assert len(after) == 6 and after[:4] == before  # one history, continued
    assert len(history["step_seconds"]) == 6  # step times too: the rate of the whole run, not this process's
    # the point's training time is the run's over both processes, not the seconds of the process that finished it
    recipe = yaml.safe_load((runs / f"stage1@{6 * tokens}" / "recipe.yaml").read_text())["training"]
    assert point["train_seconds"] == [recipe["seconds"]]
    assert point["step_seconds"] == [recipe["median_step_seconds"]]
    assert recipe["seconds"] > sum(history["step_seconds"])  # every step, the first process's too
    assert "warm_start" not in curve["arms"]["gates"]["points"][0]


def test_warm_start_refuses_another_run(tmp_path, model_dir, corpus):
    from attnsurgery import load_model, patch
    from attnsurgery.train import TrainConfig, TrainingError, prepare_data, train

    model, tok = load_model(str(model_dir))
    data = prepare_data(tok, str(corpus), SEQ)
    handle = patch(model, "gated_attention", form="headwise", init_std=0.3)
    train(
        model, handle, data, TrainConfig(steps=1, batch_size=2, seq_len=SEQ, lr=0.05), out_dir=tmp_path / "a"
    )
    with pytest.raises(TrainingError, match="another run: lr"):
        train(
            model,
            handle,
            data,
            TrainConfig(steps=2, batch_size=2, seq_len=SEQ, lr=0.5),
            out_dir=tmp_path / "b",
            warm_start=tmp_path / "a",
        )
    handle.remove()


def test_ship_writes_the_longest_trained_state_as_a_recipe_that_reproduces_its_point(
    tmp_path, model_dir, corpus, monkeypatch
):
    """`--ship`: each arm's longest-trained point becomes `<recipes>/<arm.recipe>.yaml` plus its state folder; patching that
    recipe scores exactly the point's perplexity; refusals write nothing."""
    import attnsurgery.eval.budget as budget
    from attnsurgery import find_recipe, patch
    from attnsurgery.eval.quant import perplexity
    from attnsurgery.eval.training_table import _test_windows
    from attnsurgery.models import load_model

    tokens = 2 * SEQ
    table = write_table(tmp_path / "b.yaml", model_dir, corpus, [tokens, 2 * tokens])
    data = yaml.safe_load(table.read_text())
    data["arms"][0]["recipe"] = "gated_attention/tiny-gates"
    data["arms"][1]["recipe"] = "gated_attention/tiny-gates-lora"
    table.write_text(yaml.safe_dump(data))
    recipes = tmp_path / "recipes"
    with pytest.raises(BudgetError, match="no point"):  # nothing trained yet
        budget.ship_states(table, tmp_path / "out", ["gates"], recipes)
    out = run_budget_table(table, tmp_path / "out")
    curve = json.loads((out / "curve.json").read_text())

    monkeypatch.setattr(budget, "SHIP_LIMIT_BYTES", 10)
    with pytest.raises(BudgetError, match="over the"):
        budget.ship_states(table, out, None, recipes)
    assert not recipes.exists()  # all or nothing
    monkeypatch.undo()

    written = budget.ship_states(table, out, None, recipes)
    assert [p.name for p in written] == ["tiny-gates.yaml", "tiny-gates-lora.yaml"]
    model, tokenizer = load_model(str(model_dir))
    test = _test_windows(tokenizer, "gutenberg_ppl", SEQ, 2)
    for arm, name in (("gates", "tiny-gates"), ("gates-then-lora", "tiny-gates-lora")):
        shipped = budget.shipped_point(curve, arm)
        assert shipped["tokens"] == max(p["tokens"] for p in curve["arms"][arm]["points"])
        recipe = find_recipe(recipes / "gated_attention" / f"{name}.yaml")
        assert recipe.training["point"]["ppl"] == shipped["ppl"] and recipe.model == str(model_dir)
        assert all(s.state.parent == recipes / "gated_attention" / name for s in recipe.surgeries)
        with patch(model, recipe), torch.no_grad():
            assert perplexity(model, test) == pytest.approx(shipped["ppl"], rel=1e-6)
    with torch.no_grad():
        assert perplexity(model, test) == pytest.approx(
            shipped["baseline_ppl"], rel=1e-6
        )  # removed: unpatched

    before = (recipes / "gated_attention" / "tiny-gates.yaml").read_text()
    with pytest.raises(BudgetError, match="--overwrite"):
        budget.ship_states(table, out, ["gates"], recipes)
    assert budget.ship_states(table, out, ["gates"], recipes, overwrite=True)
    assert (recipes / "gated_attention" / "tiny-gates.yaml").read_text() == before

    # a shipped point whose states were not kept (a fresh clone holds only the newest snapshot's)
    shipped = budget.shipped_point(curve, "gates")
    for f in (out / shipped["state"]).glob("*.safetensors"):
        f.unlink()
    with pytest.raises(BudgetError, match="missing"):
        budget.ship_states(table, out, ["gates"], recipes, overwrite=True)


def test_extrapolation_recovers_a_power_law_and_says_when_it_cannot():
    from attnsurgery.eval.budget import extrapolate

    def point(tokens, rel):  # one-stage arm: 1,024 tokens a step, 10 s per 1,024 trained tokens
        return {"tokens": tokens, "rel_pct": rel, "steps": [tokens // 1024], "seconds": 0.0}

    budgets = [25_600, 102_400, 409_600]
    points = [point(t, 100 * (t / 10_000) ** -0.5) for t in budgets]
    for p in points:  # stage 1 continues: its training time at a budget covers every step up to it
        p["train_seconds"] = [p["tokens"] / 1024 * 10]
        p["seconds"] = 1.0  # the process that finished the point resumed near its end: no rate
    ex = extrapolate([point(6_400, 500.0), *points], goal_pct=5)  # the 6.4k warm-up point is left out
    assert ex["fit_points"] == budgets
    assert ex["per_x4"] == pytest.approx(0.5)
    assert ex["tokens_to_goal"] == pytest.approx(10_000 * 20**2, rel=1e-6)
    assert ex["tokens_per_second"] == pytest.approx(102.4) and ex["rate_from"] == "wall time"
    assert ex["hours_to_goal"] == pytest.approx(4e6 / ex["tokens_per_second"] / 3600)
    assert extrapolate(points, goal_pct=200)["tokens_to_goal"] == 0  # met already
    flat = [point(t, 50.0 + t / 1e6) for t in budgets]
    assert extrapolate(flat, goal_pct=5)["tokens_to_goal"] is None  # not falling: no promise
    assert extrapolate(points[:1], goal_pct=5) is None  # one point is no trend


def test_training_rate_comes_from_the_runs_not_the_process_that_finished_a_point():
    """A point resumed near its end has a few seconds of its own; the rate comes from its runs' step times (median:
    a pause does not move it), else from their wall time over every session, else it is unknown."""
    from attnsurgery.eval.budget_report import training_rate

    # two stages of 100 steps of 1,024 tokens; the process that finished the point ran 25 steps of it
    point = {"tokens": 204_800, "steps": [100, 100], "seconds": 60.0}
    assert training_rate(point) == (None, None)
    wall = {**point, "train_seconds": [1_000.0, 3_000.0]}
    assert training_rate(wall) == (pytest.approx(204_800 / 4_000), "wall time")
    median = {**wall, "step_seconds": [2.0, 6.0]}
    assert training_rate(median) == (pytest.approx(204_800 / 800), "median step")
    partial = {**wall, "step_seconds": [2.0, None]}  # a run from before step times were kept
    assert training_rate(partial)[1] == "wall time"


def _stop_at(monkeypatch, calls):
    """Ctrl-C at the start of the ``calls``-th training step of this process (counted over every stage)."""
    import attnsurgery.train.trainer as trainer

    real, seen = trainer._lr_factor, []

    def lr_factor(step, config):
        seen.append(step)
        if len(seen) == calls:
            raise KeyboardInterrupt
        return real(step, config)

    monkeypatch.setattr(trainer, "_lr_factor", lr_factor)


@pytest.mark.parametrize("arm, run, stopped_at", [("gates", "stage1", 2), ("gates-then-lora", "lora", 3)])
def test_a_run_longer_than_a_session_continues_from_its_partial_state(
    tmp_path, model_dir, corpus, monkeypatch, arm, run, stopped_at
):
    """A stopped run keeps its state at the step it stopped as ``<run>@partial`` (small files to commit); a fresh
    clone (no checkpoint) continues from there, says so in the point, and drops the partial once past it. The
    partial state is the state the run had at that step: equal to an uninterrupted run's at the same step."""
    from attnsurgery.train import TrainingInterrupted

    tokens = 2 * SEQ
    budget = 4 * tokens  # 4 steps, or 2 + 2 for the two-stage arm
    table = write_table(tmp_path / "b.yaml", model_dir, corpus, [budget])
    _stop_at(monkeypatch, stopped_at + 1)
    with pytest.raises(TrainingInterrupted):
        run_budget_table(table, tmp_path / "out", arms=[arm])
    monkeypatch.undo()
    runs = tmp_path / "out" / "runs" / arm
    name = "stage1" if run == "stage1" else f"{run}-{budget}"
    partial = runs / f"{name}@partial"
    steps = stopped_at if run == "stage1" else stopped_at - 2  # the first stage's 2 steps came before
    assert yaml.safe_load((partial / "recipe.yaml").read_text())["training"]["steps"] == steps
    assert not (partial / "checkpoint.pt").exists() and not (tmp_path / "out" / "curve.json").is_file()

    # the state the run had at that step: an uninterrupted run's (stage 1), or on the frozen first stage's state
    if run == "stage1":
        out = run_budget_table(
            write_table(tmp_path / "r.yaml", model_dir, corpus, [steps * tokens]),
            tmp_path / "ref",
            arms=[arm],
        )
        ref_state = out / "runs" / arm / f"stage1@{steps * tokens}"
    else:
        ref_state = runs / f"gates@{budget}"
    for ref in ref_state.glob("*.safetensors"):
        mine, theirs = load_file(str(partial / ref.name)), load_file(str(ref))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    # a fresh clone: no checkpoint, no uncommitted states of the stopped run
    (runs / name / "checkpoint.pt").unlink()
    history = json.loads((partial / "training.json").read_text())["train_loss"]
    curve = json.loads((run_budget_table(table, tmp_path / "out", arms=[arm]) / "curve.json").read_text())
    point = curve["arms"][arm]["points"][0]
    assert point["tokens"] == budget and point["warm_start"] == f"runs/{arm}/{name}@partial"
    after = json.loads((runs / name / "training.json").read_text())["train_loss"]
    assert (
        len(after) == 2 * tokens * (4 if run == "stage1" else 2) // tokens // 2 and after[:steps] == history
    )
    assert not partial.exists()  # past it: the budget's snapshot replaces it


@pytest.mark.parametrize("minutes", ["0", "-5", "nan"])
def test_minutes_must_be_a_positive_time(minutes, capsys):
    from attnsurgery.eval.budget import main

    assert main(["no-such-table.yaml", "--minutes", minutes]) == 2
    assert f"--minutes {float(minutes)}" in capsys.readouterr().err


def test_w8a8_points_score_the_gap_and_earlier_points_are_scored_from_their_state(
    tmp_path, model_dir, corpus
):
    """An arm with ``eval.w8a8_calib_windows`` scores static W8A8 at each point (its gap relative to the unpatched
    model's); points made before it are scored from their kept state without training again, to the same numbers a
    run that scored them from the start gives."""
    tokens = 2 * SEQ
    table = write_table(tmp_path / "b.yaml", model_dir, corpus, [tokens, 2 * tokens])
    out = run_budget_table(table, tmp_path / "late", arms=["gates"])
    runs = out / "runs" / "gates" / "stage1"
    history = (runs / "training.json").read_text()
    assert "ppl_w8a8" not in json.loads((out / "curve.json").read_text())["arms"]["gates"]["points"][0]

    raw = yaml.safe_load(table.read_text())
    raw["arms"][0]["eval"]["w8a8_calib_windows"] = 2
    table.write_text(yaml.safe_dump(raw))
    late = json.loads((run_budget_table(table, tmp_path / "late", arms=["gates"]) / "curve.json").read_text())
    assert (runs / "training.json").read_text() == history  # scored, not trained again
    early = json.loads(
        (run_budget_table(table, tmp_path / "early", arms=["gates"]) / "curve.json").read_text()
    )
    for a, b in zip(late["arms"]["gates"]["points"], early["arms"]["gates"]["points"]):
        assert a["ppl_w8a8"] == pytest.approx(b["ppl_w8a8"], rel=1e-6)
        assert a["ppl_w8a8"] != a["ppl"]  # the quantisation was applied
        gap, base_gap = a["ppl_w8a8"] - a["ppl"], a["baseline_ppl_w8a8"] - a["baseline_ppl"]
        assert a["w8a8_gap_pct"] == pytest.approx(100 * (gap / base_gap - 1))
    assert "| gates | cpu |" in (tmp_path / "late" / "curve.md").read_text()

    # the shipped recipe records the W8A8 figures of its point
    from attnsurgery.eval.budget import ship_states
    from attnsurgery.recipe import load_recipe_file

    raw["arms"][0]["recipe"] = "gated_attention/tiny-gates"
    table.write_text(yaml.safe_dump(raw))
    (written,) = ship_states(table, tmp_path / "late", ["gates"], tmp_path / "recipes")
    shipped = load_recipe_file(written)
    last = late["arms"]["gates"]["points"][-1]
    assert shipped.training["point"]["w8a8_gap_pct"] == last["w8a8_gap_pct"]
    assert f"W8A8 gap {last['w8a8_gap_pct']:+.1f}%" in shipped.description

    raw["arms"][0]["eval"]["w8a8_calib_windows"] = 0
    table.write_text(yaml.safe_dump(raw))
    with pytest.raises(BudgetError, match="w8a8_calib_windows"):
        load_budget_table(table)
