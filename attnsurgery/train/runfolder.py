"""A training run's folder: its resumable checkpoint, the check made before a run starts, the warm start of a
fresh clone, and the finished folder, which is a recipe (``patch(model, folder)``)::

    runs/x/recipe.yaml                 # surgeries, targets, data, objective, losses, validation scores
    runs/x/state-0-gated_attention.safetensors
    runs/x/adapter/                    # what a surgery also exports (LoRA: a standard peft adapter)
    runs/x/checkpoint.pt               # resumable state (--resume), kept after the run
    runs/x/training.json               # the loss curve and validation history
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine import Engine
from ..surgery import Surgery
from .config import TrainConfig, TrainingError, TrainResult
from .data import TrainingData

CHECKPOINT = "checkpoint.pt"
RECIPE = "recipe.yaml"
HISTORY = "training.json"


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


def _fingerprint(model: nn.Module, surgeries: list[Surgery], config: TrainConfig, data: TrainingData) -> dict:
    cfg = model.config
    return {
        "model": {
            "model_type": getattr(cfg, "model_type", None),
            "num_layers": len(Engine.of(model).info.attention),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "vocab_size": getattr(cfg, "vocab_size", None),
            "name_or_path": str(getattr(cfg, "_name_or_path", "")),
        },
        "surgeries": [
            {"surgery": s.name, "args": s.config.to_dict(), **s.targets.to_json()} for s in surgeries
        ],
        "config": {
            k: getattr(config, k)
            for k in (
                "objective",
                "lr",
                "lora_lr",
                "batch_size",
                "seq_len",
                "kd_temperature",
                "seed",
                "warmup",
            )
        }
        # the learning rate at a step depends on ``steps`` only with a warm-up or a decay: only then does a resumed
        # run have to keep them (a constant-rate run may be continued to more steps; older checkpoints still match)
        | ({"schedule": config.schedule} if config.schedule != "constant" else {})
        | ({"steps": config.steps} if config.schedule != "constant" or config.warmup > 0 else {}),
        "data": {"source": data.source, "train_windows": int(data.train.shape[0])},
    }


def _diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, this run {b!r}")
    return out


def _warm_start(folder: Path, config: TrainConfig, data: TrainingData) -> tuple:
    """(step, train losses, per-term losses, validations, seconds, step seconds) of a finished run folder, after
    checking that it is this run (same objective, rates, batch, windows, seed and data)."""
    import yaml

    try:
        recipe = yaml.safe_load((folder / RECIPE).read_text()) or {}
        hist = json.loads((folder / HISTORY).read_text())
    except (OSError, ValueError) as err:
        raise TrainingError(f"warm_start {folder}: not a finished run folder ({err}).") from None
    training = recipe.get("training") or {}
    saved, now = training.get("config") or {}, dataclasses.asdict(config)
    keys = (
        "objective",
        "lr",
        "lora_lr",
        "batch_size",
        "seq_len",
        "seed",
        "schedule",
        "warmup",
        "kd_temperature",
    )
    problems = [f"{k}: folder {saved.get(k)!r}, this run {now[k]!r}" for k in keys if saved.get(k) != now[k]]
    seen = training.get("data") or {}
    if (seen.get("source"), seen.get("train_windows")) != (data.source, int(data.train.shape[0])):
        problems.append(f"data: folder {seen.get('source')!r}, this run {data.source!r}")
    if problems:
        raise TrainingError(f"warm_start {folder} was another run: " + "; ".join(problems[:4]) + ".")
    history = list(hist["train_loss"])
    return (
        len(history),
        history,
        {k: list(v) for k, v in (hist.get("parts") or {}).items()},
        list(hist.get("validation") or []),
        float(training.get("seconds") or 0.0),
        list(hist.get("step_seconds") or []),  # folders written before step times were kept have none
    )


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def check_run_folder(
    out: str | Path, *, resume: bool = False, overwrite: bool = False, checkpoint: str | None = CHECKPOINT
) -> None:
    """The one check of a training run's output folder (``train``, ``attnsurgery train``, ``linearize``), made
    before any model loads: a folder, not a file; not an earlier run's folder unless ``resume`` (continue it) or
    ``overwrite`` (replace it), never both; ``resume`` needs the run's ``checkpoint`` (``None``: the caller checks
    its own, e.g. per stage)."""
    out = Path(out)
    if resume and overwrite:
        raise TrainingError(
            f"--resume continues the run in {out} and --overwrite replaces it: give one of them, not both."
        )
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file; the output is a folder. Name a new or existing folder.")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise TrainingError(
            f"{out} already exists; pass --resume to continue that run or --overwrite to replace it."
        )
    if resume and checkpoint is not None and not (out / checkpoint).is_file():
        raise TrainingError(
            f"--resume: {out} holds no {checkpoint} to continue; start the run without --resume."
        )


# ----------------------------------------------------------------------------------------------------------
# The output folder: a recipe
# ----------------------------------------------------------------------------------------------------------


def write_run(
    out: Path,
    model: nn.Module,
    handle: Any,
    result: TrainResult,
    config: TrainConfig,
    data: TrainingData,
    model_name: str | None,
) -> Path:
    """Write the trained surgeries as a recipe folder (temporary names first, then renamed: never half-written)."""
    import yaml
    from safetensors.torch import save_file

    entries = []
    staged: list[tuple[Path, Path]] = []
    for i, surgery in enumerate(handle.surgeries):
        name = f"state-{i}-{surgery.name}.safetensors"
        tensors = {k: v.detach().cpu().contiguous() for k, v in surgery.state_dict().items()}
        entry = {"surgery": surgery.name, "args": surgery.config.to_dict(), **surgery.targets.to_json()}
        if tensors:
            tmp = out / (name + ".tmp")
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            staged.append((tmp, out / name))
            entry["state"] = name
        entries.append(entry)
        # what else the surgery ships as (LoRA: a peft adapter folder): written aside, renamed with the rest
        tmp_dir = out / f"export-{i}.tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        exported = surgery.export(model, tmp_dir)
        if exported is not None:
            staged.append((tmp_dir, out / exported))
    first, last = result.val_history[0], result.val_history[-1]
    best = next((r for r in result.val_history if r["step"] == result.best_step), last)
    kept = (
        best if config.keep == "best" else last
    )  # the numbers of the state this folder ships, not another's
    recipe = {
        "name": out.name,
        "description": (
            f"Trained with `attnsurgery train` on {data.source}: {config.objective}, {result.steps} steps. "
            f"Validation lm loss {first['lm']:.4f} -> {kept['lm']:.4f} at step {kept['step']} (the {config.keep} "
            "state, which this recipe ships; held-back calibration text)."
        ),
        "model": model_name,
        "surgeries": entries,
        "training": {
            "objective": config.objective,
            "steps": result.steps,
            "tokens": result.tokens,
            "seconds": round(result.seconds, 1),  # wall time, every session and pause included
            "median_step_seconds": (
                None if result.median_step_seconds is None else round(result.median_step_seconds, 3)
            ),
            "kept": f"{config.keep} (step {result.best_step if config.keep == 'best' else result.steps})",
            "config": dataclasses.asdict(config),
            "data": data.describe(),
            "final_train_loss": result.train_loss[-1] if result.train_loss else None,
            "validation": {
                "before": dict(first),
                "kept": dict(kept),
                "last": dict(last),
            },
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        },
    }
    tmp_recipe = out / (RECIPE + ".tmp")
    tmp_recipe.write_text(yaml.safe_dump(recipe, sort_keys=False, width=110))
    tmp_hist = out / (HISTORY + ".tmp")
    tmp_hist.write_text(
        json.dumps(
            {
                "train_loss": result.train_loss,
                "parts": result.parts,
                "validation": result.val_history,
                "step_seconds": result.step_seconds,
            }
        )
        + "\n"
    )
    for tmp, final in staged:
        if final.is_dir():
            shutil.rmtree(final)
        tmp.replace(final)
    tmp_hist.replace(out / HISTORY)
    tmp_recipe.replace(out / RECIPE)  # last: a folder with recipe.yaml is a finished run
    return out / RECIPE
