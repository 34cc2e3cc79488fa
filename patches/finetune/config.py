from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnsurgery.surgery import SurgeryConfig, arg
from attnsurgery.targeting import name_list


@dataclass
class FinetuneConfig(SurgeryConfig):
    """Arguments of ``finetune``. ``layers=`` picks the decoder layers whose projections train."""

    targets: Any = arg(
        None,
        doc="Projection modules whose weights train, by their name inside a decoder layer (comma-separated or a "
        "list), as for `lora`. Default: every projection of the attention module (`attnsurgery train "
        "--train-base attention`).",
        kind="names",
    )
    bias: bool = arg(True, doc="Train the projections' biases too (where they have one).")
    init: str = arg(
        "copy",
        doc="'copy': the trainable weights start as exact copies (the identity until trained); 'random': copies "
        "plus seeded noise of 10% of each tensor's std (a visibly different model; for tests).",
        choices=("copy", "random"),
    )

    def target_names(self) -> list[str] | None:
        """The names asked for, or None for every projection of the attention module."""
        return name_list(self.targets)
