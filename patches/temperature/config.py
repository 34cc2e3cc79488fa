from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnsurgery.errors import SurgeryConfigError
from attnsurgery.surgery import SurgeryConfig, arg, numbers_in


@dataclass
class TemperatureConfig(SurgeryConfig):
    """Arguments of the ``temperature`` surgery. Defaults are the identity."""

    tau: Any = arg(
        1.0,
        doc="Fixed temperature: logits are divided by tau (tau < 1 sharpens). A number, a list with one value "
        "per query head, or {layer: number | list}.",
        low=0.0,
        low_open=True,
        kind="numbers",
    )
    c: Any = arg(
        0.0,
        doc="Selective Attention position coefficient: logits_i *= 1 + c * log(n_i), n_i = real tokens visible "
        "to query i (absolute under a KV cache). A number, per-head list, or {layer: ...}. At least min_c.",
        kind="numbers",
    )
    min_c: float = arg(
        0.0,
        doc="Lowest c allowed (0: the paper's range, attention only sharpens with position). Below 0 attention may "
        "flatten with position; 1 + c log n must stay positive over the model's context, which is checked when "
        "the surgery is installed. Fitted tables carry the bound they were fitted under.",
        high=0.0,
    )
    beta: float | None = arg(
        None,
        doc="The reference code's parametrisation of the position coefficient, c = exp(-exp(beta)) "
        "(beta=2 -> c=6.2e-4). Give c or beta, not both.",
    )
    trainable: bool = arg(
        False,
        doc="Make the position coefficients (the (layers, heads) table c) a trainable parameter, e.g. to fit them "
        "with `attnsurgery calibrate temperature`; tau stays fixed.",
    )

    def validate(self) -> None:
        super().validate()
        low = [x for x in numbers_in(self.c) if x < self.min_c]
        if low:
            raise SurgeryConfigError(
                f"argument c={low[0]!r} is below min_c={self.min_c} (default 0, the paper's range: attention only "
                "sharpens with position); pass min_c < 0 to let attention flatten with position."
            )
        if self.beta is not None and self.c not in (0, 0.0):
            raise SurgeryConfigError("give the position coefficient as c or as beta, not both.")
