"""The lm-eval bridge and the baseline-vs-patched runner, on a tiny random-weight Llama with a character tokenizer.

Tasks are small JSONL files written per test session with absolute paths, so nothing touches the Hub.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import KERNEL_NOISE_FACTOR, float_noise, tiny_model, tiny_tokenizer

from attnsurgery import patch
from attnsurgery.eval.lmeval import SurgeryLM, degenerate_fraction
from attnsurgery.eval.text import check_tasks, evaluate_arms
from attnsurgery.eval.text_report import render_markdown, write_report
from attnsurgery.eval.text_results import Arm, EvalError, make_arms, paired_delta
from attnsurgery.eval.text_tables import load_table, parse_table, reproduce
from attnsurgery.recipe import parse_recipe

SHARPEN = {"name": "sharpen", "surgeries": [{"surgery": "temperature", "args": {"tau": 0.5}}]}
IDENTITY = {"name": "identity", "surgeries": [{"surgery": "temperature", "args": {"tau": 1.0}}]}
ACT = {"name": "act-all", "surgeries": [{"surgery": "act", "args": {"beta": 0.4, "threshold": 0.1}}]}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Three tiny lm-eval tasks: multiple choice, rolling perplexity and generation."""
    root = tmp_path_factory.mktemp("tasks")
    words = ["apple", "river", "stone", "cloud", "lemon", "tiger", "piano", "green"]
    mc = [
        {
            "query": f"Q{i}: which word follows {words[i % 8]}?\nA:",
            "choices": [f" {words[(i + k) % 8]}" for k in range(1, 4)],
            "gold": i % 3,
        }
        for i in range(12)
    ]
    ppl = [{"text": " ".join(words[(i + k) % 8] for k in range(5 + i)) + "."} for i in range(6)]
    gen = [{"query": f"Say {w}:", "answer": w} for w in words[:5]]
    for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "test_split": "test"}
    configs = {
        "t_mc": {
            "output_type": "multiple_choice",
            "doc_to_text": "{{query}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
        "t_ppl": {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {
                    "metric": "word_perplexity",
                    "aggregation": "weighted_perplexity",
                    "higher_is_better": False,
                },
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
            ],
        },
        "t_gen": {
            "output_type": "generate_until",
            "doc_to_text": "{{query}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
    }
    for task, cfg in configs.items():
        data = root / f"{task[2:]}.jsonl"
        doc = {"task": task, **common, "dataset_kwargs": {"data_files": {"test": str(data)}}, **cfg}
        (root / f"{task}.yaml").write_text(yaml.safe_dump(doc))
    return root


@pytest.fixture
def include(task_dir, monkeypatch):
    monkeypatch.setenv("ATTNSURGERY_INCLUDE_PATH", str(task_dir))
    return task_dir


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("llama"), tiny_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, loaded) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    model, tok = loaded
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _arms(*recipes):
    return [Arm("baseline")] + [Arm(r["name"], parse_recipe(r)) for r in recipes]


# -------------------------------------------------------------------------------------------- the bridge
def test_identity_arm_equals_baseline_and_patched_arm_differs(include, loaded, tmp_path):
    report = evaluate_arms(
        "tiny", _arms(IDENTITY, SHARPEN), ["t_mc", "t_ppl"], loaded=loaded, cache_dir=tmp_path, batch_size=4
    )
    base, ident, sharp = report.arms
    assert ident.metrics == base.metrics
    assert ident.per_doc == base.per_doc
    assert base.n_docs == {"t_mc": 12, "t_ppl": 6}
    assert sharp.metrics["t_ppl"]["word_perplexity"] != pytest.approx(
        base.metrics["t_ppl"]["word_perplexity"]
    )
    rows = {(r["task"], r["metric"]): r for r in report.rows()}
    same = rows[("t_ppl", "word_perplexity")]["arms"]["identity"]
    assert same["delta"] == 0 and same["p"] == 1.0
    diff = rows[("t_ppl", "word_perplexity")]["arms"]["sharpen"]
    expected = sharp.metrics["t_ppl"]["word_perplexity"] - base.metrics["t_ppl"]["word_perplexity"]
    assert diff["delta"] == pytest.approx(expected)
    assert all(a.valid for a in report.arms)
    # the surgeries were removed after their arms: the model is stock again
    assert loaded[0].config._attn_implementation == "sdpa"


def test_an_arm_outside_a_git_repository_prints_no_git_error(include, loaded, tmp_path, monkeypatch, capfd):
    """lm-eval probes the working directory's git commit with the console as git's stderr; run from a folder that
    is no repository, every arm printed "fatal: not a git repository". The control shows lm-eval's own probe does."""
    from lm_eval.loggers.utils import get_git_commit_hash

    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never find a repository above it
    get_git_commit_hash()
    assert "not a git repository" in capfd.readouterr().err  # the control: the unwrapped probe prints it
    evaluate_arms("tiny", _arms(SHARPEN), ["t_mc"], loaded=loaded, cache_dir=tmp_path / "cache", limit=2)
    assert "not a git repository" not in capfd.readouterr().err


def test_arms_are_cached_and_rerun_skips_them(include, loaded, tmp_path, monkeypatch):
    evaluate_arms("tiny", _arms(SHARPEN), ["t_mc"], loaded=loaded, cache_dir=tmp_path, limit=4)
    seen = []

    def no_run(*a, **k):
        raise AssertionError("a cached arm ran again")

    monkeypatch.setattr("attnsurgery.eval.text.run_arm", no_run)
    report = evaluate_arms(
        "tiny", _arms(SHARPEN), ["t_mc"], cache_dir=tmp_path, limit=4, on_arm=lambda a, s: seen.append(s)
    )
    assert seen == ["cached", "cached"]
    assert report.baseline.n_docs == {"t_mc": 4}
    # another setting (limit) is another fingerprint: it must run
    with pytest.raises(AssertionError, match="cached arm ran again"):
        evaluate_arms("tiny", _arms(SHARPEN), ["t_mc"], loaded=loaded, cache_dir=tmp_path, limit=5)


def test_batched_right_padded_scoring_equals_one_by_one_with_act(loaded):
    """lm-eval scores right-padded batches; ACT's per-row sink detection must ignore the padding."""
    import copy

    from lm_eval.api.instance import Instance

    model, tok = loaded
    reqs = [Instance("loglikelihood", {}, (f"context {'x' * (3 * i)} and", f" end{i}"), i) for i in range(6)]

    def scores(m, batch_size):
        return [
            ll for ll, _ in SurgeryLM(pretrained=m, tokenizer=tok, batch_size=batch_size).loglikelihood(reqs)
        ]

    # the stock model's own float32 rounding of these log-likelihoods (against a float64 copy) is the scale
    tol = KERNEL_NOISE_FACTOR * float_noise(scores(model, 1), scores(copy.deepcopy(model).double(), 1))
    with patch(model, parse_recipe(ACT)):
        batched = scores(model, 6)
        single = scores(model, 1)
    for a, b in zip(batched, single):
        assert a == pytest.approx(b, abs=tol)


def test_generation_is_patched_and_left_padding_matches_one_by_one(loaded):
    from lm_eval.api.instance import Instance

    model, tok = loaded
    gen = {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}
    reqs = [
        Instance("generate_until", {}, (p, gen), i) for i, p in enumerate(["Say a:", "Say longer b:", "c"])
    ]
    stock = SurgeryLM(pretrained=model, tokenizer=tok, batch_size=3).generate_until(reqs)
    with patch(model, "temperature", tau=0.2):
        batched = SurgeryLM(pretrained=model, tokenizer=tok, batch_size=3).generate_until(reqs)
        one_by_one = []
        for p in ["Say a:", "Say longer b:", "c"]:
            ids = tok(p, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
            one_by_one.append(tok.decode(out[0, ids["input_ids"].shape[1] :]).split("\n")[0])
    assert batched == one_by_one
    assert batched != stock  # the surgery was active during generation


def test_nan_logits_mark_the_arm_invalid(include, loaded, tmp_path):
    model, _ = loaded
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: out * float("nan"))
    try:
        report = evaluate_arms("tiny", _arms(), ["t_mc"], loaded=loaded, cache_dir=tmp_path, limit=3)
    finally:
        hook.remove()
    arm = report.baseline
    assert not arm.valid
    assert any("NaN/inf logits" in p for p in arm.problems)
    assert any("tied or non-finite" in p for p in arm.problems)
    md = render_markdown([report])
    assert "INVALID" in md


def test_degenerate_fraction():
    tied = {"filtered_resps": [(-1.0, False), (-1.0, False)]}
    fine = {"filtered_resps": [(-1.0, False), (-2.0, False)]}
    nan = {"filtered_resps": [(float("nan"), False), (-2.0, False)]}
    assert degenerate_fraction([tied, fine, nan, fine]) == 0.5
    assert degenerate_fraction([{"filtered_resps": [(-3.0, False)]}]) is None


def test_paired_delta_mean_and_corpus_metrics():
    base = {str(i): {"acc": float(i % 2)} for i in range(10)}
    other = {str(i): {"acc": 1.0} for i in range(10)}
    d = paired_delta("acc", base, other)
    assert d["delta"] == pytest.approx(0.5)
    assert d["delta_stderr"] == pytest.approx(math.sqrt(0.25 * 10 / 9) / math.sqrt(10))
    assert 0 < d["p"] < 0.01
    ppl_base = {str(i): {"word_perplexity": [-10.0 - i, 5.0]} for i in range(8)}
    assert paired_delta("word_perplexity", ppl_base, ppl_base)["delta"] == 0
    worse = {k: {"word_perplexity": [v["word_perplexity"][0] - 2, 5.0]} for k, v in ppl_base.items()}
    d = paired_delta("word_perplexity", ppl_base, worse)
    assert d["delta"] > 0 and d["p"] < 0.01


def test_report_files(include, loaded, tmp_path):
    report = evaluate_arms("tiny", _arms(SHARPEN), ["t_mc", "t_ppl"], loaded=loaded, limit=4)
    paths = write_report([report], tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["reports"][0]["arms"]["sharpen"]["lm_eval"]["results"]["t_mc"]
    assert paths["png"].stat().st_size > 1000
    md = paths["md"].read_text()
    assert "| t_mc | acc |" in md and "Δ sharpen" in md


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_task_names_a_fix(include):
    with pytest.raises(EvalError, match="unknown lm-eval task 't_mcc'.*Did you mean 't_mc'"):
        check_tasks(["t_mcc"])
    with pytest.raises(EvalError, match="no tasks"):
        check_tasks([])


def test_missing_include_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNSURGERY_INCLUDE_PATH", str(tmp_path / "nope"))
    with pytest.raises(EvalError, match="does not exist"):
        check_tasks(["t_mc"])


def test_unknown_recipe_fails_before_anything_runs():
    from attnsurgery.errors import RecipeError

    with pytest.raises(RecipeError, match="unknown recipe"):
        make_arms(["tempurature"])


GOOD_TABLE = {
    "name": "tiny-table",
    "models": ["tiny"],
    "arms": [{"name": "baseline"}, {"name": "sharp", "recipe": "temperature"}],
    "tasks": ["t_mc"],
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"taks": ["x"]}, "unknown key 'taks'.*Did you mean 'tasks'"),
        ({"arms": [{"name": "sharp", "recipe": "temperature"}]}, "first arm must be the baseline"),
        ({"arms": [{"name": "baseline"}, {"name": "x", "recip": "y"}]}, "unknown key 'recip'"),
        ({"models": []}, "`models` must be a non-empty list"),
        ({"published": [{"model": "tiny"}]}, "needs at least model, arm, task and value"),
        ({"limit": -3}, "`limit` must be a positive"),
    ],
)
def test_malformed_tables(change, message):
    with pytest.raises(EvalError, match=message):
        parse_table({**GOOD_TABLE, **change}, "t.yaml")
    with pytest.raises(EvalError, match="missing required key 'tasks'"):
        parse_table({k: v for k, v in GOOD_TABLE.items() if k != "tasks"})


def test_table_files_and_unknown_metric(include, tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        load_table(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(EvalError, match="not valid YAML"):
        load_table(bad)
    t = tmp_path / "t.yaml"
    t.write_text(yaml.safe_dump({**GOOD_TABLE, "metrics": {"t_mc": "accuracy"}}))
    with pytest.raises(EvalError, match="no metric 'accuracy'.*Its metrics: acc"):
        reproduce(t, out_dir=tmp_path / "out")


def test_reproduce_runs_a_table(include, loaded, tmp_path, monkeypatch):
    monkeypatch.setattr("attnsurgery.models.load_model", lambda name, **kw: loaded)
    table = tmp_path / "t.yaml"
    published = [
        {"model": "tiny", "arm": "sharp", "task": "t_mc", "metric": "acc", "value": 0.5, "source": "x"}
    ]
    table.write_text(yaml.safe_dump({**GOOD_TABLE, "limit": 6, "published": published}))
    reports, paths = reproduce(table, out_dir=tmp_path / "out")
    assert [a.arm for a in reports[0].arms] == ["baseline", "sharp"]
    md = paths["md"].read_text()
    assert "published" in md and "sharp: 0.5" in md
    assert (tmp_path / "out" / "cache" / "tiny").is_dir()
    assert paths["png"].stat().st_size > 1000 and paths["bars"].name == "table-values.png"  # forest + values
    assert "Limited run: 6 documents" in md  # the table's own limit, said in the title

    # a quick look with another --limit never lands on those results: refused in the same folder ...
    full = paths["json"].read_text()
    with pytest.raises(EvalError, match="--limit 6.*--limit 3.*--overwrite"):
        reproduce(table, out_dir=tmp_path / "out", limit=3)
    assert paths["json"].read_text() == full
    # ... and by default it goes to a folder of its own, marked limited in its table and plot
    monkeypatch.chdir(tmp_path)
    _, quick = reproduce(table, limit=3)
    assert quick["json"].parent == Path("evals/results/tiny-table-limit3")
    assert "Limited run: 3 documents" in quick["md"].read_text()
    _, replaced = reproduce(table, out_dir=tmp_path / "out", limit=3, overwrite=True)
    assert replaced["json"].read_text() != full


def test_cli_eval_unknown_task_exits_before_loading(include, capsys):
    from attnsurgery.cli import main

    assert main(["eval", "smollm2-135m", "--tasks", "t_mcc"]) == 2
    assert "Did you mean 't_mc'" in capsys.readouterr().err


def test_surgery_args_parsing():
    from attnsurgery.errors import AttnSurgeryError
    from attnsurgery.eval.lmeval import _parse_surgery_args

    assert _parse_surgery_args("beta:0.4;threshold:0.1") == {"beta": 0.4, "threshold": 0.1}
    with pytest.raises(AttnSurgeryError, match="name:value"):
        _parse_surgery_args("beta=0.4")


# --------------------------------------------------------------------- lm-eval's CLI, data parallel
def _harness(args: list[str], env: dict, launcher: list[str]) -> dict:
    out = subprocess.run(
        [*launcher, "-m", "attnsurgery", "lm-eval", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_lm_eval_cli_and_two_process_data_parallel_match(task_dir, model_dir, tmp_path):
    """`attnsurgery lm-eval run --model attnsurgery` works, and 2 CPU processes give the 1-process metrics."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    results = {}
    for procs in (1, 2):
        out_dir = tmp_path / f"p{procs}"
        args = [
            "run", "--model", "attnsurgery",
            "--model_args", f"pretrained={model_dir},surgery=temperature,surgery_args=tau:0.5",
            "--tasks", "t_mc,t_ppl", "--include_path", str(task_dir), "--batch_size", "4",
            "--output_path", str(out_dir),
        ]  # fmt: skip
        launcher = [sys.executable] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"
        ]  # fmt: skip
        _harness(args, env, launcher)
        files = sorted(out_dir.rglob("results_*.json"))
        assert files, f"no results written for {procs} process(es)"
        results[procs] = json.loads(files[-1].read_text())["results"]
    for task in ("t_mc", "t_ppl"):
        for key, value in results[1][task].items():
            if isinstance(value, float):
                assert results[2][task][key] == pytest.approx(value, rel=1e-5), (task, key)
    # and the surgery was really on: the stock model scores the corpus differently
    stock = SurgeryLM(pretrained=str(model_dir), batch_size=4)
    assert stock.handle is None


def test_perplexity_panels_fit_their_axis_and_rate_panels_start_at_zero(tmp_path, monkeypatch):
    """A +1.4 change of a perplexity near 30 is visible: its panel's axis fits the values (no bar from 0); an
    accuracy keeps its bars from 0."""
    import attnsurgery.eval.report as report

    figures = []
    real_save = report.save_figure
    monkeypatch.setattr(
        report, "save_figure", lambda fig, out, dpi: figures.append(fig) or real_save(fig, out, dpi)
    )
    ppl = report.Panel(
        "ppl", "word_perplexity", [29.72, 31.12], [0.4, 0.42], [True, True], ["a", "b"], from_zero=False
    )
    acc = report.Panel("acc", "acc", [0.4, 0.45], [0.05, 0.05], [True, True], ["a", "b"])
    report.plot_panels([ppl, acc], tmp_path / "p.png", panel_size=(4, 3), title_size=8, tick_style={})
    ppl_ax, acc_ax = figures[0].axes[:2]
    low, high = ppl_ax.get_ylim()
    assert 28 < low < 29.32 and 31.54 < high < 33  # every error bar in view, the gap between arms dominant
    assert acc_ax.get_ylim()[0] == 0 and len(acc_ax.patches) == 2  # bars from 0


def test_console_table_fits_80_columns_with_full_names():
    """The console view of an eval: every line fits 80 columns and no name is cut with an ellipsis (folded names
    read whole once the frame is removed); the wide side-by-side table stays in results.md."""
    from rich.console import Console

    from attnsurgery.commands._common import compact_table

    arms = [
        "baseline",
        "moh/smollm2-135m-learned-75-lora",
        "act/mistral-7b-instruct-mc",
        "temperature/position",
    ]
    report = {
        "model": "smollm2-135m",
        "settings": {"limit": None},
        "table": [
            {
                "task": task,
                "metric": metric,
                "arms": {
                    a: {"value": 0.41, "stderr": 0.05, "valid": True}
                    | ({} if a == "baseline" else {"delta": -0.012, "p": 0.0004})
                    for a in arms
                },
            }
            for task, metric in (
                ("bb_similarities_abstraction", "acc_norm"),
                ("gutenberg_ppl", "word_perplexity"),
            )
        ],
    }
    console = Console(width=80, record=True, force_terminal=False)
    console.print(compact_table(report))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    # read each column top to bottom (a folded name continues on the next line of its own column)
    columns = ["", "", "", ""]
    for line in text.splitlines():
        cells = line.split("│")[1:-1]
        if len(cells) == 4:
            columns = [c + cell.strip() for c, cell in zip(columns, cells)]
    for name in arms:
        assert name in columns[1], name
    for name in ("bb_similarities_abstraction·acc_norm", "gutenberg_ppl·word_perplexity"):
        assert name in columns[0].replace(" ", ""), name
    assert "-0.012(p<0.001)" in columns[3].replace(" ", "")


def test_lm_eval_bridge_says_which_recipe_and_heads_it_resolved(loaded, capsys):
    """`lm-eval run ... recipe=act/all-heads`: the bridge names the recipe file and the targets it patched."""
    model, tok = loaded
    lm = SurgeryLM(pretrained=model, tokenizer=tok, batch_size=1, recipe="act/all-heads")
    try:
        said = " ".join(capsys.readouterr().err.split())
        assert "recipe act/all-heads" in said and "all-heads.yaml" in said
        assert "act(" in said and "layers" in said  # the surgery with its resolved arguments and targets
    finally:
        lm.handle.remove()
