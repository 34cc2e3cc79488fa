from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnsurgery import rowblock
from attnsurgery.errors import SurgeryConfigError
from attnsurgery.surgery import AttentionCall, Stage, Surgery
from attnsurgery.targeting import module_device

from .config import GatedAttentionConfig


class GateProjection(nn.Module):
    """One layer's gate logits from the hidden state X the attention module receives.

    ``elementwise``: ``X @ weight.T + bias`` with weight (H*D, hidden) -> (B, T, H, D);
    ``headwise``: weight (H, hidden) -> (B, T, H, 1);
    ``head_slice``: head h reads only X's h-th slice of width hidden/H, weight (H, hidden/H) -> (B, T, H, 1).
    Parameters are fp32 whatever the model's dtype (sigmoid gates near 1 need the precision to train). The
    product ``X W`` runs in the activations' dtype when that is bf16/fp16 (tensor cores: an fp32 GEMM of the
    elementwise form's hidden -> H*D size made a bf16 7B prefill 1.8x slower on an H200, docs/gpu.md), as autocast
    runs it in training; the bias is added in fp32, so zero weights give exactly the fp32 bias (the identity init).
    """

    def __init__(
        self, form: str, hidden: int, num_heads: int, head_dim: int, device: torch.device | None
    ) -> None:
        super().__init__()
        self.form, self.num_heads, self.head_dim = form, num_heads, head_dim
        shape = {
            "elementwise": (num_heads * head_dim, hidden),
            "headwise": (num_heads, hidden),
            "head_slice": (num_heads, hidden // num_heads),
        }[form]
        self.weight = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(shape[0], dtype=torch.float32, device=device))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        low = hidden_states.dtype in (torch.bfloat16, torch.float16)
        dtype = hidden_states.dtype if low else self.weight.dtype
        x = hidden_states.to(device=self.weight.device, dtype=dtype)  # (B, T, hidden)
        weight = self.weight.to(dtype)
        if self.form == "head_slice":
            x = x.unflatten(-1, (self.num_heads, -1))  # (B, T, H, hidden/H)
            return (torch.einsum("bths,hs->bth", x, weight).float() + self.bias)[..., None]  # (B, T, H, 1)
        if low:  # the product in the activations' dtype, the bias in fp32
            logits = nn.functional.linear(x, weight).float() + self.bias  # (B, T, H*D) or (B, T, H)
        else:  # fp32: the bias rides in the GEMM (addmm), one pass over the (B, T, H*D) logits fewer
            logits = nn.functional.linear(x, weight, self.bias)
        if self.form == "elementwise":
            return logits.unflatten(-1, (self.num_heads, self.head_dim))  # (B, T, H, D)
        return logits[..., None]  # (B, T, H, 1)

    def extra_repr(self) -> str:
        return f"form={self.form}, weight={tuple(self.weight.shape)}"


class GatedAttentionSurgery(Surgery):
    """Sigmoid gates on each head's attention output before ``o_proj``: ``Y' = Y * gate_scale * sigmoid(X W + b)``.

    Y is the head's SDPA output, X the hidden state the attention module receives for the same query token
    (after the layer's pre-norm; captured by a forward pre-hook on each targeted attention module, so under a
    KV cache X holds only the new tokens, as Y does). Position G1 of Qiu et al. 2025, "Gated Attention for Large
    Language Models: Non-linearity, Sparsity, and Attention-Sink-Free" (arXiv 2505.06708), ``form="elementwise"``
    (one gate per channel) or ``"headwise"`` (one per head); ``form="head_slice"`` is Bondarenko et al. 2023,
    "Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing" (arXiv 2306.12929),
    where head h's gate reads only the h-th slice of X. A head-output stage, so the layer keeps the fused SDPA
    kernel.

    Parameterisation (why ``2 sigmoid``): a gate added to a *pretrained* model must start as the exact identity,
    or the model is damaged before any training. With zero weights, bias ``logit(gate_init)`` and
    ``gate_scale = 1 / sigmoid(bias)`` every gate is 1 at init; with the default ``gate_init=0.5`` that is bias 0
    and ``2 sigmoid(0) = 1`` exactly in floating point (Qiu et al.'s retrofit, their issue #10; Bondarenko et
    al.'s fine-tuning mode ``sigmoid(logit p) / p``). Gates then range over (0, 2): a head can be silenced or
    amplified. ``gate_scale=1`` gives the papers' from-scratch plain sigmoid (gates in (0, 1), half-strength at
    bias 0: not the identity). Gate parameters are fp32 ``nn.Parameter`` s in ``self.gates[str(layer)]`` (saved
    by ``save_surgery``, trained by ``attnsurgery.train``); the gate is cast to the activation dtype at use.

    ``sparsity > 0`` makes :meth:`regularizer` return ``sparsity * mean gate`` of the last forward (Qiu et al.
    find sparse gates are what remove the attention sink); :meth:`mean_gates` reports the mean gate per layer.

    >>> handle = patch(model, "gated_attention", form="headwise", sparsity=1e-3)   # identity until trained
    """

    name = "gated_attention"
    config_class = GatedAttentionConfig
    summary = "Learnable sigmoid gates on each head's output before o_proj (Qiu et al. G1, Bondarenko et al.)"
    paper = (
        "Qiu et al., Gated Attention for LLMs, NeurIPS 2025 (arXiv 2505.06708); Bondarenko et al., "
        "Quantizable Transformers, NeurIPS 2023 (arXiv 2306.12929)"
    )
    stages = frozenset({Stage.HEAD_OUTPUT})
    #: a seeded random init: gates in (0, 2.5) spread around 1, differing by token, head and layer
    example_args = {"init_std": 0.3, "gate_init": 0.4}

    def setup(self, model: Any, engine: Any) -> None:
        info, config = engine.info, self.config
        H, D, hidden = info.num_heads, info.head_dim, info.hidden_size
        if config.form == "head_slice" and hidden % H:
            raise SurgeryConfigError(
                f"gated_attention: form='head_slice' splits the hidden state ({hidden}) into one slice per head "
                f"({H}), which does not divide it on this model; use form='headwise' or 'elementwise'."
            )
        bias = math.log(config.gate_init) - math.log1p(-config.gate_init)  # logit(gate_init)
        bias32 = torch.tensor(bias, dtype=torch.float32)
        # None: the reciprocal of the fp32 sigmoid the gates actually start at, so they start at 1 to the last bit
        self.gate_scale = (
            config.gate_scale if config.gate_scale is not None else 1.0 / float(torch.sigmoid(bias32))
        )
        generator = torch.Generator().manual_seed(config.seed)
        self.gates = nn.ModuleDict()
        self._head_masks: dict[int, torch.Tensor | None] = {}
        for layer in sorted(self.targets.layers):
            module = info.attention[layer]
            device = module_device(module)
            gate = GateProjection(config.form, hidden, H, D, device)
            with torch.no_grad():
                if config.init_std > 0:  # drawn on the CPU: the same init on every device
                    w = torch.randn(gate.weight.shape, generator=generator) * config.init_std
                    gate.weight.copy_(w)
                gate.bias.fill_(bias)
            self.gates[str(layer)] = gate
            mask = self.targets.head_mask(layer, device=device)
            self._head_masks[layer] = None if bool(mask.all()) else mask
            engine.register_hook(
                self, module.register_forward_pre_hook(self._capture(layer), with_kwargs=True)
            )
        self._inputs: dict[int, torch.Tensor] = {}  # layer -> this call's X (B, Tq, hidden)
        # layer -> the last forward's mean gate (scalar), or what it is computed from (gates, query_valid)
        self._means: dict[int, Any] = {}

    def _capture(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                self._inputs[layer] = hidden

        return hook

    def gate_values(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, H, D | 1) fp32 gates of ``layer`` for hidden states X (B, T, hidden); untargeted heads get 1."""
        # sigmoid in place on the fresh logits (its backward needs only its output; the GEMM's, its inputs): on
        # CPU each pass over the elementwise form's (B, T, H*D) gates is a visible share of the layer
        gate = self.gates[str(layer)](hidden_states).sigmoid_()
        if self.gate_scale != 1.0:  # in place only without autograd: sigmoid's backward reads that output
            gate = gate * self.gate_scale if gate.requires_grad else gate.mul_(self.gate_scale)
        mask = self._head_masks[layer]
        if mask is not None:
            gate = torch.where(mask.to(gate.device)[:, None], gate, torch.ones_like(gate))
        return gate

    def head_output(self, attn_output: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        layer = call.layer_idx
        hidden = self._inputs.pop(layer, None)  # popped: the activation is not kept past its layer
        if hidden is None or hidden.shape[:2] != attn_output.shape[:2]:
            raise RuntimeError(
                f"gated_attention: layer {layer} got no matching hidden state from its attention module's "
                f"pre-hook (attention output {tuple(attn_output.shape)}, hidden state "
                f"{None if hidden is None else tuple(hidden.shape)}); was the attention function called "
                "outside the module's forward?"
            )
        per_head = self._fused(layer, hidden, attn_output)
        if per_head is not None:  # gated in place by the CPU kernel
            self._record(layer, per_head, call)
            return attn_output
        gate = self.gate_values(layer, hidden)  # (B, Tq, H, D | 1)
        self._record(layer, gate, call)
        gate = gate.to(device=attn_output.device, dtype=attn_output.dtype)
        if torch.is_grad_enabled() and (attn_output.requires_grad or gate.requires_grad):
            return attn_output * gate  # the attention's backward may need its output unchanged
        return attn_output.mul_(gate)  # inference: the kernel's fresh output, gated in place

    def _fused(self, layer: int, hidden: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor | None:
        """Inference on CPU in fp32, elementwise gates on every head: the gate GEMM without its bias, then one kernel
        pass (``rowblock.gate_heads_``) adds the bias, takes the sigmoid and the scale, gates ``attn_output`` in place
        and returns the per-head mean gates (B, Tq, H, 1); torch ops take five passes over those (B, Tq, H*D) arrays
        (docs/benchmarks-gates.md). None where it does not apply: the torch ops below then run."""
        gate = self.gates[str(layer)]
        if (
            torch.is_grad_enabled()
            or gate.form != "elementwise"
            or self._head_masks[layer] is not None
            or attn_output.device.type != "cpu"
            or attn_output.dtype != torch.float32
            or hidden.dtype != torch.float32
            or gate.weight.device.type != "cpu"
            or not attn_output.is_contiguous()
            or not rowblock.enabled()
            or rowblock.load() is None
        ):
            return None
        bsz, q_len, heads, head_dim = attn_output.shape
        logits = torch.mm(
            hidden.reshape(bsz * q_len, -1), gate.weight.t()
        )  # (B*Tq, H*D), the bias added in the pass
        means = rowblock.gate_heads_(attn_output, logits, gate.bias, self.gate_scale, head_dim)
        return means.view(bsz, q_len, heads, 1)

    def _record(self, layer: int, gate: torch.Tensor, call: AttentionCall) -> None:
        """Mean gate over this layer's targeted heads and real (unpadded) query tokens. With a sparsity penalty the
        mean is computed now, in the autograd graph; otherwise the call keeps only what the mean needs (at most
        (B, Tq, H, 1), detached) and :meth:`mean_gates` computes it when asked: no extra kernels on the inference
        path, and evaluation without ``no_grad`` holds no graph alive."""
        if self.config.sparsity > 0:
            self._means[layer] = self._mean(layer, gate, call.query_valid)
            return
        per_head = gate if gate.shape[-1] == 1 else gate.mean(dim=-1, keepdim=True)  # equal channels per head
        self._means[layer] = (per_head.detach(), call.query_valid)

    def _mean(self, layer: int, gate: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
        mask = self._head_masks[layer]
        per_token = (gate if mask is None else gate[:, :, mask.to(gate.device)]).mean(dim=(-1, -2))  # (B, Tq)
        # a weighted mean, not boolean indexing: no host sync and no gather
        weight = query_valid.to(device=per_token.device, dtype=per_token.dtype).expand_as(per_token)
        count = weight.sum()
        return torch.where(count > 0, (per_token * weight).sum() / count.clamp(min=1), per_token.mean())

    def mean_gates(self) -> dict[int, float]:
        """{layer: mean gate} of the last forward, over targeted heads (and channels) and real tokens."""
        out = {}
        for layer, kept in sorted(self._means.items()):
            mean = self._mean(layer, *kept) if isinstance(kept, tuple) else kept
            out[layer] = float(mean.detach())
        return out

    def regularizer(self) -> torch.Tensor | None:
        """``sparsity * mean gate`` over the targeted layers of the last forward (differentiable); ``None`` when
        ``sparsity`` is 0 or no forward has run yet."""
        if self.config.sparsity == 0 or not self._means:
            return None
        means = [m.to(next(iter(self._means.values())).device) for m in self._means.values()]
        return self.config.sparsity * torch.stack(means).mean()
