"""``finetune``: train copies of chosen base projections (full fine-tuning that ``remove()`` undoes exactly)."""

from .config import FinetuneConfig
from .surgery import FinetuneSurgery

SURGERY = FinetuneSurgery
__all__ = ["SURGERY", "FinetuneConfig", "FinetuneSurgery"]
