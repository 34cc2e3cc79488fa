from __future__ import annotations

from dataclasses import dataclass

from attnsurgery.surgery import SurgeryConfig, arg


def paper_layers(num_layers: int) -> list[int]:
    """The paper's layers for LLaVA-1.5 / LLaVA-NeXT (32 layers: layer 1 plus the last 14, 18..31), relative to
    depth: layer 1 plus the last ``round(14 / 32 * L)`` layers."""
    last = max(1, round(14 * num_layers / 32))
    return sorted({min(1, num_layers - 1), *range(num_layers - last, num_layers)})


@dataclass
class VhrConfig(SurgeryConfig):
    """Arguments of ``vhr`` (the paper's names). ``alpha=2`` is the paper's default; ``alpha=1`` is the identity.
    Layers: the common ``layers=`` targeting; with none given, the paper's layer 1 plus the last 14/32 of the
    depth (``paper_layers``)."""

    alpha: float = arg(
        2.0,
        doc="Factor on the outputs of the selected vision-aware heads (1 = identity; the paper uses 2 and "
        "reports degenerate output at 4).",
        low=0.0,
    )
    paper_layers: bool = arg(
        True,
        doc="With no `layers` given, act on the paper's layers: layer 1 and the last 14/32 of the layers "
        "(1, 18..31 on a 32-layer LLaVA). False: every layer.",
    )
    outlier_filter: bool = arg(
        True,
        doc="Eq. 6: zero the divergence of heads that are outliers (> mean + std over the layer's heads) both in "
        "divergence and in text-only output norm, before the median test (the paper's 'outlier VHR' ablation "
        "turns it off).",
    )
