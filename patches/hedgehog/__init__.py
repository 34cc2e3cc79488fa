"""``hedgehog``: Hedgehog / LoLCATs linear attention with trainable softmax-mimicking feature maps and the
sliding-window hybrid (Zhang et al., ICLR 2024, arXiv 2402.04347; Zhang et al., ICLR 2025, arXiv 2410.10254),
plus the two-stage conversion command ``attnsurgery linearize`` (:mod:`.linearize`).

The surgery is imported on first use (module ``__getattr__``), so the CLI can import :mod:`.linearize` to build
its parser without importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SURGERY", "HedgehogConfig", "HedgehogSurgery"]


def __getattr__(name: str) -> Any:
    if name in ("SURGERY", "HedgehogSurgery"):
        from .surgery import HedgehogSurgery

        return HedgehogSurgery
    if name == "HedgehogConfig":
        from .config import HedgehogConfig

        return HedgehogConfig
    raise AttributeError(name)
