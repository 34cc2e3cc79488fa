from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnsurgery.surgery import SurgeryConfig, arg


@dataclass
class HeadScaleConfig(SurgeryConfig):
    """Arguments of ``head_scale``. Pick heads with the common ``heads=`` / ``layers=`` targeting."""

    scale: Any = arg(
        1.0,
        doc="Factor on each targeted head's output (0 silences it, 2 doubles it). A number, a per-head list, "
        "or {layer: number | list}.",
        low=0.0,
        kind="numbers",
    )
    trainable: bool = arg(False, doc="Make the per-head scales trainable parameters (e.g. to learn gates).")
