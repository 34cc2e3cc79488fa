"""Training tables: train each arm's surgeries, then score every arm on the test split.

A table YAML with ``kind: training`` (``evals/outliers.yaml``) lists models and arms; each arm names the surgeries
to patch (as in a recipe) plus trainer settings. ``attnsurgery reproduce evals/outliers.yaml`` (or
:func:`run_training_table`) trains every arm on the *calibration* split of the training corpus with the shared
trainer (``attnsurgery.train``), resumably (each arm is a run folder; a finished one is reused, an interrupted
one resumes), and then scores it on the *test* split of the same corpus — which no arm trains on:

* FP perplexity (token level, packed windows) and W8A8 perplexity (simulated static W8A8, Bondarenko et al.
  2023, activation ranges calibrated with the arm's surgeries active on calibration windows) and their gap;
* outlier statistics: max kurtosis and inf-norm over layers, the mean first-token (sink) attention share over
  layers >= 2, the largest activation;
* the training cost: steps, tokens, minutes.

``measure:`` picks among ``perplexity``, ``w8a8`` and ``outliers`` (the default: these three) and ``ood`` --
perplexity on *another domain*: the test prompts of the offline multiple-choice tasks (BIG-bench, MMLU) with
their gold answers, packed into windows like the training data, so that an arm's perplexity gain from fitting the
training corpus's domain shows as such (an arm adding a measure to a finished table measures only that). ``tasks:`` adds
offline lm-eval tasks, scored on every arm once all are trained (``tasks.md``/``.json``/``.png`` with paired
deltas against the baseline, cached per arm under ``cache/``).

Arms: ``models: [...]`` limits an arm to some of the table's models (default: all); ``surgeries`` without ``train``
is a training-free arm (patched as is); ``from: <arm>`` starts from another
(earlier) arm's finished run — its surgeries loaded and frozen — and trains this arm's settings on top (e.g. a
LoRA stage after a feature-map stage); ``surgeries`` then lists only what this arm adds (may be empty).

Results: ``table.json`` (everything), ``table.md`` (the comparison with relative changes vs the baseline), one
``outliers-<model>.png`` per model (per-layer curves of every arm, when outliers are measured), one
``validation-<model>.png`` (each trained arm's validation terms over its steps), and
``runs/<model>/<arm>/`` (each arm's recipe folder: ``patch(model, folder)`` loads it).

This module runs a table; its definition (the YAML, :class:`TrainingTable`) is :mod:`.training_table_def`, its
markdown and plots :mod:`.training_table_report`, both re-exported here.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError
from .training_table_def import (  # noqa: F401  (the definition's public names: re-exported)
    _MEASURED,
    DEFAULT_MEASURES,
    MEASURES,
    OOD_TASKS,
    TrainingTable,
    _runs_on,
    is_training_table,
    load_training_table,
)
from .training_table_report import plot_validation_curves, render_training_table


def _test_windows(tokenizer: Any, source: str, seq_len: int, n: int) -> Any:
    """The test split of an offline corpus, packed like the training data (never trained on: the trainer refuses
    test splits)."""
    from ..tasks import load_split
    from ..windows import pack_windows

    texts = [r["text"] for r in load_split(source, "test")]
    return pack_windows(tokenizer, texts, seq_len)[:n]


def _ood_windows(tokenizer: Any, seq_len: int, n: int) -> Any:
    """Text of another domain than the training corpus: each offline multiple-choice task's *test* prompts with
    their gold answers, the tasks interleaved record by record (so a few windows already mix all of them), packed
    like the training data."""
    from ..tasks import load_split
    from ..windows import pack_windows

    per_task = [[r["query"] + r["choices"][r["gold"]] for r in load_split(t, "test")] for t in OOD_TASKS]
    texts = [task[i] for i in range(max(map(len, per_task))) for task in per_task if i < len(task)]
    return pack_windows(tokenizer, texts, seq_len)[:n]


def _train_arm(
    model: Any, arm: dict, table: TrainingTable, data: Any, run_dir: Path, model_name: str, runs: Path
) -> dict:
    """Patch (and train) one arm; returns its handle and training summary (None for a training-free arm). A run
    folder with ``recipe.yaml`` is finished and reused; one with only a checkpoint resumes."""
    from ..api import patch
    from ..recipe import find_recipe, parse_recipe
    from ..train import TrainConfig, train
    from ..train.compose import compose_for_training

    if _finished(run_dir):  # finished before: reuse
        handle = patch(model, find_recipe(run_dir))
        return {
            "handle": handle,
            "training": yaml.safe_load((run_dir / "recipe.yaml").read_text()).get("training"),
        }
    if arm.get("from") and not _finished(runs / arm["from"]):
        raise RecipeError(f"arm {arm['name']!r}: arm {arm['from']!r} it starts from has no finished run.")
    settings = dict(arm.get("train") or {})
    lora = settings.pop("lora", None)
    handle = compose_for_training(
        model,
        frozen=runs / arm["from"] if arm.get("from") else None,
        surgery=parse_recipe({"surgeries": arm["surgeries"]}) if arm.get("surgeries") else None,
        lora=lora,
    )
    try:
        if not arm.get("train"):
            _write_untrained(run_dir, handle, arm, model_name)
            return {"handle": handle, "training": None}
        resume = (run_dir / "checkpoint.pt").is_file()
        train(
            model,
            handle,
            data,
            TrainConfig(seq_len=table.seq_len, **settings),
            out_dir=run_dir,
            resume=resume,
            overwrite=not resume,
            model_name=model_name,
        )
    except BaseException:
        handle.remove()
        raise
    return {"handle": handle, "training": yaml.safe_load((run_dir / "recipe.yaml").read_text())["training"]}


def _finished(run_dir: Path) -> bool:
    """A run folder with its recipe and every state file the recipe names. Trained weights are not committed
    (.gitignore), so a fresh clone holds the recipes of the results but not their states: those arms train again
    (the committed ``recipe.yaml`` records what the result was made with)."""
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return False
    entries = (yaml.safe_load(path.read_text()) or {}).get("surgeries") or []
    return all((run_dir / e["state"]).is_file() for e in entries if isinstance(e, dict) and e.get("state"))


def _write_untrained(run_dir: Path, handle: Any, arm: dict, model_name: str) -> None:
    """A training-free arm's recipe folder (so ``tasks`` and users load it like a trained one)."""
    from safetensors.torch import save_file

    from ..recipe import write_recipe

    run_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, surgery in enumerate(handle.surgeries):
        entry = {"surgery": surgery.name, "args": surgery.config.to_dict(), **surgery.targets.to_json()}
        tensors = {k: v.detach().cpu().contiguous() for k, v in surgery.state_dict().items()}
        if tensors:
            entry["state"] = f"state-{i}-{surgery.name}.safetensors"
            save_file(tensors, str(run_dir / entry["state"]), metadata={"format": "pt"})
        entries.append(entry)
    description = arm.get("note") or f"training-free arm {arm['name']!r}"
    write_recipe(
        {"name": arm["name"], "description": description, "model": model_name, "surgeries": entries},
        run_dir / "recipe.yaml",
    )


def _measure(
    model: Any, table: TrainingTable, test: Any, calib: Any, label: str, ood: Any = None, only: Any = None
) -> dict:
    """The table's measures of the model as patched now (``only``: a subset of them, for a row that lacks them)."""
    import torch

    from .outliers import outlier_stats
    from .quant import perplexity, quantize_w8a8

    row: dict[str, Any] = {}
    wanted = set(table.measure if only is None else only)
    if "w8a8" in wanted:
        wanted.add("perplexity")  # the gap is to FP perplexity
    with torch.no_grad():
        if "perplexity" in wanted:
            row["ppl_fp"] = perplexity(model, test)
        if "ood" in wanted:
            row["ppl_ood"] = perplexity(model, ood)
        if "w8a8" in wanted:
            with quantize_w8a8(model, calib):
                row["ppl_w8a8"] = perplexity(model, test)
            row["w8a8_gap"] = row["ppl_w8a8"] - row["ppl_fp"]
        if "outliers" in wanted:
            stats = outlier_stats(model, test[: table.eval["outlier_windows"]], label=label)
            row.update(
                max_kurtosis=stats.max_kurtosis,
                max_inf_norm=stats.max_inf_norm,
                sink_share=stats.mean_sink_share,
                max_activation=stats.max_activation.value if stats.max_activation else None,
                stats=stats,
            )
    return row


def run_training_table(
    path: str | Path, out_dir: str | Path | None = None, models: list[str] | None = None
) -> Path:
    """Train and measure every (model, arm) of a training table; finished arms are reused (results land as they
    finish, so an interrupted table continues where it stopped)."""
    from ..models import load_model
    from ..train import prepare_data
    from .outliers_report import OutlierStats, plot_outliers

    table = load_training_table(path)
    out = Path(out_dir) if out_dir else Path("evals/results") / table.name
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "table.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": []}
    rows = {(r["model"], r["arm"]): r for r in results["rows"]}
    reports = []
    for model_name in models or table.models:
        model, tokenizer = load_model(model_name, dtype=table.dtype)
        data = prepare_data(
            tokenizer,
            table.data,
            table.seq_len,
            max_context=getattr(model.config, "max_position_embeddings", None),
        )
        test = _test_windows(tokenizer, table.data, table.seq_len, table.eval["test_windows"])
        calib = data.train[: table.eval["calib_windows"]]
        ood = (
            _ood_windows(tokenizer, table.seq_len, table.eval["ood_windows"])
            if "ood" in table.measure
            else None
        )
        runs = out / "runs" / _slug(model_name)
        all_stats = []
        for arm in table.arms:
            if not _runs_on(arm, model_name):
                continue
            run_dir = runs / arm["name"]
            patched = bool(arm.get("surgeries") or arm.get("from") or arm.get("train"))
            # an arm's per-layer outlier statistics, kept for the plot so that adding an arm re-measures no other
            stats_path = out / "stats" / f"{_slug(model_name)}--{_slug(arm['name'])}.json"
            old = rows.get((model_name, arm["name"]))
            # measures a finished row lacks (a measure added to the table, or outlier statistics not kept yet)
            missing = [
                m
                for m in table.measure
                if old is not None
                and (_MEASURED[m] not in old or (m == "outliers" and not stats_path.is_file()))
            ]
            if (
                old is not None
                and (not patched or _finished(run_dir))  # its recipe is on disk for the tasks
                and not missing
            ):
                if "outliers" in table.measure:
                    all_stats.append(OutlierStats.from_dict(json.loads(stats_path.read_text())))
                continue  # measured: nothing to redo
            started = time.perf_counter()
            handle, training = None, None
            if patched:
                trained = _train_arm(model, arm, table, data, run_dir, model_name, runs)
                handle, training = trained["handle"], trained["training"]
            try:
                row = _measure(model, table, test, calib, f"{arm['name']}", ood, missing if old else None)
            finally:
                if handle is not None:
                    handle.remove()
            if "stats" in row:
                stats = row.pop("stats")
                all_stats.append(stats)
                stats_path.parent.mkdir(parents=True, exist_ok=True)
                stats.to_json(stats_path)
            if old is not None:  # a finished row: keep what it measured, add what it lacked
                if any(key not in old for key in row):
                    old.update({k: v for k, v in row.items() if k not in old})
                    _write_results(out, results, table)
                continue
            row.update(
                model=model_name,
                arm=arm["name"],
                note=arm.get("note", ""),
                train_steps=training["steps"] if training else 0,
                train_tokens=training["tokens"] if training else 0,
                train_minutes=round(training["seconds"] / 60, 1) if training else 0.0,
                measure_seconds=round(time.perf_counter() - started, 1),
                test_windows=int(len(test)),
            )
            if arm.get("from"):  # the cost of the stages before this one counts too
                prior = next(
                    r for r in results["rows"] if r["model"] == model_name and r["arm"] == arm["from"]
                )
                row.update(
                    train_steps=row["train_steps"] + prior["train_steps"],
                    train_tokens=row["train_tokens"] + prior["train_tokens"],
                    train_minutes=round(row["train_minutes"] + prior["train_minutes"], 1),
                )
            results["rows"].append(row)
            rows[(model_name, arm["name"])] = row
            _write_results(out, results, table)
        if all_stats:
            plot_outliers(all_stats, out / f"outliers-{_slug(model_name)}.png")
        plot_validation_curves(runs, table.arms, out / f"validation-{_slug(model_name)}.png", model_name)
        if table.tasks:
            reports.append(_score_tasks(model_name, (model, tokenizer), table, runs, out))
            from .text_report import write_report

            write_report(reports, out, name="tasks")
        del model
    return out


def _write_results(out: Path, results: dict, table: TrainingTable) -> None:
    """Write ``table.json`` and ``table.md``. Rows another process wrote since this one read the file (a second
    ``reproduce --model`` on the same table) are kept: each run only adds or updates its own rows."""
    path = out / "table.json"
    if path.is_file():
        mine = {(r["model"], r["arm"]) for r in results["rows"]}
        on_disk = json.loads(path.read_text()).get("rows", [])
        results["rows"] += [r for r in on_disk if (r["model"], r["arm"]) not in mine]
    results["table"] = {
        "name": table.name,
        "data": table.data,
        "seq_len": table.seq_len,
        "eval": table.eval,
        "measure": list(table.measure),
    }
    for name, text in (
        ("table.json", json.dumps(results, indent=2) + "\n"),
        ("table.md", render_training_table(results, table)),
    ):
        tmp = out / f".{name}.tmp"  # replaced whole: a reader (or a second writer) never sees half a file
        tmp.write_text(text)
        tmp.replace(out / name)


def _score_tasks(
    model_name: str, loaded: tuple[Any, Any], table: TrainingTable, runs: Path, out: Path
) -> Any:
    """Every arm (the trained recipes in its run folder) on the table's offline lm-eval tasks, same docs, cached
    per arm by the recipe's fingerprint (state files included: a retrained arm is scored again)."""
    from ..recipe import find_recipe
    from .text import evaluate_arms
    from .text_results import Arm

    arms = [Arm("baseline")] + [
        Arm(arm["name"], find_recipe(runs / arm["name"]))
        for arm in table.arms
        if arm["name"] != "baseline" and _runs_on(arm, model_name)
    ]
    return evaluate_arms(
        model_name,
        arms,
        table.tasks,
        limit=table.limit,
        batch_size=table.batch_size,
        dtype=table.dtype,
        cache_dir=out / "cache",
        loaded=loaded,
        on_arm=lambda arm, status: print(f"[tasks] {model_name} / {arm}: {status}", flush=True),
    )


def _slug(name: str) -> str:
    """A folder name for a model alias, hub id or path (a path must not escape the output folder)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", str(name).strip("/")) or "model"
