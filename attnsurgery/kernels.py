"""Exact attention kernels: the tiled path, and fused attention that also returns log-sum-exp.

Probability-level surgeries that edit a few columns (ACT, VAR) stay exact without an n x n matrix: with the output
``o_i`` and ``lse_i``, any probability is ``A_ij = exp(q_i.k_j * scale + m_ij - lse_i)``, so edits over a small
column set cost O(n x |S|) (see ``DESIGN.md`` §3). Detection needs column sums ``sum_i A_ij``.

Measured on CPU (SmolLM2 shapes, 2k tokens): a second fused call for the column sums (keys as queries, ``-lse_i``
folded in as an extra head dimension, read off its log-sum-exp) costs ~1.35x an SDPA call, because PyTorch's CPU
flash kernel insists on a value product it does not need; a tiled pass with no value product ~1.0x; one tiled
pass that yields output, lse and column sums together (:class:`AttentionStats`) is cheapest, so ACT uses that.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .surgery import AttentionCall, AttentionTile, Surgery

#: the tiled path works on blocks of at most TILE_ROWS query rows and TILE_BYTES of fp32 scores; 64 rows keep
#: a block's scores near the CPU caches (measured: 64 rows beat 128-512 at 2k-8k tokens on SmolLM2 shapes)
TILE_ROWS = int(os.environ.get("ATTNSURGERY_TILE_ROWS", "64"))
TILE_BYTES = int(float(os.environ.get("ATTNSURGERY_TILE_MB", "64")) * 2**20)
#: on a GPU, small blocks leave the device idle between kernel launches: bigger blocks, more memory per block
#: (512 rows: fastest at 8k tokens on an H200, 10% behind 1,024 at 2k with 55% of its memory, docs/gpu.md;
#: ATTNSURGERY_TILE_ROWS_CUDA / ATTNSURGERY_TILE_MB_CUDA override)
TILE_ROWS_CUDA = int(os.environ.get("ATTNSURGERY_TILE_ROWS_CUDA", "512"))
TILE_BYTES_CUDA = int(float(os.environ.get("ATTNSURGERY_TILE_MB_CUDA", "512")) * 2**20)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * groups, T, D), each kv head repeated for the query heads that share it."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def visible(
    attention_mask: torch.Tensor | None, is_causal: bool, q_len: int, k_len: int, device: torch.device
) -> torch.Tensor:
    """(B|1, 1, Tq, Tk) bool: which keys each query may attend to (transformers' conventions, see engine)."""
    if attention_mask is None:
        if is_causal and q_len > 1:
            return (
                torch.arange(k_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None]
            )[None, None]
        return torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def has_bias(attention_mask: torch.Tensor | None) -> bool:
    """True for an additive float mask that carries values other than 0 (attend) and the dtype minimum (masked):
    a bias (ALiBi-style, a caller's own 4D mask) that a boolean visibility mask would silently drop."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return False
    masked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
    return bool((attention_mask.masked_fill(masked, 0) != 0).any())


def softcapped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2-style logit softcapping ``tanh(s / cap) * cap`` (as transformers' eager functions apply it)."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def column_mask(
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    q_len: int,
    idx: torch.Tensor,
    s: int = 0,
    e: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Visibility and additive bias of a few key columns for query rows ``[s, e)``, without an n x n tensor.

    ``idx`` (B, H|1, m) are key indices per batch row (and head). Returns ``ok`` (B, H'|1, e - s, m) bool and
    ``bias`` of the same shape in fp32 (the additive float mask's values, 0 where not visible) or None.
    """
    e = q_len if e is None else e
    if attention_mask is None:
        if is_causal and q_len > 1:  # plain causal prefill: query i sees keys 0..i
            rows = torch.arange(s, e, device=idx.device)
            return idx[:, :, None, :] <= rows[None, None, :, None], None
        return torch.ones(*idx.shape[:2], e - s, idx.shape[-1], dtype=torch.bool, device=idx.device), None
    rows = attention_mask[:, :, s:e] if attention_mask.shape[2] > 1 else attention_mask
    bsz = max(rows.shape[0], idx.shape[0])
    heads = max(rows.shape[1], idx.shape[1])
    rows = rows.expand(bsz, heads, e - s, -1)
    picked = rows.gather(-1, idx[:, :, None, :].expand(bsz, heads, e - s, -1).to(rows.device))
    if picked.dtype == torch.bool:
        return picked, None
    ok = picked > torch.finfo(picked.dtype).min / 2
    return ok, torch.where(ok, picked.float(), 0.0)


def allowed_tile(
    mask: torch.Tensor | None, is_causal: bool, q_len: int, k_len: int, s: int, e: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """(allowed bool mask, additive float mask or None, k_start, k_end) for query rows [s, e)."""
    if mask is None:
        if is_causal and q_len > 1:
            # transformers drops the mask only for a plain causal prefill: query i sees keys 0..i (SDPA's
            # upper-left alignment; extra keys would be empty static-cache slots).
            k_end = min(e, k_len)
            rows = torch.arange(s, e, device=device)[:, None]
            cols = torch.arange(k_end, device=device)[None, :]
            return (cols <= rows)[None, None], None, 0, k_end
        return torch.ones(1, 1, e - s, k_len, dtype=torch.bool, device=device), None, 0, k_len
    rows = mask[:, :, s:e] if mask.shape[2] > 1 else mask
    if rows.dtype == torch.bool:
        allowed, additive = rows, None
    else:  # an additive float mask (eager): keep its values, they may carry biases
        allowed, additive = rows > torch.finfo(rows.dtype).min / 2, rows
    cols = allowed.flatten(0, -2).any(0).nonzero()
    if len(cols) == 0:
        k_start, k_end = 0, k_len
    else:
        k_start, k_end = int(cols[0]), int(cols[-1]) + 1
    allowed = allowed[..., k_start:k_end]
    if additive is not None:
        additive = additive[..., k_start:k_end]
    return allowed, additive, k_start, k_end


@dataclass
class AttentionStats:
    """By-products of one plain-softmax tiled pass (no stages).

    Pass an instance to :func:`tiled_attention`; ``query_valid`` (B, Tq) picks the rows that count in the column
    sums (padding rows do not). After the pass: ``lse`` (B, H, Tq) and ``column_sums`` (B, H, Tk), fp32.
    """

    query_valid: torch.Tensor | None = None
    lse: torch.Tensor | None = field(default=None, init=False)
    column_sums: torch.Tensor | None = field(default=None, init=False)

    def start(self, bsz: int, num_heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        self.lse = torch.empty(bsz, num_heads, q_len, dtype=torch.float32, device=device)
        self.column_sums = torch.zeros(bsz, num_heads, k_len, dtype=torch.float32, device=device)
        valid = self.query_valid
        self._weights = None if valid is None or bool(valid.all()) else valid.to(torch.float32)

    def add(
        self,
        weights: torch.Tensor,
        lse: torch.Tensor,
        s: int,
        e: int,
        k0: int,
        k1: int,
        row_scale: torch.Tensor | None = None,
    ) -> None:
        """Record a block: ``weights * row_scale`` are its probabilities (``row_scale`` (B, H, bq) or None)."""
        self.lse[:, :, s:e] = lse
        if self._weights is not None:
            valid = self._weights[:, None, s:e].expand(weights.shape[0], weights.shape[1], -1)
            row_scale = valid if row_scale is None else row_scale * valid
        if row_scale is None:
            self.column_sums[..., k0:k1] += weights.sum(dim=2)
        else:
            self.column_sums[..., k0:k1] += torch.einsum("bhqk,bhq->bhk", weights, row_scale)


def tiled_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    call: AttentionCall | None = None,
    *,
    is_causal: bool = True,
    logit_stages: list[Surgery] = (),
    normalizer: Surgery | None = None,
    prob_stages: list[Surgery] = (),
    dropout: float = 0.0,
    record: list[torch.Tensor] | None = None,
    stats: AttentionStats | None = None,
    block_rows: int | None = None,
    softcap: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Exact attention computed over blocks of query rows, with probability-level stages applied per block.

    Stage methods own the tensor they are given and may modify it in place.

    Memory is O(block x n): scores for at most ``TILE_BYTES`` at a time. Keys outside the block's visible range
    (above the causal diagonal, before a sliding window) are skipped. Scores and probabilities are fp32 as in
    transformers' eager path. Returns attn_output (B, Tq, H, Dv). ``call`` (when given) supplies ``is_causal``
    and Gemma-2-style ``softcap`` (or pass ``softcap`` without a call); ``stats`` asks for the softmax's lse and
    column sums from the same pass. ``out_dtype=torch.float32`` keeps the value product and the output in fp32 for
    low-precision inputs (callers that correct the output afterwards, where a rounded output would be amplified).
    """
    bsz, num_heads, q_len, head_dim = query.shape
    num_kv, k_len = key.shape[1], key.shape[2]
    groups = num_heads // num_kv
    if call is not None:
        softcap = call.kwargs.get("softcap") if softcap is None else softcap
        is_causal = call.is_causal
    # (B, Hkv, G, Tq, D): query heads grouped by the key/value head they share, so GQA never repeats K/V
    q = (query.float() * scaling).view(bsz, num_kv, groups, q_len, head_dim)
    k_t = key.float().transpose(-1, -2)  # (B, Hkv, D, Tk)
    out_dtype = query.dtype if out_dtype is None else out_dtype
    out = query.new_empty(bsz, q_len, num_heads, value.shape[-1], dtype=out_dtype)
    # the dtype of the value product: the model's, unless an fp32 output was asked for
    product = torch.promote_types(value.dtype, out_dtype)
    if block_rows is None:
        rows, budget = (TILE_ROWS_CUDA, TILE_BYTES_CUDA) if query.is_cuda else (TILE_ROWS, TILE_BYTES)
        block_rows = max(16, min(rows, budget // max(1, 4 * bsz * num_heads * k_len)))
    plain_softmax = (
        normalizer is None and not logit_stages and not prob_stages and record is None and dropout == 0.0
    )
    if stats is not None:
        if not plain_softmax:
            raise ValueError(
                "AttentionStats are of the plain softmax: pass no stages, record or dropout with them."
            )
        stats.start(bsz, num_heads, q_len, k_len, query.device)
    if record is not None:
        maps = torch.zeros(bsz, num_heads, q_len, k_len, dtype=torch.float32, device=query.device)
    for s in range(0, q_len, block_rows):
        e = min(s + block_rows, q_len)
        allowed, additive, k0, k1 = allowed_tile(attention_mask, is_causal, q_len, k_len, s, e, q.device)
        tile = AttentionTile(call, s, e, k0, k1, allowed)
        qb = q[:, :, :, s:e].reshape(bsz, num_kv, groups * (e - s), head_dim)
        scores = torch.matmul(qb, k_t[..., k0:k1]).view(bsz, num_heads, e - s, k1 - k0)  # (B, H, bq, bk)
        scores = softcapped(scores, softcap)
        if additive is not None:
            scores.add_(additive)
        for surgery in logit_stages:
            scores = surgery.logits(scores, tile)
        # finite fill (as eager does): a fully masked padding row stays finite instead of NaN, so it cannot
        # poison real rows through 0 * NaN in the value product of the next layer. A plain causal block is
        # fully visible left of its diagonal square, so only that square needs masking.
        lo = s - k0 if attention_mask is None and is_causal and q_len > 1 else 0
        scores[..., lo:].masked_fill_(~allowed[..., lo:], torch.finfo(scores.dtype).min)
        if stats is not None:
            # flash-style: normalise the (bq x Dv) output instead of the (bq x bk) block, one pass fewer
            # the shift is gradient-neutral (lse and softmax do not depend on it): detached, so amax keeps no graph
            top = scores.amax(dim=-1, keepdim=True).detach()
            # in place when nothing differentiates through it; out of place under autograd (fine-tuning under ACT)
            weights = (scores - top).exp() if scores.requires_grad else scores.sub_(top).exp_()
            total = weights.sum(dim=-1, keepdim=True)
            inv = total.reciprocal()
            stats.add(weights, (top + total.log()).squeeze(-1), s, e, k0, k1, row_scale=inv.squeeze(-1))
            weights = weights.to(product).view(bsz, num_kv, groups * (e - s), k1 - k0)
            block = torch.matmul(weights, value[:, :, k0:k1].to(product)).view(bsz, num_heads, e - s, -1)
            block = block * inv
            out[:, s:e] = block.to(out.dtype).transpose(1, 2)
            continue
        probs = (
            normalizer.normalize(scores, tile) if normalizer is not None else torch.softmax(scores, dim=-1)
        )
        for surgery in prob_stages:
            probs = surgery.probs(probs, tile)
        if record is not None:
            maps[:, :, s:e, k0:k1] = probs
        if dropout > 0.0:
            probs = nn.functional.dropout(probs, p=dropout, training=True)
        probs = probs.to(product).view(bsz, num_kv, groups * (e - s), k1 - k0)
        block = torch.matmul(probs, value[:, :, k0:k1].to(product))  # (B, Hkv, G*bq, Dv)
        out[:, s:e] = block.view(bsz, num_heads, e - s, -1).transpose(1, 2).to(out_dtype)
    if record is not None:
        record.append(maps.cpu())
    return out


def flash_cpu_available(query: torch.Tensor) -> bool:
    return query.device.type == "cpu" and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"
    )


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _cuda_fused_ok(query: torch.Tensor) -> bool:
    return query.is_cuda and hasattr(torch.ops.aten, "_scaled_dot_product_efficient_attention")


def _aligned_bias(mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The memory-efficient CUDA kernel wants its bias' last dimension padded to a multiple of 16 in memory (as
    ``F.scaled_dot_product_attention`` pads it): a padded buffer, sliced back and broadcast to ``shape``. The
    buffer keeps the mask's own broadcast dimensions (one copy for all heads, as PyTorch's SDPA does), so a
    padded 32k-token prefill holds one (T, T) bias per sequence, not one per head."""
    k_len = shape[-1]
    lead = mask.shape[:-1]
    padded = torch.zeros(*lead, -(-k_len // 16) * 16, dtype=mask.dtype, device=mask.device)
    padded[..., :k_len] = mask.expand(*lead, k_len)
    return padded[..., :k_len].expand(shape)


def _efficient_cuda(
    query: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's memory-efficient CUDA attention with its log-sum-exp (``compute_log_sumexp``), the GPU twin of
    the CPU flash kernel: one fused pass, O(n) memory. Rows that see no key come back as 0 (callers ignore them)."""
    bias = None if mask is None else _aligned_bias(mask, (*query.shape[:3], k.shape[2]))
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, k, v, bias, True, 0.0, causal, scale=scaling
    )
    lse = lse[..., : query.shape[2]].float()  # the kernel pads the lse's row dimension
    if mask is not None:  # a fully masked row is NaN in some kernel versions: 0, as the CPU path returns
        out = torch.where(
            torch.isfinite(lse)[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device)
        )
    return out, lse


def _float_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


def _tiled_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    is_causal: bool,
    softcap: float | None,
    out_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact tiled pass (O(block x n) memory) in :func:`sdpa_with_lse`'s layout."""
    stats = AttentionStats()
    out = tiled_attention(
        query, key, value, attention_mask, scaling, is_causal=is_causal, stats=stats, softcap=softcap,
        out_dtype=out_dtype,
    )  # fmt: skip
    return out.transpose(1, 2), stats.lse


def sdpa_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    is_causal: bool,
    *,
    softcap: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention returning ``(out (B, H, Tq, Dv), lse (B, H, Tq) fp32)``; same scores as transformers' eager
    attention: logits softcapped when ``softcap`` is set, an additive float mask's biases added.

    Rows with no visible key get ``out = 0`` (their lse is meaningless); callers ignore them. ``out_dtype``:
    as :func:`tiled_attention`'s (fp32 keeps a low-precision call's output unrounded for a later correction).
    Softcapping and biased masks go to the exact tiled pass (the fused kernels score plain ``q.k``). The fused
    kernel is PyTorch's flash attention on CPU and its memory-efficient attention on CUDA (both return the lse).
    """
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    fused = flash_cpu_available(query) or _cuda_fused_ok(query)
    if not fused or softcap is not None or has_bias(attention_mask):
        return _tiled_with_lse(query, key, value, attention_mask, scaling, is_causal, softcap, out_dtype)
    if (
        out_dtype is not None and out_dtype != query.dtype
    ):  # the fused kernel computes in the dtype it is given
        query, key, value = query.to(out_dtype), key.to(out_dtype), value.to(out_dtype)
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    mask, causal = None, False
    if attention_mask is None:
        if is_causal and q_len > 1:
            causal = True
            k, v = (
                k[:, :, :q_len],
                v[:, :, :q_len],
            )  # SDPA's upper-left causal alignment, as transformers does
    else:
        mask = _float_mask(visible(attention_mask, is_causal, q_len, k_len, query.device), query.dtype)
    if query.is_cuda:
        try:
            return _efficient_cuda(query, k, v, mask, causal, scaling)
        except RuntimeError as err:  # a shape/dtype/alignment the kernel refuses: the exact tiled pass
            _warn_once(f"attnsurgery: the fused CUDA attention refused a call ({err}); using the tiled pass.")
            return _tiled_with_lse(query, key, value, attention_mask, scaling, is_causal, None, out_dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, k, v, 0.0, causal, attn_mask=mask, scale=scaling
    )
    return out, lse.float()
