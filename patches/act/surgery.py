from __future__ import annotations

from typing import Any

import torch

from attnsurgery import flex, rowblock
from attnsurgery.kernels import (
    AttentionStats,
    column_mask,
    sdpa_with_lse,
    softcapped,
    tiled_attention,
    visible,
)
from attnsurgery.surgery import AttentionCall, AttentionTile, Stage, Surgery

from .config import ActConfig

_EPS = (
    1e-6  # rows whose mass sits (almost) entirely on sinks have nothing to redistribute to: left as they are
)


_ROWS = 4096  # query rows per chunk of the sink logits


def _plain_causal(call: AttentionCall) -> bool:
    """transformers dropped the mask: a causal prefill where query i sees keys 0..i."""
    return call.attention_mask is None and call.is_causal and call.query_len > 1


class ActSurgery(Surgery):
    """ACT: scale the attention that non-first sink tokens receive by ``beta`` and give the removed mass to the
    other tokens of the row in proportion to their attention (rows still sum to 1).

    Per head and batch row, a key ``j`` is a sink when its mean attention from the real queries that see it
    exceeds ``threshold`` (or ``alpha / N``); the first (lowest-index) such key is kept unscaled, as in the
    reference code. Detection is online (recomputed from each input), per batch row, with padding excluded.

    Exact without an n x n matrix: one tiled pass gives the unedited output ``o_i``, its log-sum-exp and the
    column sums detection needs (:class:`attnsurgery.kernels.AttentionStats`); then, for the sink set
    ``S``, ``P_i = sum_S A_is``, ``u_i = sum_S A_is v_s`` and the edited output is
    ``beta u_i + (1 - beta P_i) / (1 - P_i) (o_i - u_i)``, O(n |S|) extra work. Decode steps with a frozen sink set
    use the fused SDPA kernel's output and lse directly. On a GPU a prefill takes :mod:`attnsurgery.flex`'s
    flash-style passes instead (lse, column sums, then the sink columns shifted by ``log m_i`` inside the softmax;
    see :meth:`_flex_attention`): no score blocks in memory. The sink logits are scored as the model scores them
    (softcapped on Gemma-2, plus an additive float mask's biases). In bf16 / fp16 the output, lse, column sums,
    ``P`` and the correction stay in fp32 until the end: ``o_i - u_i`` cancels when the sinks hold most of the
    row, and a rounded ``o_i`` would be amplified by ``1 / (1 - P_i)``. Paper: Yu et al., "Unveiling and Harnessing
    Hidden Attention Sinks: Training-Free Attention Calibration", ICML 2024 (arXiv 2406.15765).

    Like the reference, detection uses every query of the input, so a later token can change the outputs at
    earlier positions (the attention mask itself is always respected). Under log-likelihood scoring the eval
    bridge (:mod:`attnsurgery.eval.lmeval`) does what the paper's code does: context and continuation go through
    one forward, so detection sees both and a choice's own tokens can nudge its score; detecting on the context
    alone would mean a prefill of the context and a cached pass over the continuation. Decode (KV cache): ``decode="frozen"`` (default) keeps the sink set found at prefill, so every generated token
    sees the same calibrated prompt; ``"recompute"`` detects again from the current queries only. Either way each
    row sums to 1 (the reference code's ``A[0, 0] = 1`` line makes decode rows sum above 1; it is not kept).

    >>> patch(model, "act", beta=0.4, threshold=0.1, layers="2:31", heads={2: [0, 5], 3: [1]})
    """

    name = "act"
    config_class = ActConfig
    summary = "ACT attention-sink calibration: scale non-first sinks by beta, redistribute (fused, exact)"
    paper = "Yu et al., Unveiling and Harnessing Hidden Attention Sinks, ICML 2024 (arXiv 2406.15765)"
    stages = frozenset({Stage.PROBS})
    fused = True
    example_args = {"beta": 0.3, "threshold": 0.08}
    identity_args = {"beta": 1.0}
    prompt_adaptive = True

    def setup(self, model: Any, engine: Any) -> None:
        self._heads = {layer: self.targets.head_mask(layer) for layer in self.targets.layers}

    # -- detection --------------------------------------------------------------------------------------------
    def detect(
        self, call: AttentionCall, out_dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One tiled pass over the call: unedited output (B, Tq, H, Dv) (in ``out_dtype``, default the call's),
        its lse (B, H, Tq) and the sink set (B, H, Tk) bool, on targeted heads only. At prefill with
        ``decode="frozen"`` the set is stored for decode."""
        valid_q, counts = self._viewers(call)
        if rowblock.ready(call):  # CPU inference: the compiled pass gives all three at about flash's cost
            out, lse, column_sums = rowblock.attention(
                call.query, call.key, call.value, call.attention_mask, call.scaling, call.is_causal,
                column_weights=valid_q,
            )  # fmt: skip
            return (
                out.transpose(1, 2).to(out_dtype or call.query.dtype),
                lse,
                self._select(column_sums, counts, call),
            )
        stats = AttentionStats(query_valid=valid_q)
        out = tiled_attention(
            call.query,
            call.key,
            call.value,
            call.attention_mask,
            call.scaling,
            call,
            stats=stats,
            out_dtype=out_dtype,
        )
        return out, stats.lse, self._select(stats.column_sums, counts, call)

    def _select(self, column_sums: torch.Tensor, counts: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """The sink set (B, H, Tk) bool from each key's received attention summed over the real queries that see
        it; stored for decode at a prefill with ``decode="frozen"``."""
        score = torch.where(counts > 0, column_sums / counts.clamp(min=1), 0.0)  # mean received attention
        if self.config.alpha is not None:
            key_valid = call.request.key_valid
            # a static cache has key columns past the request's tokens: empty slots, never counted
            if key_valid is not None and key_valid.shape[1] <= call.key_len:
                n_real = key_valid.sum(-1).clamp(min=1).to(score)[:, None, None]
            else:
                n_real = torch.tensor(float(call.key_len))
            qualifying = score > self.config.alpha / n_real
        else:
            qualifying = score > self.config.absolute_threshold
        first = qualifying.int().argmax(dim=-1, keepdim=True)  # lowest qualifying index (0 if none qualifies)
        sinks = qualifying.scatter(-1, first, False)  # the first sink is kept unscaled (reference: cand[1:])
        sinks &= self._heads[call.layer_idx].to(sinks.device)[None, :, None]
        if self.config.decode == "frozen" and call.request.past_len == 0:
            call.request.extras[self._slot(call)] = sinks  # key columns of the prompt (2D mask coordinates)
        return sinks

    @staticmethod
    def _viewers(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Tq) real query rows, and (B, 1, Tk) how many of them see each key."""
        valid_q = call.query_valid.to(call.query.device).expand(call.query.shape[0], -1)
        if _plain_causal(call):  # query i sees keys 0..i: counts without an n x n mask
            counts = valid_q.flip(-1).cumsum(-1).flip(-1)  # real queries at or after each key
            return valid_q, torch.nn.functional.pad(counts, (0, call.key_len - call.query_len))[:, None]
        allowed = visible(call.attention_mask, call.is_causal, call.query_len, call.key_len, valid_q.device)
        valid_q = valid_q & allowed.any(-1)[:, 0]  # rows that see at least one key
        return valid_q, (allowed & valid_q[:, None, :, None]).sum(2)

    def _slot(self, call: AttentionCall) -> tuple:
        return ("act", id(self), call.layer_idx)

    @staticmethod
    def _frozen_now(frozen: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """The prefill's sink set on the keys of this decode step (a sliding-window cache may have dropped some)."""
        total = call.request.past_len + call.query_len
        # absolute column of each key: a sliding-window cache holds the last key_len columns; a static cache holds
        # columns 0.. with empty slots after the tokens seen so far
        first = max(0, total - call.key_len)
        columns = torch.arange(first, first + call.key_len, device=frozen.device)
        now = torch.zeros(*frozen.shape[:2], call.key_len, dtype=torch.bool, device=frozen.device)
        inside = columns < frozen.shape[-1]
        now[..., inside] = frozen[..., columns[inside]]
        return now

    # -- the fused path ---------------------------------------------------------------------------------------
    def attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, call: AttentionCall
    ) -> torch.Tensor:
        # fp32 output: the correction's o_i - u_i cancels where the sinks hold most of a row
        if self._uses_frozen(call):  # decode: the sinks are known, the fused kernel gives out and lse
            out, lse = sdpa_with_lse(
                query,
                key,
                value,
                call.attention_mask,
                scaling,
                call.is_causal,
                softcap=call.kwargs.get("softcap"),
                out_dtype=torch.float32,
            )
            sinks = self._frozen_now(call.request.extras[self._slot(call)], call)
        else:
            if flex.flex_ready(query, call):  # GPU: flash-style passes, no score blocks in memory
                try:
                    return self._flex_attention(call).transpose(1, 2)
                except Exception as err:  # a compiler failure on this machine: the exact tiled pass below
                    flex.give_up(err)
            # one tiled pass gives out, lse and the column sums detection needs
            out, lse, sinks = self.detect(call, out_dtype=torch.float32)
            out = out.transpose(1, 2)
        return self.redistribute(out, lse, sinks, call).transpose(1, 2)  # (B, Tq, H, Dv)

    def _uses_frozen(self, call: AttentionCall) -> bool:
        frozen = call.request.extras.get(self._slot(call))
        return (
            self.config.decode == "frozen"
            and call.request.past_len > 0
            and frozen is not None
            and frozen.shape[0] == call.query.shape[0]
        )

    def _sink_probs(
        self, lse: torch.Tensor, sinks: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``A_is`` (B, H, Tq, m) fp32 over each row's sinks (0 past a head's own count) and the sinks' indices
        (B, H, m), from the sink logits scored as the model scores them (as the pass that gave ``lse``); None when
        no head has a sink."""
        most = int(sinks.sum(-1).max()) if sinks.numel() else 0
        if most == 0:
            return None
        idx = sinks.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices[..., :most]  # (B, H, m)
        chosen = sinks.gather(-1, idx)  # (B, H, m): False where a row has fewer than m sinks
        # the sink keys alone, picked from each head's kv head: no (B, H, Tk, D) copy of the keys
        k_s = self._pick(call.key, idx).float() * call.scaling  # (B, H, m, D)
        # in row chunks: an fp32 copy of a long prompt's queries would cost more than the attention itself
        q = call.query
        logits = torch.cat(
            [q[:, :, s : s + _ROWS].float() @ k_s.transpose(-1, -2) for s in range(0, q.shape[2], _ROWS)],
            dim=2,
        )  # (B, H, Tq, m)
        logits = softcapped(logits, call.kwargs.get("softcap"))
        ok, bias = column_mask(call.attention_mask, call.is_causal, call.query_len, idx)  # no n x n mask
        if bias is not None:
            logits = logits + bias
        ok = ok & chosen[:, :, None, :]
        return torch.exp((logits - lse[..., None]).masked_fill(~ok, float("-inf"))), idx

    @staticmethod
    def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (B, H, m) of keys or values ``x`` (B, Hkv, Tk, D), each query head reading its kv head:
        (B, H, m, D)."""
        bsz, heads = idx.shape[:2]
        kv_head = torch.arange(heads, device=x.device) // (heads // x.shape[1])
        batch = torch.arange(bsz, device=x.device)[:, None, None]
        return x[batch, kv_head[None, :, None], idx.to(x.device)]

    def redistribute(
        self, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor, call: AttentionCall
    ) -> torch.Tensor:
        """Apply the sink scaling to fused outputs (B, H, Tq, Dv) through the O(n |S|) low-rank correction, in fp32;
        returns the call's dtype. ``out`` is the caller's fresh kernel output: edited in place when no gradient
        needs it."""
        dtype = call.value.dtype
        found = self._sink_probs(lse, sinks, call)
        if found is None:
            return out.to(dtype)
        probs, idx = found
        v_s = self._pick(call.value, idx).float()  # (B, H, m, Dv)
        # beta u + c (o - u) with c = (1 - beta P) / (1 - P) and u = sum_s A_is v_s, written as c o + (beta - c) u:
        # two passes over the output (a scale, then a rank-m GEMM accumulated into it) where the edit's elementwise
        # form took six. Rows (almost) all on sinks keep c = 1 and add nothing: left as they are.
        mass = probs.sum(-1, keepdim=True)  # P_i
        rest = 1.0 - mass
        beta = self.config.beta
        keep = torch.where(rest > _EPS, (1.0 - beta * mass) / rest.clamp(min=_EPS), 1.0)
        moved = torch.where(rest > _EPS, beta - keep, 0.0)
        out = out.float()
        if out.requires_grad or torch.is_grad_enabled() and (probs.requires_grad or v_s.requires_grad):
            return (out * keep + (probs * moved) @ v_s).to(dtype)
        out.mul_(keep)
        out += (probs * moved) @ v_s
        return out.to(dtype)

    def _flex_attention(self, call: AttentionCall) -> torch.Tensor:
        """The GPU path (:mod:`attnsurgery.flex`): log-sum-exp, column sums, then one pass that scales the sink
        columns of row i by ``beta (1 - P_i) / (1 - beta P_i)`` before the softmax: (B, H, Tq, Dv)."""
        q, k, v, scale = call.query, call.key, call.value, call.scaling
        vis = flex.Visibility.of(call)
        lse = flex.log_sum_exp(q, k, vis, scale)
        valid_q, counts = self._viewers(call)
        valid = None if bool(valid_q.all()) else valid_q
        cols = flex.column_sums(q, k, lse, vis, scale, valid, call.key_len)
        sinks = self._select(cols, counts, call)
        found = self._sink_probs(lse, sinks, call)
        if found is None:  # no sinks anywhere: the plain softmax
            shift = lse.new_zeros(lse.shape)
        else:
            mass = found[0].sum(-1)  # P_i (B, H, Tq)
            beta = self.config.beta
            rest = 1.0 - mass
            with torch.no_grad():  # log(0) for beta = 0: the sinks drop out of the row, as the edit says
                shift = (
                    torch.log(torch.tensor(beta))
                    + torch.log(rest.clamp(min=_EPS))
                    - torch.log1p(-beta * mass)
                )
            shift = torch.where(rest > _EPS, shift, 0.0)  # rows (almost) all on sinks: left as they are
        return flex.shifted_columns(q, k, v, sinks, shift, vis, scale)

    # -- the tiled path (composition with other probability-level surgeries, attention maps) -------------------
    def probs(self, probs: torch.Tensor, tile: AttentionTile) -> torch.Tensor:
        call = tile.call
        sinks = call.scratch.get("act")
        if sinks is None:  # once per call, shared by its tiles
            if self._uses_frozen(call):
                sinks = self._frozen_now(call.request.extras[self._slot(call)], call)
            else:
                sinks = self.detect(call)[2]
            call.scratch["act"] = sinks
        cols = sinks[:, :, None, tile.k_start : tile.k_end]  # (B, H, 1, bk)
        mass = (probs * cols).sum(-1, keepdim=True)
        # the non-sink mass summed directly, not as 1 - mass: that cancels where the sinks hold most of the row and
        # its rounding would be amplified by 1 / rest (the reference sums the rest the same way)
        rest = (probs * ~cols).sum(-1, keepdim=True)
        factor = (rest + (1.0 - self.config.beta) * mass) / rest.clamp(min=_EPS)
        edited = torch.where(cols, probs * self.config.beta, probs * factor)
        return torch.where(rest > _EPS, edited, probs)
