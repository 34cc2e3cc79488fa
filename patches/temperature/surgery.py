from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnsurgery.errors import SurgeryConfigError
from attnsurgery.surgery import AttentionCall, Stage, Surgery
from attnsurgery.targeting import per_layer_head

from .config import TemperatureConfig


class TemperatureSurgery(Surgery):
    """Temperature on the attention logits, folded into the query so the fused SDPA kernel stays in use.

    ``logits_i = q_i.k / (sqrt(d) * tau) * (1 + c * log(n_i))`` where ``n_i`` is the number of real tokens query
    ``i`` sees (its index among unpadded tokens + 1, absolute under a KV cache: the reference lit-gpt code's
    ``row_length[:T]`` is only right without a cache). Paper: Zhang et al., "Selective Attention: Enhancing
    Transformer through Principled Context Control", NeurIPS 2024 (arXiv 2411.12892).

    >>> patch(model, "temperature", tau=0.8)                 # sharper attention everywhere
    >>> patch(model, "temperature", c=0.05, layers="2:")     # position temperature
    """

    name = "temperature"
    config_class = TemperatureConfig
    summary = "Fixed (per-layer/head) and Selective-Attention position temperature; stays on the fused kernel"
    paper = "Zhang et al., Selective Attention, NeurIPS 2024 (arXiv 2411.12892)"
    stages = frozenset({Stage.QUERY})
    example_args = {"tau": 0.7, "c": 0.1}

    def setup(self, model: Any, engine: Any) -> None:
        info = engine.info
        L, H = info.num_layers, info.num_heads
        cfg = self.config
        inv_tau = 1.0 / per_layer_head(cfg.tau, "tau", L, H, 1.0)
        coef = per_layer_head(
            math.exp(-math.exp(cfg.beta)) if cfg.beta is not None else cfg.c, "c", L, H, 0.0
        )
        targeted = torch.stack([self.targets.head_mask(layer) for layer in range(L)])  # (L, H)
        inv_tau = torch.where(targeted, inv_tau, torch.ones_like(inv_tau))
        coef = torch.where(targeted, coef, torch.zeros_like(coef))
        # state (saved with save_surgery); float32 like the model's compute
        self._max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if not isinstance(self._max_positions, int) or self._max_positions < 2:
            self._max_positions = None
        self._check_positive_factor(float(coef.min()))
        self.register_buffer("inv_tau", inv_tau.float())
        if cfg.trainable:  # same state_dict key either way, so a fitted table loads into a plain surgery
            self.coef = nn.Parameter(coef.float())
        else:
            self.register_buffer("coef", coef.float())

    def check_state(self) -> None:
        super().check_state()
        if bool((self.inv_tau <= 0).any()):
            raise SurgeryConfigError(
                f"temperature: saved 1/tau must be positive (tau > 0); got {float(self.inv_tau.detach().min())}."
            )
        low = float(self.coef.detach().min())
        if low < self.config.min_c:
            raise SurgeryConfigError(
                f"temperature: the saved position coefficients go down to c={low:.6g}, below min_c={self.config.min_c} "
                "(the range c is validated against as an argument). A table fitted with c < 0 loads with the bound it "
                "was fitted under: args: {min_c: <bound>} in its recipe."
            )
        self._check_positive_factor(low)

    def _check_positive_factor(self, low: float) -> None:
        """1 + c log n must stay positive over the model's context, or attention inverts at long range."""
        if low < 0 and self._max_positions and 1 + low * math.log(self._max_positions) <= 0:
            raise SurgeryConfigError(
                f"temperature: c={low:.6g} makes 1 + c log(n) reach 0 within this model's {self._max_positions} "
                f"positions (attention would invert); c must stay above {-1 / math.log(self._max_positions):.4f}."
            )

    def active_stages(self, layer_idx: int) -> frozenset[Stage]:
        # trainable: targeted layers stay routed even at c = 0, or the coefficients would get no gradient
        if self.config.trainable and layer_idx in self.targets.layers:
            return self.stages
        # exact identity on a layer: skip it, so identity settings cost nothing
        if bool((self.inv_tau[layer_idx] != 1).any() or (self.coef[layer_idx] != 0).any()):
            return self.stages
        return frozenset()

    def query(self, query: torch.Tensor, scaling: float, call: AttentionCall) -> tuple[torch.Tensor, float]:
        inv_tau = self.inv_tau[call.layer_idx].to(query.device)  # (H,)
        coef = self.coef[call.layer_idx].to(query.device)  # (H,)
        factor = inv_tau[None, :, None]  # (1, H, 1)
        if self.config.trainable or bool(coef.any()):
            log_n = torch.log1p(call.positions.to(query.device).float())  # (B, Tq): log(n_i), n_i = pos + 1
            factor = factor * (1 + coef[None, :, None] * log_n[:, None, :])  # (B, H, Tq)
        # one rounding in bf16 / fp16 (of the product), not two (of the factor, then of the product)
        return (query.float() * factor.unsqueeze(-1)).to(query.dtype), scaling
