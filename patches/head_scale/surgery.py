from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnsurgery.errors import SurgeryConfigError
from attnsurgery.surgery import AttentionCall, Stage, Surgery
from attnsurgery.targeting import per_layer_head

from .config import HeadScaleConfig


class HeadScaleSurgery(Surgery):
    """Multiply chosen heads' attention outputs (before ``o_proj``) by a factor.

    The per-head output primitive that VHR (scale vision-aware heads by alpha), MoH (route heads) and gated
    attention (sigmoid gates) build on. Runs after any attention kernel, so SDPA stays in use.

    >>> patch(model, "head_scale", heads={10: [0, 3]}, scale=0.0)   # silence two heads of layer 10
    """

    name = "head_scale"
    config_class = HeadScaleConfig
    summary = "Scale or silence chosen heads' outputs before o_proj (the primitive under VHR, MoH, gating)"
    paper = "Michel et al., Are Sixteen Heads Really Better than One?, NeurIPS 2019 (head masking)"
    stages = frozenset({Stage.HEAD_OUTPUT})
    example_args = {"scale": 0.3}

    def setup(self, model: Any, engine: Any) -> None:
        L, H = engine.info.num_layers, engine.info.num_heads
        scale = per_layer_head(self.config.scale, "scale", L, H, 1.0)
        targeted = torch.stack([self.targets.head_mask(layer) for layer in range(L)])  # (L, H)
        scale = torch.where(targeted, scale, torch.ones_like(scale)).float()
        if self.config.trainable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)

    def check_state(self) -> None:
        super().check_state()
        if bool((self.scale < 0).any()):
            raise SurgeryConfigError(
                f"head_scale: saved scales must be >= 0 like the scale argument; got {float(self.scale.detach().min())}."
            )

    def active_stages(self, layer_idx: int) -> frozenset[Stage]:
        if layer_idx in self.targets.layers and (
            self.config.trainable or bool((self.scale[layer_idx] != 1).any())
        ):
            return self.stages
        return frozenset()

    def head_output(self, attn_output: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        scale = self.scale[call.layer_idx].to(device=attn_output.device, dtype=attn_output.dtype)
        return attn_output * scale[None, None, :, None]  # (B, Tq, H, D)
