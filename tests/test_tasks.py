"""The offline task suite (evals/tasks, installed as ``attnsurgery.tasks``): data, API and lm-eval wiring.

No model runs here: lm-eval requests are built from the configs and scored by a deterministic dummy LM.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import_tasks() -> ModuleType:
    # Installed package first; a checkout whose install predates the evals/tasks mapping falls back to the
    # folder itself, so these tests also run before a reinstall.
    try:
        return importlib.import_module("attnsurgery.tasks")
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location(
        "attnsurgery_tasks_checkout", ROOT / "evals" / "tasks" / "__init__.py",
        submodule_search_locations=[str(ROOT / "evals" / "tasks")])
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


T = _import_tasks()
MC = [t for t in T.offline_tasks() if T.task_info(t)["kind"] == "multiple_choice"]
PPL = [t for t in T.offline_tasks() if T.task_info(t)["kind"] == "perplexity"]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Offline Hub/datasets, a throwaway datasets cache, and a working directory far from the checkout."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


# --- API and data ------------------------------------------------------------------------------------------


def test_api_lists_tasks_and_include_path():
    names = T.offline_tasks()
    assert len(names) == len(set(names)) >= 5
    assert MC and PPL == ["gutenberg_ppl"]
    inc = Path(T.include_path())
    assert inc.is_dir() and (inc / f"{T.GROUP}.yaml").is_file()
    for name in names:
        assert (inc / f"{name}.yaml").is_file(), name


@pytest.mark.parametrize("task", MC)
def test_multiple_choice_schema_and_disjoint_splits(task):
    cal, test = T.load_split(task, "calibration"), T.load_split(task, "test")
    assert cal and test
    for r in cal + test:
        assert {"id", "query", "choices", "gold"} <= set(r), r
        assert isinstance(r["query"], str) and r["query"].strip()
        assert not r["query"].endswith(" "), "the answer's leading space belongs to the choice"
        assert len(r["choices"]) >= 2 and all(isinstance(c, str) and c.strip() for c in r["choices"])
        assert len(set(r["choices"])) == len(r["choices"]), r["id"]
        assert isinstance(r["gold"], int) and 0 <= r["gold"] < len(r["choices"])
    ids = [r["id"] for r in cal + test]
    assert len(ids) == len(set(ids))
    assert not {r["query"] for r in cal} & {r["query"] for r in test}
    if task.startswith("bb_"):
        assert all("canary GUID" in r["canary"] for r in cal + test)


@pytest.mark.parametrize("task", PPL)
def test_perplexity_corpus_disjoint_and_big_enough(task):
    cal, test = T.load_split(task, "calibration"), T.load_split(task, "test")
    for r in cal + test:
        assert set(r) == {"id", "text"} and r["text"].strip()
    assert not {r["text"] for r in cal} & {r["text"] for r in test}
    assert not {r["id"] for r in cal} & {r["id"] for r in test}
    words = {s: sum(len(r["text"].split()) for r in recs) for s, recs in (("cal", cal), ("test", test))}
    # ~1.3 tokens a word for English BPE: >= ~100k calibration tokens and >= ~30k test tokens.
    assert words["cal"] > 75_000 and words["test"] > 22_000, words


def test_task_info():
    for task in T.offline_tasks():
        info = T.task_info(task)
        assert info["n"] == {s: len(T.load_split(task, s)) for s in ("calibration", "test")}
        assert info["source"] and info["licence"]
        if info["kind"] == "multiple_choice":
            assert 0 < info["chance"] < 1
    assert math.isclose(T.task_info("mmlu_subset")["chance"], 0.25)


def test_load_split_returns_fresh_records():
    a = T.load_split(MC[0], "test")
    a[0]["query"] = "mutated"
    assert T.load_split(MC[0], "test")[0]["query"] != "mutated"


def test_unknown_task_and_split_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown offline task 'bb_general_knowlege'.*Did you mean "
                                         r"'bb_general_knowledge'.*Valid: .*mmlu_subset"):
        T.load_split("bb_general_knowlege", "test")
    with pytest.raises(ValueError, match=r"unknown split 'tset'.*Did you mean 'test'.*calibration, test"):
        T.load_split(MC[0], "tset")
    with pytest.raises(ValueError, match="unknown offline task"):
        T.task_info("nope")


def test_data_is_small():
    data = Path(T.include_path()) / "data"
    total = sum(p.stat().st_size for p in data.iterdir())
    assert total < 3_000_000, total
    assert "canary GUID" in (data / "CANARY").read_text()


# --- lm-eval -----------------------------------------------------------------------------------------------


def _task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=T.include_path())


def test_lm_eval_loads_every_task_offline_from_another_cwd(offline):
    tm = _task_manager()
    assert T.GROUP in tm.all_groups
    loaded = tm.load(T.offline_tasks())["tasks"]
    assert set(loaded) == set(T.offline_tasks())
    for name, task in loaded.items():
        test = T.load_split(name, "test")
        assert len(task.test_docs()) == len(test)
        task.build_all_requests(limit=3, rank=0, world_size=1)
        if name in MC:
            assert task.config.fewshot_split == "calibration" and task.config.test_split == "test"
            doc = test[0]
            reqs = [i for i in task.instances if i.doc_id == 0]
            assert [i.request_type for i in reqs] == ["loglikelihood"] * len(doc["choices"])
            # context is the query, continuation the choice (its own leading space): nothing is inserted.
            assert [i.args for i in reqs] == [(doc["query"], c) for c in doc["choices"]]
        else:
            assert {i.request_type for i in task.instances} == {"loglikelihood_rolling"}
            assert task.instances[0].args == (test[0]["text"],)


def test_configs_read_the_data_next_to_them_not_the_checkout(offline, tmp_path):
    # Stands in for an installed wheel: the folder copied elsewhere must serve its own copy of the data.
    import shutil

    from lm_eval.tasks import TaskManager

    copy = tmp_path / "site-packages" / "attnsurgery" / "tasks"
    shutil.copytree(T.include_path(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / "data" / "bb_general_knowledge.test.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:5]) + "\n", encoding="utf-8")
    task = TaskManager(include_path=str(copy)).load("bb_general_knowledge")["tasks"]["bb_general_knowledge"]
    assert len(task.test_docs()) == 5


def test_fewshot_examples_come_from_calibration(offline):
    task = _task_manager().load("bb_emoji_movie")["tasks"]["bb_emoji_movie"]
    task.set_fewshot_seed(1234)
    cal = {r["query"].strip() for r in T.load_split("bb_emoji_movie", "calibration")}
    test = [r["query"].strip() for r in T.load_split("bb_emoji_movie", "test")]
    ctx = task.fewshot_context(task.test_docs()[0], num_fewshot=3)
    assert ctx.rstrip().endswith(test[0])
    assert sum(q in ctx for q in cal) >= 3
    assert not [q for q in test[1:] if q in ctx]


class _DummyLM:
    """Deterministic scores without a model: log-likelihood = -(length of the continuation)."""

    @staticmethod
    def make():
        from lm_eval.api.model import LM

        class Dummy(LM):
            def loglikelihood(self, requests, disable_tqdm: bool = False):
                return [(-float(len(r.args[1])), False) for r in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
                return [-0.5 * len(r.args[0]) for r in requests]

            def generate_until(self, requests, disable_tqdm: bool = False):
                raise NotImplementedError

        return Dummy()


def test_simple_evaluate_with_dummy_lm(offline):
    from lm_eval import simple_evaluate

    out = simple_evaluate(_DummyLM.make(), tasks=[T.GROUP], task_manager=_task_manager(), limit=4,
                          bootstrap_iters=0)
    res = out["results"]
    for name in MC:
        assert 0.0 <= res[name]["acc,none"] <= 1.0 and 0.0 <= res[name]["acc_norm,none"] <= 1.0
    ppl = res["gutenberg_ppl"]
    # -0.5 nats a character: bits_per_byte = 0.5 / ln 2 * chars / bytes, and the texts are nearly ASCII.
    assert 0.6 < ppl["bits_per_byte,none"] <= 0.5 / math.log(2) + 1e-9
    assert math.isfinite(ppl["word_perplexity,none"]) and ppl["byte_perplexity,none"] > 1


# --- rebuild ----------------------------------------------------------------------------------------------


def test_build_check_reproduces_the_vendored_files(capsys):
    build = importlib.import_module(T.__name__ + ".build")
    missing = {n for n, s in build.SOURCES.items() if not (build.cache_dir() / s.filename).exists()}
    # sources the registry no longer serves (CI names them after trying to fetch each: bigbench 1.0.0 was withdrawn
    # from PyPI by 2026-12-06); their tasks' data stays vendored, and the parts they feed cannot be rebuilt
    gone = {n for n in os.environ.get("ATTNSURGERY_UNAVAILABLE_SOURCES", "").split(",") if n}
    if missing - gone and os.environ.get("ATTNSURGERY_REQUIRE_SOURCES"):  # CI fetches them first: never skip there
        pytest.fail(f"source archives missing from {build.cache_dir()}: {', '.join(sorted(missing - gone))}")
    parts = [part for part, sources in build.PARTS.items() if not set(sources) & missing]
    if not parts:
        pytest.skip(f"source archives not cached in {build.cache_dir()}: {', '.join(sorted(missing))} "
                    f"(run `python -m attnsurgery.tasks.build` once to fetch them)")
    assert build.main(["--check", "--no-download", "--parts", ",".join(parts)]) == 0, capsys.readouterr().err
    unchecked = sorted(set(build.PARTS) - set(parts))
    if unchecked:  # said out loud: these parts were not rebuilt here
        warnings.warn(f"rebuild check covered {', '.join(parts)}; not {', '.join(unchecked)} (sources missing: "
                      f"{', '.join(sorted(missing))})", stacklevel=1)
