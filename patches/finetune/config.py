from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnsurgery.surgery import SurgeryConfig, arg


@dataclass
class FinetuneConfig(SurgeryConfig):
    """Arguments of ``finetune``. ``layers=`` picks the decoder layers whose projections train."""

    targets: Any = arg(
        None,
        doc="Projection modules whose weights train, by their name inside a decoder layer (comma-separated or a "
        "list), as for `lora`. Default: every projection of the attention module (`attnsurgery train "
        "--train-base attention`).",
    )
    bias: bool = arg(True, doc="Train the projections' biases too (where they have one).")
    init: str = arg(
        "copy",
        doc="'copy': the trainable weights start as exact copies (the identity until trained); 'random': copies "
        "plus seeded noise of 10% of each tensor's std (a visibly different model; for tests).",
        choices=("copy", "random"),
    )

    def target_names(self) -> list[str] | None:
        if self.targets is None:
            return None
        names = self.targets.split(",") if isinstance(self.targets, str) else list(self.targets)
        return [str(n).strip() for n in names if str(n).strip()]
