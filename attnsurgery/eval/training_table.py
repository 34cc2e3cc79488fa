"""Training tables: train each arm's surgeries, then measure outliers, FP and W8A8 perplexity on the test split.

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

Results: ``table.json`` (everything), ``table.md`` (the comparison with relative changes vs the baseline), one
``outliers-<model>.png`` per model (per-layer curves of every arm), and ``runs/<model>/<arm>/`` (the recipes).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError, did_you_mean

_TABLE_KEYS = {"name", "description", "kind", "models", "dtype", "data", "seq_len", "eval", "arms", "goals"}
_ARM_KEYS = {"name", "surgeries", "train", "note"}
_EVAL_KEYS = {"test_windows", "calib_windows", "outlier_windows"}


@dataclass
class TrainingTable:
    name: str
    models: list[str]
    arms: list[dict[str, Any]]
    data: str = "gutenberg_ppl"
    seq_len: int = 256
    dtype: str = "float32"
    eval: dict[str, int] = field(
        default_factory=lambda: {"test_windows": 24, "calib_windows": 4, "outlier_windows": 8}
    )
    description: str = ""
    goals: dict[str, Any] = field(default_factory=dict)


def _check(where: str, data: dict, allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            raise RecipeError(
                f"{where}: unknown key {key!r}.{did_you_mean(str(key), allowed)} Allowed: {', '.join(sorted(allowed))}."
            )


def is_training_table(path: str | Path) -> bool:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("kind") == "training"


def load_training_table(path: str | Path) -> TrainingTable:
    from ..train import TrainConfig

    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a training table is a YAML mapping.")
    _check(str(path), data, _TABLE_KEYS)
    arms = data.get("arms") or []
    if not arms or not isinstance(arms, list):
        raise RecipeError(f"{path}: 'arms' must be a non-empty list.")
    train_fields = set(TrainConfig.__dataclass_fields__) | {"lora"}
    names = set()
    for i, arm in enumerate(arms):
        where = f"{path}: arms[{i}]"
        if not isinstance(arm, dict) or "name" not in arm:
            raise RecipeError(f"{where}: each arm needs a 'name'.")
        _check(where, arm, _ARM_KEYS)
        _check(f"{where}.train", arm.get("train") or {}, train_fields)
        if arm["name"] in names:
            raise RecipeError(f"{where}: duplicate arm name {arm['name']!r}.")
        names.add(arm["name"])
        if arm.get("surgeries"):
            from ..recipe import parse_recipe

            parse_recipe({"surgeries": arm["surgeries"]}, where)  # names and arguments, before any training
        elif arm.get("train"):
            raise RecipeError(f"{where}: 'train' needs 'surgeries' to train.")
    eval_cfg = {"test_windows": 24, "calib_windows": 4, "outlier_windows": 8, **(data.get("eval") or {})}
    _check(f"{path}: eval", eval_cfg, _EVAL_KEYS)
    return TrainingTable(
        name=str(data.get("name") or path.stem),
        models=list(data.get("models") or []),
        arms=arms,
        data=str(data.get("data", "gutenberg_ppl")),
        seq_len=int(data.get("seq_len", 256)),
        dtype=str(data.get("dtype", "float32")),
        eval=eval_cfg,
        description=str(data.get("description") or ""),
        goals=dict(data.get("goals") or {}),
    )


def _test_windows(tokenizer: Any, source: str, seq_len: int, n: int) -> Any:
    """The test split of an offline corpus, packed like the training data (never trained on: the trainer refuses
    test splits)."""
    from ..tasks import load_split
    from ..train.data import pack_windows

    texts = [r["text"] for r in load_split(source, "test")]
    return pack_windows(tokenizer, texts, seq_len)[:n]


def _train_arm(
    model: Any, arm: dict, table: TrainingTable, data: Any, run_dir: Path, model_name: str
) -> dict:
    from ..api import SurgeryHandle, patch
    from ..recipe import find_recipe, parse_recipe
    from ..train import TrainConfig, train

    if (run_dir / "recipe.yaml").is_file():  # finished before: reuse
        handle = patch(model, find_recipe(run_dir))
        return {
            "handle": handle,
            "training": yaml.safe_load((run_dir / "recipe.yaml").read_text())["training"],
        }
    settings = dict(arm["train"])
    lora = settings.pop("lora", None)
    config = TrainConfig(seq_len=table.seq_len, **settings)
    surgeries = list(patch(model, parse_recipe({"surgeries": arm["surgeries"]})).surgeries)
    if lora:
        surgeries += patch(model, "lora", **lora).surgeries
    handle = SurgeryHandle(model, surgeries)
    resume = (run_dir / "checkpoint.pt").is_file()
    try:
        train(
            model,
            handle,
            data,
            config,
            out_dir=run_dir,
            resume=resume,
            overwrite=not resume,
            model_name=model_name,
        )
    except BaseException:
        handle.remove()
        raise
    return {"handle": handle, "training": yaml.safe_load((run_dir / "recipe.yaml").read_text())["training"]}


def _measure(model: Any, tokenizer: Any, table: TrainingTable, test: Any, calib: Any, label: str) -> dict:
    import torch

    from .outliers import outlier_stats
    from .quant import perplexity, quantize_w8a8

    with torch.no_grad():
        fp = perplexity(model, test)
        with quantize_w8a8(model, calib):
            w8a8 = perplexity(model, test)
        stats = outlier_stats(model, test[: table.eval["outlier_windows"]], label=label)
    return {
        "ppl_fp": fp,
        "ppl_w8a8": w8a8,
        "w8a8_gap": w8a8 - fp,
        "max_kurtosis": stats.max_kurtosis,
        "max_inf_norm": stats.max_inf_norm,
        "sink_share": stats.mean_sink_share,
        "max_activation": stats.max_activation.value if stats.max_activation else None,
        "stats": stats,
    }


def run_training_table(
    path: str | Path, out_dir: str | Path | None = None, models: list[str] | None = None
) -> Path:
    """Train and measure every (model, arm) of a training table; finished arms are reused (results land as they
    finish, so an interrupted table continues where it stopped)."""
    from ..models import load_model
    from ..train import prepare_data
    from .outliers import plot_outliers

    table = load_training_table(path)
    out = Path(out_dir) if out_dir else Path("evals/results") / table.name
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "table.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": []}
    done = {(r["model"], r["arm"]) for r in results["rows"]}
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
        all_stats = []
        for arm in table.arms:
            run_dir = out / "runs" / _slug(model_name) / arm["name"]
            started = time.perf_counter()
            handle, training = None, None
            if arm.get("surgeries"):
                trained = _train_arm(model, arm, table, data, run_dir, model_name)
                handle, training = trained["handle"], trained["training"]
            try:
                row = _measure(model, tokenizer, table, test, calib, f"{arm['name']}")
            finally:
                if handle is not None:
                    handle.remove()
            all_stats.append(row.pop("stats"))
            if (model_name, arm["name"]) in done:
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
            results["rows"].append(row)
            results["table"] = {
                "name": table.name,
                "data": table.data,
                "seq_len": table.seq_len,
                "eval": table.eval,
            }
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            (out / "table.md").write_text(render_training_table(results, table))
        plot_outliers(all_stats, out / f"outliers-{_slug(model_name)}.png")
    return out


def _slug(name: str) -> str:
    """A folder name for a model alias, hub id or path (a path must not escape the output folder)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", str(name).strip("/")) or "model"


def _rel(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0 or not math.isfinite(value):
        return ""
    return f" ({(value - base) / abs(base) * 100:+.0f}%)"


def render_training_table(results: dict, table: TrainingTable) -> str:
    lines = [
        f"# {table.name}",
        "",
        table.description.strip(),
        "",
        f"Test split of `{table.data}` ({results['rows'][0]['test_windows'] if results['rows'] else 0} windows of "
        f"{table.seq_len} tokens; no arm trains on it). Relative changes are against the model's baseline arm.",
        "",
        "| model | arm | FP ppl | W8A8 ppl | W8A8 gap | max kurtosis | max inf-norm | first-token share (L>=2) | train steps / tokens / min |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["model"]: r for r in results["rows"] if r["arm"] == "baseline"}
    for r in results["rows"]:
        b = base.get(r["model"], {})
        share = r["sink_share"]
        lines.append(
            f"| {r['model']} | {r['arm']} | {r['ppl_fp']:.3f}{_rel(r['ppl_fp'], b.get('ppl_fp'))} | "
            f"{r['ppl_w8a8']:.1f} | {r['w8a8_gap']:.1f}{_rel(r['w8a8_gap'], b.get('w8a8_gap'))} | "
            f"{r['max_kurtosis']:.0f}{_rel(r['max_kurtosis'], b.get('max_kurtosis'))} | "
            f"{r['max_inf_norm']:.0f}{_rel(r['max_inf_norm'], b.get('max_inf_norm'))} | "
            f"{'' if share is None else f'{share:.3f}'}{_rel(share, b.get('sink_share'))} | "
            f"{r['train_steps']} / {r['train_tokens']:,} / {r['train_minutes']} |"
        )
    if table.goals:
        lines += ["", "Goals: " + "; ".join(f"{k}: {v}" for k, v in table.goals.items())]
    return "\n".join(lines) + "\n"
