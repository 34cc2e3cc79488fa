"""Training a surgery's own parameters with the model frozen: built on the core, never imported by it.

* :mod:`.fit` -- the temperature fit's loop, the seed of the shared trainer: Adam on one parameter tensor,
  next-token loss over token windows, validation with early stopping, best parameters kept
  (``from attnsurgery.train.fit import fit, frozen``).
* :mod:`.trainer`, :mod:`.objectives`, :mod:`.data` -- the shared trainer of every trainable surgery and LoRA.

A surgery's ``calibrate.py`` (``patches/<name>/calibrate.py``) may use these; core modules never do.
"""

from __future__ import annotations

from .data import DataError, TrainingData, load_texts, pack_windows, prepare_data
from .objectives import OBJECTIVES, ObjectiveError, parse_objective
from .trainer import TrainConfig, TrainingDiverged, TrainingError, TrainingInterrupted, TrainResult, train

__all__ = [
    "OBJECTIVES",
    "DataError",
    "ObjectiveError",
    "TrainConfig",
    "TrainResult",
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
