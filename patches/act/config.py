from __future__ import annotations

from dataclasses import dataclass

from attnsurgery.errors import SurgeryConfigError
from attnsurgery.surgery import SurgeryConfig, arg


@dataclass
class ActConfig(SurgeryConfig):
    """Arguments of ``act`` (the paper's names). The defaults are the reference code's settings; ``beta=1``
    is the identity. Choose heads with the common ``layers=`` / ``heads=`` targeting (the reference applies ACT
    to calibrated heads on layers 2..30 of Llama-2-7B, i.e. ``layers="2:31"``)."""

    beta: float = arg(
        0.4,
        doc="Scale on the attention each non-first sink receives; the removed mass goes to the other tokens in "
        "proportion to their attention (1 = identity, 0 = remove sinks).",
        low=0.0,
        high=1.0,
    )
    threshold: float | None = arg(
        None,
        doc="Absolute sink threshold on a key's mean received attention (reference code: 0.1; 0.15 for "
        "MT-bench). Default 0.1 unless alpha is given.",
        low=0.0,
        high=1.0,
        low_open=True,
    )
    alpha: float | None = arg(
        None,
        doc="The paper's form: a key is a sink when its mean received attention exceeds alpha / N, N the number of "
        "real tokens in the row (0.1 = 5/50, so the two agree for ~50-token prompts). Give threshold or alpha.",
        low=0.0,
        low_open=True,
    )
    decode: str = arg(
        "frozen",
        doc="At cached decode steps: 'frozen' keeps the sink set detected at prefill (new tokens are never sinks); "
        "'recompute' detects again from the attention of the current step's queries.",
        choices=("frozen", "recompute"),
    )

    def validate(self) -> None:
        super().validate()
        if self.threshold is not None and self.alpha is not None:
            raise SurgeryConfigError(
                "give the sink threshold as threshold or as alpha (alpha / N), not both."
            )

    def resolved_args(self) -> dict:
        """The arguments as they apply (what a handle's repr shows): the default threshold 0.1 named, not None."""
        out = self.to_dict()
        if self.threshold is None and self.alpha is None:
            out["threshold"] = self.absolute_threshold
        return out

    @property
    def absolute_threshold(self) -> float:
        return 0.1 if self.threshold is None else self.threshold
