"""Training a surgery's own parameters with the model frozen: built on the core, never imported by it.

* :mod:`.trainer` (the loop), :mod:`.config` (its settings), :mod:`.objectives` (the loss terms), :mod:`.data`
  (the text), :mod:`.runfolder` (checkpoints and the finished folder, a recipe) -- the one training loop, shared by every trainable surgery
  and LoRA: ``attnsurgery train`` and the position-temperature fit (``calibrate temperature``, which passes its
  own train/validation windows as :class:`TrainingData`, its head tying and ``c >= min_c`` bound as a gradient
  hook and ``after_step``, and keeps the best table with ``keep="best"`` and ``patience``).
* :mod:`.compose` -- :func:`~.compose.compose_for_training`, what a run trains patched in one order (an earlier
  stage frozen, the surgery, LoRA, finetuned copies).
* :mod:`.freeze` -- :func:`~.freeze.frozen`, the model frozen in eval mode (``from attnsurgery.train.freeze import frozen``).

A surgery's ``calibrate.py`` (``patches/<name>/calibrate.py``) may use these; core modules never do.
"""

from __future__ import annotations

from .config import TrainConfig, TrainingDiverged, TrainingError, TrainingInterrupted, TrainResult
from .data import DataError, TrainingData, load_texts, pack_windows, prepare_data
from .objectives import OBJECTIVES, ObjectiveError, parse_objective
from .runfolder import check_run_folder
from .trainer import train

__all__ = [
    "OBJECTIVES",
    "DataError",
    "ObjectiveError",
    "TrainConfig",
    "TrainResult",
    "check_run_folder",
    "TrainingData",
    "TrainingDiverged",
    "TrainingError",
    "TrainingInterrupted",
    "load_texts",
    "pack_windows",
    "parse_objective",
    "prepare_data",
    "train",
]
