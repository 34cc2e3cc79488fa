"""Budget curves: where a trained surgery lands as its training budget grows.

A budget table (``kind: budget``, e.g. ``evals/budget.yaml``) lists arms, each a model and one or more training
stages, and budgets in tokens. For every arm and budget the runner trains to that many tokens and scores the
test-split perplexity of the state it reached, against the unpatched model on the same windows::

    attnsurgery reproduce evals/budget.yaml                         # every arm, every budget (resumable)
    python -m attnsurgery.eval.budget evals/budget.yaml --arm moh-learned-75 --up-to 100000

Stage 1 of an arm is one run that each budget *continues* (constant learning rate, data order a function of the
step: a run continued to more steps is the run trained that long at once; ``test_resume_continues_exactly``).
Later stages start from stage 1's state at that budget (kept as a snapshot) and train their share of the budget
afresh. Every point is written as it lands (``curve.json``, ``curve.md``, ``curve.png``), each stage's state at
each budget is kept as a recipe folder (``runs/<arm>/<stage>-<tokens>/``) and an interrupted run continues from
its checkpoint, so a curve grows across sessions. A run stopped before its budget (Ctrl-C, SIGTERM, ``--minutes``)
also keeps its state as ``runs/<arm>/<run>@partial/``: small files to commit, from which a fresh clone continues.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import AttnSurgeryError, did_you_mean
from ..recipe import RecipeError
from .budget_def import (  # noqa: F401  (re-exported: the table definition lives there)
    BudgetArm,
    BudgetError,
    BudgetTable,
    Stage,
    is_budget_table,
    load_budget_table,
)
from .budget_report import extrapolate, plot_curve, render_curve  # noqa: F401  (extrapolate: re-exported)

SHIP_LIMIT_BYTES = 20 * 1024 * 1024  # a shipped recipe's states, at most


# -- running ------------------------------------------------------------------------------------------------------
def _trained_steps(run_dir: Path) -> int:
    """Steps a finished run folder reached: 0 when there is none, or when its state files are absent (a fresh clone
    holds the committed recipe.yaml of a run, not its weights)."""
    from .training_table import _finished

    if not _finished(run_dir):
        return 0
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    return int((recipe.get("training") or {}).get("steps") or 0)


def _snapshot(run_dir: Path, dest: Path) -> None:
    """The recipe and state files of a finished run (no checkpoint), written whole."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir, tmp, ignore=shutil.ignore_patterns("checkpoint.pt", "*.tmp"))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _timing(runs: Path, arm: BudgetArm, budget: int) -> dict[str, list[float | None]]:
    """Each stage's training time at a budget, from its snapshot's recipe: ``train_seconds`` is the run's wall time
    over every session (stage 1's adds up across budgets), ``step_seconds`` its median step (None where the run
    kept no step times). A point's own wall time covers only the process that finished it."""
    seconds: list[float | None] = []
    median: list[float | None] = []
    for stage in arm.stages:
        recipe = runs / f"{stage.name}@{budget}" / "recipe.yaml"
        saved = (yaml.safe_load(recipe.read_text()) or {}) if recipe.is_file() else {}
        training = saved.get("training") or {}
        seconds.append(training.get("seconds"))
        median.append(training.get("median_step_seconds"))
    return {"train_seconds": seconds, "step_seconds": median}


def _read_curve(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"arms": {}, "baselines": {}}


def _write_curve(out: Path, curve: dict[str, Any], table: BudgetTable) -> None:
    for name, text in (
        ("curve.json", json.dumps(curve, indent=2, sort_keys=True) + "\n"),
        ("curve.md", render_curve(curve, table)),
    ):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)  # whole or the previous one: never half-written
    plot_curve(
        curve,
        out / "curve.png",
        title=f"{table.name}: test perplexity against training tokens ({table.path})",
    )


def _stage_surgeries(model: Any, stage: Stage, prior: Path | None) -> Any:
    """Patch a stage's trainable surgeries onto ``model`` (after the frozen earlier stage, if any)."""
    from ..recipe import parse_recipe
    from ..train.compose import compose_for_training

    return compose_for_training(
        model,
        frozen=prior,
        surgery=parse_recipe({"surgeries": stage.surgeries}) if stage.surgeries else None,
        lora=stage.train.get("lora"),
    )


def _train_stage(
    model: Any, arm: BudgetArm, stage: Stage, steps: int, run_dir: Path, prior: Path | None, data: Any
) -> Any:
    """Train (or continue) one stage's run to ``steps``; returns the patched handle holding the trained state."""
    from ..train import TrainConfig, TrainingInterrupted, train

    handle = _stage_surgeries(model, stage, prior)
    try:
        done = _trained_steps(run_dir)
        settings = {k: v for k, v in stage.train.items() if k != "lora"}
        settings.setdefault("val_every", max(1, steps))
        settings.setdefault("save_every", 25)
        config = TrainConfig(steps=steps, seq_len=arm.seq_len, keep="last", **settings)
        if done == steps:  # reached before: load what it shipped
            from ..recipe import find_recipe

            handle.remove()
            from ..api import patch

            return patch(model, find_recipe(run_dir))
        if done > steps:
            raise BudgetError(
                f"arm {arm.name!r}: {run_dir} is already at {done} steps, past this budget's {steps}; its earlier "
                "points were measured when it passed them (curve.json keeps them)."
            )
        resume = (run_dir / "checkpoint.pt").is_file()
        # a fresh clone: continue the last committed state of this run (a budget's snapshot, or the partial one an
        # earlier session stopped at); its optimiser starts afresh
        warm = None if resume else _latest_snapshot(run_dir.parent, run_dir.name, steps)
        if warm is not None:
            _load_states(handle, warm)
        try:
            train(
                model,
                handle,
                data,
                config,
                out_dir=run_dir,
                resume=resume,
                overwrite=not resume,
                model_name=arm.model,
                warm_start=warm,
                label=f"{arm.name} · {stage.name} to {steps} steps",
            )
        except TrainingInterrupted:
            _keep_partial(model, handle, config, data, run_dir, arm.model)
            raise
        handle.warm_start = warm
    except BaseException:
        handle.remove()
        raise
    return handle


def _latest_snapshot(runs: Path, run: str, steps: int) -> Path | None:
    """The committed snapshot of run ``run`` (a stage-1 ``<stage>@<budget>``, or ``<run>@partial``) with the most
    steps (at most ``steps``) whose state files are present."""
    best: tuple[int, Path | None] = (0, None)
    for folder in runs.glob(f"{run}@*"):
        done = _trained_steps(folder)
        if best[0] < done <= steps:
            best = (done, folder)
    return best[1]


def _partial(run_dir: Path) -> Path:
    """Where a stopped run keeps its state at the step it stopped: small files a session can commit, so a run longer
    than one session continues on a fresh clone (the checkpoint, with the optimiser's moments, is not committed)."""
    return run_dir.with_name(run_dir.name + "@partial")


def _load_states(handle: Any, folder: Path) -> None:
    """Load a run folder's state files into ``handle``'s surgeries (the same stage, patched the same way)."""
    from ..api import _load_state, _read_state
    from ..engine import Engine

    entries = (yaml.safe_load((folder / "recipe.yaml").read_text()) or {}).get("surgeries") or []
    names = [s.name for s in handle.surgeries]
    if [e.get("surgery") for e in entries] != names:
        raise BudgetError(
            f"{folder} holds the surgeries {[e.get('surgery') for e in entries]}, this stage patches {names}: it was "
            "another run. Delete it to train this stage from its start."
        )
    engine = Engine.of(handle.model)
    for entry, surgery in zip(entries, handle.surgeries):
        if entry.get("state"):
            _load_state(surgery, _read_state(folder / entry["state"]), engine)


def _keep_partial(model: Any, handle: Any, config: Any, data: Any, run_dir: Path, model_name: str) -> None:
    """After an interrupt: write the checkpoint's state as a finished-looking run folder ``<run>@partial`` (recipe,
    history, state files; whole or not at all), which :func:`_latest_snapshot` continues from on a fresh clone."""
    import torch

    from ..train import TrainResult
    from ..train.runfolder import write_run
    from ..train.trainer import load_trainable_state

    ckpt_path = run_dir / "checkpoint.pt"
    if not ckpt_path.is_file():
        return
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if not ckpt["val_history"] or not ckpt["history"]:
        return  # stopped before its first step: nothing to keep
    # the checkpoint's state (what a resume continues), not the live one a step may have moved
    load_trainable_state(model, list(handle.surgeries), ckpt["state"])
    steps = int(ckpt["step"])
    result = TrainResult(
        out_dir=None,
        steps=steps,
        train_loss=ckpt["history"],
        val_history=ckpt["val_history"],
        best_step=ckpt["best"][1],
        seconds=float(ckpt["seconds"]),
        tokens=steps * config.batch_size * int(data.train.shape[1]),
        parts=ckpt["parts"],
        step_seconds=list(ckpt.get("step_seconds", [])),
    )
    dest = _partial(run_dir)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_run(tmp, model, handle, result, config, data, model_name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def run_budget_table(
    path: str | Path,
    out_dir: str | Path | None = None,
    arms: list[str] | None = None,
    up_to: int | None = None,
    on_point: Any = None,
) -> Path:
    """Train and score every (arm, budget) not in ``curve.json`` yet, in budget order per arm; ``up_to`` stops at
    that many tokens. Returns the output folder."""
    import torch

    from ..models import load_model
    from ..train import prepare_data
    from .quant import perplexity
    from .training_table import _test_windows

    table = load_budget_table(path)
    chosen = table.arms
    if arms:
        known = [a.name for a in table.arms]
        for name in arms:
            if name not in known:
                raise BudgetError(
                    f"{table.path}: no arm {name!r}.{did_you_mean(name, known)} Arms: {', '.join(known)}."
                )
        chosen = [a for a in table.arms if a.name in arms]
    out = Path(out_dir) if out_dir else Path("evals/results") / table.name
    out.mkdir(parents=True, exist_ok=True)
    curve = _read_curve(out / "curve.json")
    loaded: dict[str, Any] = {}
    # points and runs are per device: a GPU session's points sit beside the CPU ones (tagged), never replacing them
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for arm in chosen:
        budgets = [b for b in table.budgets if up_to is None or arm.tokens(b) <= up_to]
        entry = curve["arms"].setdefault(
            arm.name, {"model": arm.model, "goal_pct": arm.goal_pct, "points": []}
        )
        train_text = arm.data or table.data
        entry.update(model=arm.model, goal_pct=arm.goal_pct, eval_seq_len=arm.eval_seq_len, note=arm.note,
                     data=train_text)
        done = {p["budget"] for p in entry["points"] if p.get("device", "cpu") == device}
        todo = [b for b in budgets if b not in done]
        runs = out / ("runs" if device == "cpu" else f"runs-{device}") / arm.name
        # points made before the arm scored W8A8 (or on a machine without it): scored now from their kept state
        unscored = [
            p
            for p in entry["points"]
            if arm.w8a8_calib_windows
            and "ppl_w8a8" not in p
            and p.get("device", "cpu") == device
            and _trained_steps(out / p["state"]) > 0
        ]
        if not todo and not unscored:
            continue
        if arm.model not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[arm.model] = load_model(arm.model, dtype=table.dtype)
            loaded[arm.model][0].to(device)  # the baseline and every point are scored where training runs
        model, tokenizer = loaded[arm.model]
        max_context = getattr(model.config, "max_position_embeddings", None)
        data = prepare_data(tokenizer, train_text, arm.seq_len, max_context=max_context, max_val_windows=8)
        test = _test_windows(tokenizer, table.test_data, arm.eval_seq_len, arm.eval_windows)
        key = f"{arm.model}|{table.test_data}|{arm.eval_seq_len}x{len(test)}" + (
            "" if device == "cpu" else f"|{device}"
        )
        if key not in curve["baselines"]:
            with torch.no_grad():
                curve["baselines"][key] = perplexity(model, test)
        baseline = curve["baselines"][key]
        # the calibration windows and the unpatched model's W8A8 perplexity, for an arm that scores W8A8
        w8a8: dict[str, Any] | None = None
        if arm.w8a8_calib_windows:
            # the calibration split of the test corpus, as the outlier tables calibrate (evals/outliers.yaml)
            calib = prepare_data(tokenizer, table.test_data, arm.eval_seq_len, max_context=max_context).train[
                : arm.w8a8_calib_windows
            ]
            wkey = f"{key}|w8a8x{len(calib)}"
            if wkey not in curve["baselines"]:
                curve["baselines"][wkey] = _w8a8_perplexity(model, calib, test)
            w8a8 = {"calib": calib, "baseline": curve["baselines"][wkey]}
            from ..api import patch
            from ..recipe import find_recipe

            for point in unscored:
                with patch(model, find_recipe(out / point["state"])):
                    point.update(_w8a8_fields(model, w8a8, test, point["ppl"], baseline))
                _write_curve(out, curve, table)
        for point in entry["points"]:  # points made before they kept their training time: from the snapshots
            if "train_seconds" not in point and point.get("device", "cpu") == device:
                point.update(_timing(runs, arm, point["budget"]))
        for budget in todo:
            started = time.perf_counter()
            steps = arm.stage_steps(budget)
            prior: Path | None = None
            warm_from: Path | None = None
            for k, (stage, n) in enumerate(zip(arm.stages, steps)):
                # stage 1 is one run continued across budgets; a later stage starts afresh from the earlier
                # stage's state at this budget
                run_dir = runs / stage.name if k == 0 else runs / f"{stage.name}-{budget}"
                handle = _train_stage(model, arm, stage, n, run_dir, prior, data)
                warm_from = getattr(handle, "warm_start", None) or warm_from
                snapshot = runs / f"{stage.name}@{budget}"
                try:
                    if k < len(arm.stages) - 1:
                        handle.remove()
                    else:
                        with torch.no_grad():
                            ppl = perplexity(model, test)
                        scored = {} if w8a8 is None else _w8a8_fields(model, w8a8, test, ppl, baseline)
                finally:
                    handle.remove()
                _snapshot(run_dir, snapshot)
                # the run went past where an earlier session stopped: its partial state is spent
                if _trained_steps(_partial(run_dir)) <= n:
                    shutil.rmtree(_partial(run_dir), ignore_errors=True)
                prior = snapshot
            point = {
                "budget": budget,
                "tokens": arm.tokens(budget),
                "steps": steps,
                "ppl": ppl,
                "baseline_ppl": baseline,
                "rel_pct": 100.0 * (ppl / baseline - 1.0),
                **scored,
                # this process's time (training, snapshots, scoring); the runs' training time is train_seconds
                "seconds": round(time.perf_counter() - started, 1),
                **_timing(runs, arm, budget),
                "device": device,
                "state": str(prior.relative_to(out)),
            }
            if warm_from is not None:  # not one uninterrupted run: say so
                point["warm_start"] = str(warm_from.relative_to(out))
            # stages trained under autocast (the curve's points are otherwise fp32 training; scoring is fp32 always)
            precision = {
                st.name: st.train["mixed_precision"]
                for st in arm.stages
                if st.train.get("mixed_precision", "no") != "no"
            }
            if precision:
                point["mixed_precision"] = precision
            entry["points"] = sorted(
                [*entry["points"], point], key=lambda p: (p.get("device", "cpu"), p["tokens"])
            )
            _write_curve(out, curve, table)
            if on_point is not None:
                on_point(arm, point)
    if not (out / "curve.json").is_file():
        _write_curve(out, curve, table)
    return out


def _w8a8_perplexity(model: Any, calib: Any, test: Any) -> float:
    """Simulated static W8A8 perplexity: ranges calibrated on ``calib`` with the model as patched now."""
    import torch

    from .quant import perplexity, quantize_w8a8

    with torch.no_grad(), quantize_w8a8(model, calib):
        return perplexity(model, test)


def _w8a8_fields(
    model: Any, w8a8: dict[str, Any], test: Any, ppl: float, baseline: float
) -> dict[str, float]:
    """A point's W8A8 perplexity and its gap (W8A8 minus FP) relative to the unpatched model's gap."""
    ppl_w8a8 = _w8a8_perplexity(model, w8a8["calib"], test)
    base_gap = w8a8["baseline"] - baseline
    return {
        "ppl_w8a8": ppl_w8a8,
        "baseline_ppl_w8a8": w8a8["baseline"],
        # None: the unpatched model loses nothing to W8A8 here, so there is no gap to shrink
        "w8a8_gap_pct": 100.0 * ((ppl_w8a8 - ppl) / base_gap - 1.0) if base_gap else None,
    }


# -- shipping -----------------------------------------------------------------------------------------------------
def shipped_point(curve: dict[str, Any], arm: str) -> dict[str, Any] | None:
    """The arm's point trained on the most tokens (any device; the last recorded among equals) that kept its
    states, or None. Never chosen by its perplexity: the test split a point is scored on is the split the curve
    and the eval tables report, and picking the lowest there would flatter the number the recipe ships with."""
    points = [p for p in (curve.get("arms", {}).get(arm) or {}).get("points", []) if p.get("state")]
    return max(reversed(points), key=lambda p: p["tokens"]) if points else None


def ship_states(
    path: str | Path,
    out_dir: str | Path | None = None,
    arms: list[str] | None = None,
    recipes_root: str | Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Ship each arm's longest-trained state (:func:`shipped_point`) as a recipe: ``<recipes_root>/<arm.recipe>.yaml`` with its state files in the
    folder of the same name beside it, so ``attnsurgery eval MODEL --recipe <arm.recipe>`` needs no training.

    ``recipes_root`` defaults to the packaged recipes (the repository's ``recipes/`` in a development install).
    Nothing is written unless every chosen arm can ship; an existing recipe is replaced only with ``overwrite``.
    """
    from ..recipe import _packaged_root, write_recipe

    table = load_budget_table(path)
    out = Path(out_dir) if out_dir else Path("evals/results") / table.name
    curve = _read_curve(out / "curve.json")
    root = Path(recipes_root) if recipes_root is not None else _packaged_root()
    chosen = [a for a in table.arms if not arms or a.name in arms]
    for name in arms or []:
        if name not in [a.name for a in table.arms]:
            known = [a.name for a in table.arms]
            raise BudgetError(
                f"{table.path}: no arm {name!r}.{did_you_mean(name, known)} Arms: {', '.join(known)}."
            )
    plans = []
    for arm in chosen:
        if arm.recipe is None:
            if arms:
                raise BudgetError(f"{table.path}: arm {arm.name!r} names no 'recipe' to ship its state as.")
            continue
        point = shipped_point(curve, arm.name)
        if point is None:
            if arms:
                raise BudgetError(
                    f"arm {arm.name!r} has no point in {out / 'curve.json'} yet: train it first."
                )
            continue
        state_dir = out / point["state"]
        if not (state_dir / "recipe.yaml").is_file():
            raise BudgetError(
                f"arm {arm.name!r}: the shipped point's state folder {state_dir} holds no recipe.yaml (its states were "
                "not kept); train that budget again or ship from the machine that trained it."
            )
        source = yaml.safe_load((state_dir / "recipe.yaml").read_text()) or {}
        files = [state_dir / s["state"] for s in source.get("surgeries", []) if s.get("state")]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise BudgetError(
                f"arm {arm.name!r}: state file {missing[0]} is missing; train that budget again."
            )
        size = sum(f.stat().st_size for f in files)
        if size > SHIP_LIMIT_BYTES:
            raise BudgetError(
                f"arm {arm.name!r}: its state files hold {size / 2**20:.1f} MB, over the {SHIP_LIMIT_BYTES // 2**20} MB "
                "a shipped recipe may carry; keep it as a run folder instead."
            )
        target = root / f"{arm.recipe}.yaml"
        if target.exists() and not overwrite:
            raise BudgetError(
                f"{target} exists; pass --overwrite to replace it with {arm.name!r}'s longest-trained state."
            )
        plans.append((arm, point, source, files, target))
    written = []
    for arm, point, source, files, target in plans:
        stem = target.with_suffix("")
        tmp = stem.with_name(stem.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, tmp / f.name)  # ordinary file modes, not the trainer's
        surgeries = []
        for s in source["surgeries"]:
            s = dict(s)
            if s.get("state"):
                s["state"] = f"{stem.name}/{Path(s['state']).name}"
            surgeries.append(s)
        training = dict(source.get("training") or {})
        # where the state came from and what it measured, for `attnsurgery list` readers and the tests
        training["point"] = {
            "table": str(table.path),
            "arm": arm.name,
            **{
                k: point[k]
                for k in (
                    "tokens",
                    "ppl",
                    "baseline_ppl",
                    "rel_pct",
                    "ppl_w8a8",
                    "baseline_ppl_w8a8",
                    "w8a8_gap_pct",
                    "device",
                )
                if k in point
            },
            "eval": {"data": table.test_data, "seq_len": arm.eval_seq_len, "windows": arm.eval_windows},
        }
        what = (arm.note or arm.name).rstrip(". ")
        recipe = {
            "name": arm.recipe,
            "description": (
                f"{what[:1].upper() + what[1:]}. After {point['tokens']:,} training tokens, test perplexity "
                f"{point['rel_pct']:+.1f}% against the unpatched model ({point['ppl']:.3f} vs "
                f"{point['baseline_ppl']:.3f}, goal +{arm.goal_pct:g}%) on {arm.eval_windows} windows of "
                f"{arm.eval_seq_len} tokens of {table.test_data}'s test split. The longest-trained point of arm {arm.name} of "
                f"{table.path} (training text: {arm.data or table.data})."
                + (
                    f" Static W8A8 perplexity {point['ppl_w8a8']:,.3f} against the unpatched model's "
                    f"{point['baseline_ppl_w8a8']:,.3f}: a W8A8 gap {point['w8a8_gap_pct']:+.1f}% against its gap."
                    if point.get("w8a8_gap_pct") is not None
                    else ""
                )
            ),
            "model": arm.model,
            "surgeries": surgeries,
            "training": training,
            "notes": (
                f"Shipped by `python -m attnsurgery.eval.budget {table.path} --ship --arm {arm.name}` from "
                f"{point['state']}; regenerate the point with `python -m attnsurgery.eval.budget {table.path} --arm "
                f"{arm.name}`."
            ),
        }
        # the states move in first, then the recipe that names them is written (and checked to load)
        shutil.rmtree(stem, ignore_errors=True)
        tmp.rename(stem)
        written.append(write_recipe(recipe, target))
    return written


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from ..cli import route_library_noise
    from ..train.config import TrainingInterrupted  # here: the package pulls in torch

    route_library_noise()

    parser = argparse.ArgumentParser(
        prog="python -m attnsurgery.eval.budget", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("table", help="a budget table (kind: budget), e.g. evals/budget.yaml")
    parser.add_argument("--arm", action="append", help="only this arm (repeatable)")
    parser.add_argument(
        "--up-to", type=int, default=None, help="stop after the budgets of at most this many tokens"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="stop cleanly after this many minutes (a session's time): the run keeps its checkpoint and a small "
        "<run>@partial state to commit, from which a fresh clone continues",
    )
    parser.add_argument("--out", default=None, help="output folder (default evals/results/<table name>)")
    parser.add_argument(
        "--ship",
        action="store_true",
        help="train nothing: write each arm's longest-trained state as its shipped recipe (the arm's 'recipe:' name)",
    )
    parser.add_argument(
        "--recipes", default=None, help="with --ship: the recipes folder (default: the packaged one)"
    )
    parser.add_argument("--overwrite", action="store_true", help="with --ship: replace a shipped recipe")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    if args.minutes is not None and not (args.minutes > 0 and math.isfinite(args.minutes)):
        console.print(
            f"[red]error:[/red] --minutes {args.minutes}: give a positive number of minutes, e.g. 150."
        )
        return 2

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    # SIGINT (also when a background shell started us with it ignored) and SIGTERM stop the run the same way: the
    # trainer saves its checkpoint, the finished points are on disk, the next run continues
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if args.minutes is not None and not args.ship:
        signal.signal(signal.SIGALRM, stop)  # the time is up: the same clean stop as Ctrl-C
        signal.alarm(max(1, round(args.minutes * 60)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    def report(arm: BudgetArm, point: dict[str, Any]) -> None:
        console.print(
            f"[bold]{arm.name}[/bold] {point['tokens']:,} tokens: ppl {point['ppl']:.3f} "
            f"({point['rel_pct']:+.1f}% vs {point['baseline_ppl']:.3f}; goal +{arm.goal_pct:g}%) in "
            f"{point['seconds'] / 60:.1f} min"
        )

    if args.ship:
        try:
            written = ship_states(args.table, args.out, args.arm, args.recipes, overwrite=args.overwrite)
        except AttnSurgeryError as err:
            console.print(f"[red]error:[/red] {err}")
            return 5 if isinstance(err, RecipeError) else 2
        for path in written:
            console.print(f"shipped {path}")
        if not written:
            console.print("nothing to ship: no arm with a 'recipe' has a point yet")
        return 0
    try:
        out = run_budget_table(args.table, args.out, args.arm, args.up_to, on_point=report)
    except TrainingInterrupted:
        console.print(
            "stopped; the finished points are in curve.json. The same command continues the run from its "
            "checkpoint, or on a fresh clone from its <run>@partial state (commit that folder's files)."
        )
        return 130
    except AttnSurgeryError as err:
        console.print(f"[red]error:[/red] {err}")
        return 5 if isinstance(err, RecipeError) else 2
    except KeyboardInterrupt:
        console.print(
            "stopped; the finished points are in curve.json and the run continues from its checkpoint"
        )
        return 130
    console.print(f"curve: {out / 'curve.json'}, {out / 'curve.md'}, {out / 'curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
