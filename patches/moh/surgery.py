from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnsurgery.engine import EAGER_NAME
from attnsurgery.errors import SurgeryConfigError
from attnsurgery.surgery import AttentionCall, Stage, Surgery
from attnsurgery.targeting import module_device

from .config import MoHConfig
from .kernel import moh_attention


class MoHRouter(nn.Module):
    """The paper's router for one layer (MoH-ViT ``attention.py``), fp32 whatever the model's dtype.

    ``routed`` W_r (E, hidden) scores the E routed heads; ``shared`` W_s (h_s, hidden) weighs the shared heads
    (only when h_s > 1: one shared head has weight 1); ``balance`` W_h (2, hidden) gives the two-stage
    ``[a1, a2] = 2 softmax(W_h x)`` (only when h_s > 0). Bias-free linear maps, as the paper's ``nn.Linear(dim,
    ., bias=False)``.
    """

    def __init__(self, hidden: int, shared: int, routed: int, device: torch.device | None) -> None:
        super().__init__()
        self.num_shared, self.num_routed = shared, routed
        zeros = dict(dtype=torch.float32, device=device)
        self.routed = nn.Parameter(torch.zeros(routed, hidden, **zeros))
        self.shared = nn.Parameter(torch.zeros(shared, hidden, **zeros)) if shared > 1 else None
        self.balance = nn.Parameter(torch.zeros(2, hidden, **zeros)) if shared > 0 else None

    def forward(
        self, hidden_states: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gates (B, T, H), keep (B, T, E) bool, probs (B, T, E))`` for hidden states (B, T, hidden).

        Gates are the paper's weights: kept routed heads ``a2 * top_k * p_i / sum_kept p``, dropped ones 0, shared
        heads ``a1 * h_s * softmax(W_s x)_i``. With zero weights every kept head gets exactly 1."""
        x = hidden_states.to(device=self.routed.device, dtype=torch.float32)
        probs = torch.softmax(x @ self.routed.T, dim=-1)  # (B, T, E)
        top = probs.topk(top_k, dim=-1).indices
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)
        kept = probs * keep
        routed = kept / kept.sum(-1, keepdim=True).clamp(min=torch.finfo(kept.dtype).eps) * top_k
        if self.num_shared == 0:
            return routed, keep, probs
        if self.shared is not None:
            shared = torch.softmax(x @ self.shared.T, dim=-1) * self.num_shared
        else:  # one shared head: weight 1
            shared = x.new_ones(*x.shape[:-1], 1)
        alpha = torch.softmax(x @ self.balance.T, dim=-1) * 2  # (B, T, 2)
        gates = torch.cat([alpha[..., :1] * shared, alpha[..., 1:] * routed], dim=-1)
        return gates, keep, probs

    def extra_repr(self) -> str:
        return f"shared={self.num_shared}, routed={self.num_routed}, hidden={self.routed.shape[1]}"


def query_norm_keep(query: torch.Tensor, shared: int, top_k: int) -> torch.Tensor:
    """(B, Tq, E) bool: the ``top_k`` routed heads with the largest query L2 norm, per token.

    The released router takes ``softmax(norm / std_heads(norm))`` before its top-k; both steps are monotone in the
    norm, so the kept set is the norms' own top-k (``reference.py`` runs the full chain, and tests compare). RoPE
    rotates pairs of channels, which keeps norms, so the query reaching attention (after RoPE) routes exactly as
    the released code's pre-RoPE ``q_proj`` output; on QK-norm models it is the normalised query attention uses."""
    norms = query[:, shared:].float().norm(dim=-1).transpose(1, 2)  # (B, Tq, E)
    top = norms.topk(top_k, dim=-1).indices
    return torch.zeros_like(norms, dtype=torch.bool).scatter_(-1, top, True)


class MoHSurgery(Surgery):
    """Mixture-of-Head attention: each token uses the shared heads plus ``top_k`` routed heads.

    Jin, Zhu, Yuan, Yan, "MoH: Multi-Head Attention as Mixture-of-Head Attention", ICML 2025 (arXiv 2410.11842;
    code SkyworkAI/MoH): ``MoH(X) = sum_i g_i H^i W_O^i`` with ``g_i = 0`` for heads a token does not activate.
    Heads ``0..shared-1`` are always on; the rest are routed, ``top_k`` per token:

    * ``router="query_norm"`` -- the released MoH-LLaMA3 router, parameter-free: the L2 norm of each routed head's
      query (RoPE keeps norms, so the query entering attention gives the released pre-RoPE choice), top-k, binary
      gates. On QK-norm models (Gemma-3, Qwen3, OLMo2: the attention module has ``q_norm``) query norms are
      nearly equal, so the choice rides on noise: setup warns and points to the learned router.
    * ``router="learned"`` -- the paper's router (MoH-ViT ``attention.py``), :class:`MoHRouter` per layer on the
      hidden state the attention module receives (captured by a forward pre-hook, so under a KV cache only the
      new tokens'). ``gates="binary"`` keeps the forward binary and passes the paper's weights' gradient
      straight-through (``hard + g - g.detach()``, exactly ``hard`` in the forward); ``gates="weighted"`` uses
      the weights. Identity at init: with ``top_k`` = every routed head, binary gates are 1 whatever the
      weights; weighted gates are 1 when all router weights are zero (softmax of zeros gives the renormalised
      routed weight ``top_k * (1/E) / (top_k/E) = 1``, shared ``h_s * (1/h_s) = 1`` and ``a = 2 * 1/2 = 1``), which
      is the default init for ``gates="weighted"``. :meth:`regularizer` returns ``beta * mean_layers L_b`` with
      ``L_b = mean_i(P_i f_i) E^2`` over the real tokens of the last forward (the paper's load balance). With ``top_k=1`` the
      renormalised routed weight is 1 whatever W_r, so W_r learns from the load balance only (as in the paper's
      formula).

    Work is really skipped (``skip_compute=True``, a ``REPLACE`` kernel, :mod:`.kernel`): shared heads attend as
    the stock kernel does, each routed head attends only the queries routed to it. ``skip_compute=False`` computes
    every head with the model's kernel and multiplies by the gates (a head-output stage; the released code's way,
    and the reference of the fast path). Padding rows use the shared heads only. Routing depends on the token's
    own query (or hidden state), so cached decoding equals a full forward.

    Records per layer how often each routed head is picked over real tokens (:meth:`head_usage`,
    :meth:`write_inspection`) and the attention FLOPs the routing skipped (:meth:`flops_skipped`).

    >>> handle = patch(model, "moh", active=0.75)                        # training-free, 75% of heads
    >>> handle = patch(model, "moh", router="learned", top_k=2)          # then attnsurgery.train.train(...)
    """

    name = "moh"
    config_class = MoHConfig
    summary = (
        "Mixture-of-Head attention: shared heads + top-k routed heads per token, skipped heads not computed"
    )
    paper = (
        "Jin et al., MoH: Multi-Head Attention as Mixture-of-Head Attention, ICML 2025 (arXiv 2410.11842); "
        "code SkyworkAI/MoH"
    )
    stages = frozenset({Stage.REPLACE})
    #: the learned router at its random init, 3 of 4 heads per token on the tiny models (the query-norm router
    #: would pick by rounding noise on the tiny Gemma-3, whose q_norm makes every query norm sqrt(D): batched and
    #: single runs could route differently; tests/test_moh.py runs it through the same checks on the others)
    example_args = {"router": "learned"}
    #: every routed head kept: the exact identity, through the gathered kernel
    identity_args = {"active": 1.0}

    def resolved_args(self) -> dict[str, Any]:
        """shared / top_k as this model's head count resolves them (None -> MoH-LLaMA3's split, or from 'active'),
        ("active" is then implied by them and not repeated)."""
        args = super().resolved_args()
        if hasattr(self, "num_shared"):  # set up on a model
            args.update(shared=self.num_shared, top_k=self.top_k)
            args.pop("active", None)
        return args

    # -- set-up --------------------------------------------------------------------------------------------------
    def setup(self, model: Any, engine: Any) -> None:
        info, config = engine.info, self.config
        if self.targets.heads is not None:
            raise SurgeryConfigError(
                "moh: heads are chosen per token by the router (the first 'shared' heads always, 'top_k' of the "
                "others); pick layers with `layers=`, and the head split with shared/top_k/active, not `heads=`."
            )
        H = info.num_heads
        self.num_heads, self.head_dim = H, info.head_dim
        self.num_shared, self.top_k = config.resolve(H)
        self.num_routed = H - self.num_shared
        self.eager = engine.impl == EAGER_NAME  # score like the model's own kernel
        layers = sorted(self.targets.layers)
        if config.router == "query_norm":
            qk_norm = [
                layer for layer in layers if getattr(info.attention[layer], "q_norm", None) is not None
            ]
            if qk_norm:
                warnings.warn(
                    f"moh: router='query_norm' on a QK-norm model ({type(info.attention[qk_norm[0]]).__name__} "
                    "normalises queries with q_norm): query norms are nearly equal across heads, so the router "
                    "degenerates to picking heads by noise. Use router='learned' (and train it) on this model.",
                    stacklevel=4,
                )
        self.routers = nn.ModuleDict()
        if config.router == "learned":
            std = config.init_std
            if std is None:
                std = 0.0 if config.gates == "weighted" else 1.0 / math.sqrt(3 * info.hidden_size)
            generator = torch.Generator().manual_seed(config.seed)
            for layer in layers:
                module = info.attention[layer]
                router = MoHRouter(info.hidden_size, self.num_shared, self.num_routed, module_device(module))
                if std > 0:  # drawn on the CPU: the same init on every device
                    with torch.no_grad():
                        router.routed.copy_(torch.randn(router.routed.shape, generator=generator) * std)
                self.routers[str(layer)] = router
                engine.register_hook(
                    self, module.register_forward_pre_hook(self._capture(layer), with_kwargs=True)
                )
        self._inputs: dict[int, torch.Tensor] = {}  # layer -> this call's hidden state (learned router)
        self._balance: dict[int, torch.Tensor] = {}  # layer -> L_b of the last forward
        self.reset_stats()

    def active_stages(self, layer_idx: int) -> frozenset[Stage]:
        if layer_idx not in self.targets.layers:
            return frozenset()
        return frozenset({Stage.REPLACE if self.config.skip_compute else Stage.HEAD_OUTPUT})

    def _capture(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                self._inputs[layer] = hidden

        return hook

    # -- routing -------------------------------------------------------------------------------------------------
    def route(self, query: torch.Tensor, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(keep (B, Tq, E) bool, gates (B, Tq, H) fp32 or None)`` for one call: which routed heads each real
        token uses (padding rows use none), and the per-head factors the outputs are multiplied by (None: binary
        gates without a gradient path, nothing to multiply)."""
        layer = call.layer_idx
        valid = call.query_valid.to(query.device)  # (B|1, Tq)
        if self.config.router == "query_norm":
            keep = query_norm_keep(query, self.num_shared, self.top_k)
            keep = keep & valid[..., None]
            self._record(layer, keep, valid, None, call)
            return keep, None
        hidden = self._inputs.pop(layer, None)  # popped: the activation is not kept past its layer
        if hidden is None or hidden.shape[:2] != (query.shape[0], query.shape[2]):
            raise RuntimeError(
                f"moh: layer {layer} got no matching hidden state from its attention module's pre-hook (query "
                f"{tuple(query.shape)}, hidden state {None if hidden is None else tuple(hidden.shape)}); was the "
                "attention function called outside the module's forward?"
            )
        weights, keep, probs = self.routers[str(layer)](hidden, self.top_k)
        keep = keep.to(query.device) & valid[..., None]
        if self.config.gates == "binary":
            hard = torch.cat([keep.new_ones(*keep.shape[:2], self.num_shared), keep], dim=-1)
            # straight-through: exactly the 0/1 mask forward, the paper's weights' gradient backward
            gates = hard.to(weights.dtype) + (weights - weights.detach())
        else:
            gates = weights
        self._record(layer, keep, valid, probs, call)
        return keep, gates

    def _record(
        self,
        layer: int,
        keep: torch.Tensor,
        valid: torch.Tensor,
        probs: torch.Tensor | None,
        call: AttentionCall,
    ) -> None:
        """Head usage, skipped FLOPs and (learned router) the load-balance loss, over real tokens."""
        real = valid.expand(keep.shape[0], -1)  # (B, Tq)
        n = real.sum()
        with torch.no_grad():
            self._last[layer] = keep.detach()
            self._usage[layer] = self._usage.get(layer, 0) + keep.sum(dim=(0, 1)).cpu()
            self._tokens[layer] = self._tokens.get(layer, 0) + int(n)
            seen = _visible_keys(call).to(keep.device).expand_as(real)  # (B, Tq) keys each query attends
            off = (self.num_routed - keep.sum(-1)) * real  # routed heads each real token skipped
            per_pair = 4 * self.head_dim  # q.k and p.v: a multiply-add each per channel
            skipped = int((off * seen).sum()) * per_pair
            total = int((seen * real).sum()) * self.num_heads * per_pair
            old = self._flops.get(layer, (0, 0))
            self._flops[layer] = (old[0] + skipped, old[1] + total)
        if probs is not None and self.config.balance_loss > 0 and bool(n > 0):
            w = real.to(probs.device, probs.dtype)[..., None]  # (B, Tq, 1)
            P = (probs * w).sum(dim=(0, 1)) / n  # (E,) mean routing probability
            f = (keep.to(probs.dtype) * w).sum(dim=(0, 1)) / n  # (E,) fraction of tokens picking each head
            E = self.num_routed
            balance = (P * f).mean() * E * E
            self._balance[layer] = balance if torch.is_grad_enabled() else balance.detach()

    # -- stages --------------------------------------------------------------------------------------------------
    def attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, call: AttentionCall
    ) -> torch.Tensor:
        keep, gates = self.route(query, call)
        out = moh_attention(
            query,
            key,
            value,
            call.attention_mask,
            scaling,
            keep,
            self.num_shared,
            is_causal=call.is_causal,
            softcap=call.kwargs.get("softcap"),
            eager=self.eager,
        )  # (B, Tq, H, Dv)
        if gates is not None:
            out = out * gates.to(device=out.device, dtype=out.dtype)[..., None]
        return out

    def head_output(self, attn_output: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        keep, gates = self.route(call.query, call)
        if gates is None:
            shared = torch.ones_like(keep[..., :1]).expand(*keep.shape[:2], self.num_shared)
            gates = torch.cat([shared, keep], dim=-1)  # padding rows: shared heads only, as the fast path
        return attn_output * gates.to(device=attn_output.device, dtype=attn_output.dtype)[..., None]

    # -- training ------------------------------------------------------------------------------------------------
    def regularizer(self) -> torch.Tensor | None:
        """``balance_loss * mean over layers of L_b``, ``L_b = mean_i(P_i f_i) E^2`` of the last forward (MoH's load
        balance; uniform routing gives ``L_b = top_k``, its minimum); None for the query-norm router, beta = 0 or
        before any forward."""
        if self.config.router != "learned" or self.config.balance_loss == 0 or not self._balance:
            return None
        values = list(self._balance.values())
        return self.config.balance_loss * torch.stack([v.to(values[0].device) for v in values]).mean()

    # -- inspection ----------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Forget the head usage and FLOPs recorded so far."""
        self._usage: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, int] = {}
        self._flops: dict[int, tuple[int, int]] = {}
        self._last: dict[int, torch.Tensor] = {}

    def last_routing(self) -> dict[int, torch.Tensor]:
        """{layer: (B, Tq, E) bool} which routed heads each query of the layer's last call used (padding rows:
        none)."""
        return dict(self._last)

    def head_usage(self) -> dict[int, dict[str, Any]]:
        """Per layer since patching (or :meth:`reset_stats`): ``tokens`` (real tokens routed), ``counts`` (how many
        picked each routed head, heads ``shared..H-1``) and ``load`` (counts / tokens; sums to ``top_k``)."""
        out = {}
        for layer in sorted(self._usage):
            counts = self._usage[layer].long()
            tokens = self._tokens[layer]
            out[layer] = {
                "tokens": tokens,
                "counts": counts.tolist(),
                "load": (counts.double() / max(tokens, 1)).tolist(),
            }
        return out

    def flops_skipped(self) -> dict[int, dict[str, float]]:
        """Per layer since patching (or :meth:`reset_stats`): attention FLOPs of the stock kernel over real queries
        (``total``: 4 D per visible (query, key) pair per head -- the q.k and p.v multiply-adds) and those of the
        (token, head) pairs routed off (``skipped``), and their ratio ``fraction``. The fast path skips exactly
        these pairs; its blocks still touch a few keys above the causal diagonal, which are not counted."""
        return {
            layer: {"skipped": s, "total": t, "fraction": s / t if t else 0.0}
            for layer, (s, t) in sorted(self._flops.items())
        }

    def write_inspection(self, out_dir: Path) -> list[Path]:
        """Write ``moh-head-usage.json`` (per-layer head load and skipped FLOPs) and ``moh-head-usage.png`` (a
        layers x heads heatmap of how often each head was used, shared heads at 1) from what was recorded."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        usage, flops = self.head_usage(), self.flops_skipped()
        layers = {}
        for layer, row in usage.items():
            load = torch.tensor(row["load"])
            layers[str(layer)] = {
                **row,
                # coefficient of variation of the routed heads' load: 0 = perfectly balanced
                "load_cv": float(load.std(unbiased=False) / load.mean()) if load.mean() > 0 else 0.0,
                "flops_skipped_fraction": flops.get(layer, {}).get("fraction", 0.0),
            }
        summary = {
            "surgery": self.name,
            "router": self.config.router,
            "gates": self.config.gates,
            "num_heads": self.num_heads,
            "shared_heads": list(range(self.num_shared)),
            "routed_heads": list(range(self.num_shared, self.num_heads)),
            "top_k": self.top_k,
            "active_fraction": (self.num_shared + self.top_k) / self.num_heads,
            "layers": layers,
        }
        json_path = out_dir / "moh-head-usage.json"
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        return [json_path, self._plot(usage, out_dir / "moh-head-usage.png")]

    def _plot(self, usage: dict[int, dict[str, Any]], path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = sorted(usage)
        grid = torch.full((max(len(layers), 1), self.num_heads), float("nan"))
        for i, layer in enumerate(layers):
            grid[i, : self.num_shared] = 1.0
            grid[i, self.num_shared :] = torch.tensor(usage[layer]["load"])
        fig, ax = plt.subplots(figsize=(1.2 + 0.45 * self.num_heads, 1.2 + 0.28 * max(len(layers), 1)))
        image = ax.imshow(
            grid.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest"
        )
        ax.axvline(self.num_shared - 0.5, color="white", linewidth=1.5)
        ax.set_xlabel(f"head (0-{self.num_shared - 1} shared)" if self.num_shared else "head (all routed)")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([str(layer) for layer in layers], fontsize=7)
        ax.set_xticks(range(self.num_heads))
        ax.tick_params(axis="x", labelsize=7)
        fig.colorbar(image, ax=ax, label="share of real tokens using the head")
        tokens = max((row["tokens"] for row in usage.values()), default=0)
        ax.set_title(
            f"MoH head usage ({self.config.router}, {self.num_shared}+{self.top_k} of {self.num_heads} heads, "
            f"{tokens} tokens/layer)",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _visible_keys(call: AttentionCall) -> torch.Tensor:
    """(B|1, Tq) how many keys each query attends (from the layer's mask; SDPA's causal rule when it has none)."""
    mask, q_len, k_len = call.attention_mask, call.query_len, call.key_len
    if mask is None:
        if call.is_causal and q_len > 1:
            return torch.arange(1, q_len + 1).clamp(max=k_len)[None]
        return torch.full((1, q_len), k_len)
    rows = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    return rows[..., :k_len].sum(-1).expand(-1, q_len).cpu()  # (B|1, Tq)
