from __future__ import annotations

import math
from dataclasses import dataclass

from attnsurgery.errors import SurgeryConfigError
from attnsurgery.surgery import SurgeryConfig, arg

#: gate forms: where the gate's logits come from and how many there are per token
FORMS = ("elementwise", "headwise", "head_slice")


@dataclass
class GatedAttentionConfig(SurgeryConfig):
    """Arguments of ``gated_attention``. Defaults are the exact identity: zero weights, ``gate_init=0.5`` (bias 0)
    and ``gate_scale`` chosen as ``1 / sigmoid(bias)`` = 2, so every gate starts at ``2 * sigmoid(0) = 1``.
    Pick layers and heads with the common ``layers=`` / ``heads=`` targeting (untargeted heads keep gate 1)."""

    form: str = arg(
        "elementwise",
        doc="'elementwise': one gate per channel, sigmoid(X W + b) with W: hidden -> heads*head_dim (Qiu et al. "
        "G1, their best); 'headwise': one gate per head, W: hidden -> heads (Qiu et al.); 'head_slice': one gate "
        "per head from that head's hidden/heads slice of X (Bondarenko et al.'s default per-token gate). X is "
        "the hidden state the attention module receives (after the pre-norm) at the query token.",
        choices=FORMS,
    )
    gate_init: float = arg(
        0.5,
        doc="Initial sigmoid value: the bias starts at logit(gate_init) (Bondarenko et al.'s attn_gate_init; "
        "they used 0.25 and 0.5).",
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
    )
    gate_scale: float | None = arg(
        None,
        doc="Factor on the sigmoid, gate = gate_scale * sigmoid(X W + b), so gates lie in (0, gate_scale). None: "
        "1 / sigmoid(logit(gate_init)), which makes every gate start at 1 (the identity; 2 with the default "
        "gate_init, Qiu et al.'s retrofit '2 sigmoid'; Bondarenko et al.'s fine-tuning mode 1/p). 1.0: the papers' "
        "plain sigmoid, gates in (0, 1), not the identity at init.",
        low=0.0,
        low_open=True,
    )
    init_std: float = arg(
        0.0,
        doc="Std of the normal init of the gate weights (0: zero weights, the exact identity with the default "
        "gate_scale; Bondarenko et al.'s fine-tuning mode uses 0.001). Biases start at logit(gate_init).",
        low=0.0,
    )
    seed: int = arg(0, doc="Seed of the random weight init (used when init_std > 0).", low=0)
    sparsity: float = arg(
        0.0,
        doc="Weight of the sparsity penalty regularizer() returns: sparsity * mean gate over targeted layers, heads "
        "and real tokens of the last forward (Qiu et al.: sparse gates are what remove the attention sink). "
        "0: no regularizer.",
        low=0.0,
    )

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise SurgeryConfigError(f"argument seed={self.seed!r} must be a non-negative integer.")
        for name in ("gate_init", "init_std", "sparsity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SurgeryConfigError(f"argument {name}={value!r} must be a number.")
        scale = self.gate_scale
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise SurgeryConfigError(
                    f"argument gate_scale={scale!r} must be a positive finite number or None (gates start at 1)."
                )
            self.gate_scale = float(scale)
