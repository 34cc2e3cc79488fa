"""lm-eval's ``custom_dataset`` hook for the task YAMLs next to this file.

lm-eval imports this file by path (``!function _lmeval.load`` resolves against the YAML's folder), not as
part of the ``attnsurgery.tasks`` package, so it must stand alone: no relative imports. It reads the JSONL
files next to itself, which is what makes the tasks work from any working directory and from an installed
wheel, and it builds in-memory datasets, so nothing touches the Hub or the datasets cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("calibration", "test")


def load(task: str, **_: Any) -> Any:
    """Return a ``datasets.DatasetDict`` with the ``calibration`` and ``test`` splits of ``task``.

    lm-eval calls this as ``custom_dataset(**metadata, **dataset_kwargs)``; the YAML's ``dataset_kwargs``
    names the task, and metadata (version, anything passed with ``--metadata``) is ignored.
    """
    import datasets

    splits = {}
    for split in SPLITS:
        path = DATA_DIR / f"{task}.{split}.jsonl"
        with open(path, encoding="utf-8") as f:
            splits[split] = datasets.Dataset.from_list([json.loads(line) for line in f])
    return datasets.DatasetDict(splits)
