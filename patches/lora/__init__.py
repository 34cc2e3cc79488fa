"""``lora``: LoRA adapters (through peft) on a model's attention projections, as a removable surgery."""

from .config import LoraSurgeryConfig
from .surgery import LoraSurgery

SURGERY = LoraSurgery
__all__ = ["SURGERY", "LoraSurgery", "LoraSurgeryConfig"]
