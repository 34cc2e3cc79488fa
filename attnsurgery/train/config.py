"""How to train and what a run returns: :class:`TrainConfig` (checked before any model loads), :class:`TrainResult`
and the trainer's errors. The loop is :mod:`.trainer`; the run folder it writes, :mod:`.runfolder`."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AttnSurgeryError, did_you_mean
from .objectives import parse_objective


class TrainingError(AttnSurgeryError):
    """A run that cannot start or continue (bad settings, a checkpoint from another run, an existing folder)."""


class TrainingDiverged(AttnSurgeryError):
    """The loss became NaN/inf; the last good checkpoint is kept."""

    exit_code = 8


class TrainingInterrupted(AttnSurgeryError):
    """Ctrl-C: a checkpoint was saved; ``--resume`` continues."""

    exit_code = 130


SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainConfig:
    """How to train. ``batch_size`` is global (all processes x accumulation steps together)."""

    objective: str = "lm"
    steps: int = 100
    lr: float = 1e-2  # surgery parameters (gates, temperatures, routers, feature maps)
    lora_lr: float = (
        1e-4  # model weights: LoRA adapters (peft), as LoLCATs and most LoRA recipes, and finetune's copies
    )
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    warmup: float = 0.0  # fraction of steps with a linear warm-up
    # after the warm-up: "constant", or a "cosine" / "linear" decay towards 0 at ``steps``
    schedule: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    kd_temperature: float = 1.0
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (accelerate)
    val_every: int = 25
    save_every: int = 25
    keep: str = "last"  # "last" | "best" (the state with the lowest validation objective, step 0 included)
    patience: int | None = None  # stop after this many validations without improvement
    seed: int = 0

    def validate(self) -> None:
        parse_objective(self.objective)

        def number(value: Any, whole: bool) -> bool:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return False
            return isinstance(value, int) if whole else math.isfinite(value)

        # (name, whole number?, test, the valid values in words)
        checks = [
            ("steps", True, lambda v: v >= 1, "a whole number >= 1"),
            ("lr", False, lambda v: v > 0, "a number > 0"),
            ("lora_lr", False, lambda v: v > 0, "a number > 0"),
            ("batch_size", True, lambda v: v >= 1, "a whole number >= 1"),
            ("grad_accum", True, lambda v: v >= 1, "a whole number >= 1"),
            ("seq_len", True, lambda v: v >= 8, "a whole number >= 8"),
            ("warmup", False, lambda v: 0 <= v < 1, "a fraction of the steps in [0, 1)"),
            ("weight_decay", False, lambda v: v >= 0, "a number >= 0"),
            ("val_every", True, lambda v: v >= 1, "a whole number >= 1"),
            ("save_every", True, lambda v: v >= 1, "a whole number >= 1"),
            ("kd_temperature", False, lambda v: v > 0, "a number > 0"),
            ("seed", True, lambda v: True, "a whole number"),
        ]
        for name, whole, ok, what in checks:
            value = getattr(self, name)
            if not (number(value, whole) and ok(value)):
                raise TrainingError(f"train: {name}={value!r} is out of range: it must be {what}.")
        choices = [
            ("schedule", SCHEDULES),
            ("mixed_precision", ("no", "bf16", "fp16")),
            ("keep", ("last", "best")),
        ]
        for name, allowed in choices:
            value = getattr(self, name)
            if value not in allowed:
                raise TrainingError(
                    f"train: {name}={value!r} is not one of {list(allowed)}.{did_you_mean(str(value), allowed)}"
                )
        if self.patience is not None and not (number(self.patience, True) and self.patience >= 1):
            raise TrainingError(
                f"train: patience={self.patience!r} is out of range: it must be None or a whole number >= 1."
            )
        if self.max_grad_norm is not None and not (
            number(self.max_grad_norm, False) and self.max_grad_norm > 0
        ):
            raise TrainingError(f"train: max_grad_norm={self.max_grad_norm!r} must be None or a number > 0.")


@dataclass
class TrainResult:
    out_dir: Path | None
    steps: int
    train_loss: list[float]  # per optimiser step (the objective, regularisers included)
    val_history: list[dict[str, float]]  # {"step", "objective", "lm"} per validation
    best_step: int
    seconds: float
    tokens: int
    parts: dict[str, list[float]] = field(default_factory=dict)  # per objective term, per step
    step_seconds: list[float] = field(default_factory=list)  # wall time per step, across resumes

    @property
    def median_step_seconds(self) -> float | None:
        """The run's typical step time: a median, so a pause or a busy minute does not move it."""
        return statistics.median(self.step_seconds) if self.step_seconds else None

    @property
    def final_val(self) -> dict[str, float]:
        return self.val_history[-1]
