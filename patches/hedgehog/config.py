from __future__ import annotations

from dataclasses import dataclass

from attnsurgery.errors import SurgeryConfigError
from attnsurgery.surgery import SurgeryConfig, arg


@dataclass
class HedgehogConfig(SurgeryConfig):
    """Arguments of ``hedgehog``. The defaults are LoLCATs' sliding-window hybrid (window 64, feature_dim 64,
    gamma 0.1) with identity-initialised feature maps: a linear-time model that needs the two-stage conversion
    (``attnsurgery linearize``) to be good. ``window=None`` puts every key in the softmax window: exactly the
    model's softmax attention, computed by the same hybrid kernel (the identity setting)."""

    window: int | None = arg(
        64,
        doc="Softmax window: each query attends with softmax to its last `window` keys (itself included) and with "
        "the linear feature-map terms to all older keys, under one shared normaliser (LoLCATs' sliding-window "
        "hybrid). None: every key is in the window (exactly softmax attention; the identity). Use linear_only "
        "for pure Hedgehog linear attention.",
        low=1,
    )
    linear_only: bool = arg(
        False,
        doc="True: no softmax window at all, every key enters through the feature maps (Hedgehog's pure linear "
        "attention; the decode state is then only S and z).",
    )
    feature_dim: int = arg(
        64,
        doc="Output width of each feature map's projection W (head_dim x feature_dim, per head); phi(x) = "
        "[softmax(xW), softmax(-xW)] has 2 * feature_dim dims.",
        low=1,
    )
    gamma: float = arg(
        0.1,
        doc="Initial softmax-window factor gamma_h = sigmoid(w_h) per head (LoLCATs' init_window_factor "
        "-2.197, i.e. 0.1); trained in stage 1.",
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
    )
    affine: bool = arg(
        False,
        doc="Linear terms weighted by 1 - gamma instead of 1 (LoLCATs' affine_attention_factors).",
    )
    chunk: int = arg(
        128,
        doc="Query rows per block of the chunked kernel: memory O(chunk x (chunk + window)), time O(n). "
        "Results do not depend on it beyond float rounding (128: fastest of 64/128/256 at 2k-8k tokens on a CPU).",
        low=1,
    )
    init: str = arg(
        "identity",
        doc="'identity': W is the (rectangular) identity, as LoLCATs' zero_init; 'random': a seeded random W "
        "(scale 1/sqrt(head_dim)) so tests see untrained maps that differ between q and k.",
        choices=("identity", "random"),
    )
    seed: int = arg(0, doc="Seed of init='random'.", low=0)

    def validate(self) -> None:
        for name in ("window", "feature_dim", "chunk", "seed"):
            value = getattr(self, name)
            if value is None and name == "window":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise SurgeryConfigError(
                    f"argument {name}={value!r} must be an integer"
                    + (" (or None: every key in the softmax window)." if name == "window" else ".")
                )
        for name in ("linear_only", "affine"):
            if not isinstance(getattr(self, name), bool):
                raise SurgeryConfigError(f"argument {name}={getattr(self, name)!r} must be true or false.")
        super().validate()
        if self.linear_only and self.window is None:
            raise SurgeryConfigError(
                "hedgehog: linear_only=True has no softmax window, and window=None puts every key in it; pick one."
            )

    @property
    def softmax_window(self) -> int | None:
        """The kernel's window: None = every key, 0 = none (linear only), else the window size."""
        return 0 if self.linear_only else self.window
