from __future__ import annotations

import math
from dataclasses import dataclass

from attnsurgery.errors import SurgeryConfigError
from attnsurgery.surgery import SurgeryConfig, arg

#: where the routing scores come from
ROUTERS = ("query_norm", "learned")
#: how kept heads are weighted in the forward pass
GATES = ("binary", "weighted")


@dataclass
class MoHConfig(SurgeryConfig):
    """Arguments of ``moh``. Head counts depend on the model, so ``shared`` / ``top_k`` / ``active`` are resolved
    (and checked against its number of heads) when the surgery is set up; see :meth:`resolve`.

    Defaults are MoH-LLaMA3's: the first half of the heads shared (int(0.5 H)), a quarter of all heads (int(0.25 H))
    picked per token by the parameter-free query-norm router, binary gates: 75% of heads active.
    """

    router: str = arg(
        "query_norm",
        doc="'query_norm': the released MoH-LLaMA3 router, training-free: per token the L2 norm of each routed "
        "head's query, over its std across heads, softmax, top-k (binary gates). 'learned': the paper's router "
        "(MoH-ViT attention.py): softmax(W_r x) over routed heads, top-k, shared-head weights softmax(W_s x) and "
        "the two-stage balance [a1, a2] = 2 softmax(W_h x), x the hidden state the attention module receives; "
        "trainable (fp32), with the load-balance loss as regularizer().",
        choices=ROUTERS,
    )
    shared: int | float | None = arg(
        None,
        doc="Number of shared heads (heads 0 .. shared-1, always active). None: half of the heads, rounded down "
        "(MoH-LLaMA3's int(0.5 H)). Must be below the number of heads.",
        low=0,
    )
    top_k: int | None = arg(
        None,
        doc="Routed heads each token activates, out of the heads - shared routed ones. None: from 'active' if "
        "given, else a quarter of all heads rounded down (MoH-LLaMA3's int(0.25 H): 8 of 32), at least 1 and at "
        "most every routed head. top_k = all routed heads is the identity.",
        low=1,
    )
    active: float | None = arg(
        None,
        doc="Alternative to top_k: the fraction of all heads active per token; top_k = round(active * heads) - "
        "shared (halves round up). Give top_k or active, not both.",
        low=0.0,
        high=1.0,
        low_open=True,
    )
    gates: str = arg(
        "binary",
        doc="'binary': kept heads pass unscaled, others are zero (the released MoH-LLaMA3 inference; with the "
        "learned router the gradient reaches it straight-through, as if weighted). 'weighted' (learned router "
        "only): kept heads are scaled by the paper's gates a1 * shared weight / a2 * renormalised routed weight "
        "x top_k.",
        choices=GATES,
    )
    init_std: float | None = arg(
        None,
        doc="Std of the normal init of the learned router's routing weights W_r (W_s and W_h start at zero). "
        "None: 1/sqrt(3 hidden), nn.Linear's default scale as in the paper, for gates='binary' (binary gates "
        "are the identity at top_k = all whatever the weights); 0 for gates='weighted', where only zero weights "
        "give every kept head the weight 1 (the identity at top_k = all).",
        low=0.0,
    )
    seed: int = arg(0, doc="Seed of the learned router's random init.", low=0)
    balance_loss: float = arg(
        0.01,
        doc="beta, the weight of the load-balance loss regularizer() returns for the learned router: "
        "beta * mean over layers of L_b = mean_i(P_i f_i) E^2 (P: mean routing probability, f: fraction of real "
        "tokens that picked routed head i, E routed heads; the paper's 0.01). 0: no regularizer.",
        low=0.0,
    )
    skip_compute: bool = arg(
        True,
        doc="True: a (token, head) pair routed off is never computed (per routed head, only the queries routed "
        "to it attend: the surgery's own kernel). False: every head is computed by the model's own kernel and "
        "the outputs are multiplied by the gates (the released code's way; the reference the fast path is "
        "tested against).",
    )

    def validate(self) -> None:
        super().validate()
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise SurgeryConfigError(
                f"argument top_k={self.top_k!r} must be a whole number of heads or None."
            )
        shared = self.shared
        if shared is not None and (
            isinstance(shared, bool)
            or not isinstance(shared, (int, float))
            or (isinstance(shared, float) and shared >= 1)
        ):
            raise SurgeryConfigError(
                f"argument shared={shared!r} must be a whole number of heads (e.g. 4), a fraction of the heads "
                "below 1 (e.g. 0.5), or None."
            )
        if self.active is not None and (
            isinstance(self.active, bool) or not isinstance(self.active, (int, float))
        ):
            raise SurgeryConfigError(f"argument active={self.active!r} must be a fraction in (0, 1] or None.")
        if self.top_k is not None and self.active is not None:
            raise SurgeryConfigError(
                f"give top_k (routed heads per token) or active (fraction of all heads), not both "
                f"(got top_k={self.top_k}, active={self.active})."
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise SurgeryConfigError(f"argument seed={self.seed!r} must be a non-negative integer.")
        if not isinstance(self.skip_compute, bool):
            raise SurgeryConfigError(f"argument skip_compute={self.skip_compute!r} must be true or false.")
        for name in ("balance_loss", "init_std"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise SurgeryConfigError(f"argument {name}={value!r} must be a number.")
        if self.router == "query_norm" and self.gates == "weighted":
            raise SurgeryConfigError(
                "gates='weighted' needs router='learned': the query-norm router is the released MoH-LLaMA3 one, "
                "which keeps heads with binary gates (its softmax weights are never trained)."
            )

    def resolve(self, num_heads: int) -> tuple[int, int]:
        """``(shared, top_k)`` for a model with ``num_heads`` query heads, or a :class:`SurgeryConfigError` that
        names the fix."""
        if self.shared is None:
            shared = num_heads // 2
        elif isinstance(self.shared, float):
            shared = math.floor(self.shared * num_heads)
        else:
            shared = self.shared
        if shared >= num_heads:
            raise SurgeryConfigError(
                f"moh: shared={shared} leaves no routed head on this model ({num_heads} heads); use "
                f"shared <= {num_heads - 1}."
            )
        routed = num_heads - shared
        if self.top_k is not None:
            top_k = self.top_k
        elif self.active is not None:
            top_k = math.floor(self.active * num_heads + 0.5) - shared
        else:
            top_k = min(routed, max(1, num_heads // 4))  # MoH-LLaMA3's routed_head = int(0.25 H)
        if not 1 <= top_k <= routed:
            what = f"top_k={top_k}" if self.active is None else f"active={self.active} (top_k={top_k})"
            raise SurgeryConfigError(
                f"moh: {what} is out of range on this model: {num_heads} heads, {shared} shared, so top_k must "
                f"lie in [1, {routed}] ({routed} = every routed head, the identity); lower 'shared' to route more "
                "heads."
            )
        return shared, top_k
