from __future__ import annotations

import os
import sys
from pathlib import Path

# tests import the tiny-model factory as a plain module
sys.path.insert(0, str(Path(__file__).parent))
# never reach for the Hub from tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
