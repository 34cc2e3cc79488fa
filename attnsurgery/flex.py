"""Fused GPU paths for probability-level surgeries, on PyTorch's ``flex_attention`` (compiled Triton kernels).

The tiled pass (:mod:`attnsurgery.kernels`) writes fp32 score blocks to memory; on a GPU that made ACT 2.5-12.5x and
clipped softmax 2-3.7x a stock SDPA prefill (``docs/gpu.md``). Here each surgery is a few flash-style passes that
never write scores, each a ``flex_attention`` call whose ``score_mod`` carries the edit:

* **log-sum-exp** of every query row: ``lse_i = log sum_j exp(s_ij)``, with a 16-wide zero value tensor so the
  pass costs the ``Q K^T`` product and the exponentials, not a value product nobody reads;
* **column sums** (ACT's sink detection), ``c_j = sum_i exp(s_ij - lse_i)``: a *transposed* call, keys as
  queries and queries as keys, whose own log-sum-exp is ``log c_j`` (the score_mod subtracts ``lse_i``; the
  transposed causal mask is ``i >= j``; padding query rows are masked out, so they do not count);
* **ACT's edited output**: rows still sum to 1 after ACT's edit, so scaling the sink columns of row ``i`` by
  ``m_i = beta (1 - P_i) / (1 - beta P_i)`` and renormalising gives exactly ``beta A_is`` on sinks and
  ``A_ij (1 - beta P_i) / (1 - P_i)`` elsewhere: one pass with ``score + log m_i`` on sink columns. The output is
  computed directly (fp32 accumulation), so nothing cancels and no fp32 copy of Q/K/V is needed;
* **clipped softmax**: ``score_mod = log clamp((zeta - gamma) exp(s - lse_i) + gamma, 0, 1)``; the pass normalises
  by its own sum, so its output times ``exp(lse')`` is the clipped (unnormalised) result;
* **MoH's routed heads**: each head's selected queries are packed to the front of its row block (one gather), a
  block mask built from their positions skips the keys past each block's last query and the empty blocks past a
  head's count, and one call serves every head; the outputs scatter back (routed-off pairs are 0).

Only the sparsity pattern is a speed-up: every block mask's ``mask_mod`` is the full truth, and the blocks it marks
"full" are entirely visible (tests check both against a dense mask). Used for inference on CUDA (``flex_ready``);
``ATTNSURGERY_FLEX=0`` turns it off, ``ATTNSURGERY_FLEX=eager`` also runs it uncompiled on CPU (for tests: the
uncompiled form materialises scores and is slow). Scores are plain ``q.k * scale`` plus a boolean mask: softcapped
models and biased float masks keep the tiled path.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kernels import has_bias, repeat_kv, visible

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: the tiled path
    flex_attention = None

try:  # torch >= 2.9: return_lse is deprecated in favour of return_aux
    from torch.nn.attention.flex_attention import AuxRequest

    #: built once, outside the compiled passes (a constant to the compiler, nothing to trace)
    LSE_REQUEST = AuxRequest(lse=True)
except ImportError:  # pragma: no cover
    LSE_REQUEST = None

MODE = os.environ.get("ATTNSURGERY_FLEX", "1")
#: flex_attention's block size (its default): block masks are built on this grid
BLOCK = 128
#: width of the zero value tensor of the passes that only need a log-sum-exp (the smallest tensor-core tile)
NO_VALUE_DIM = 16


def enabled_for(*tensors: torch.Tensor) -> bool:
    """flex_attention is there, not switched off, the tensors are on CUDA (or ``ATTNSURGERY_FLEX=eager``) and no
    gradient flows through them (the score_mods read tensors computed from q and k, which flex does not
    differentiate)."""
    if flex_attention is None or MODE == "0" or not (tensors[0].is_cuda or MODE == "eager"):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def give_up(err: Exception) -> None:
    """A flex path failed (a compiler or Triton error on this machine): warn once and switch the flex paths off
    for this process, so the caller's exact fallback (the tiled pass) serves this and every later call. Under
    ``ATTNSURGERY_FLEX=eager`` (tests) the error is raised instead: there a failure is a bug, not the machine."""
    global MODE
    if MODE == "eager":
        raise err
    MODE = "0"
    _warn(
        f"attnsurgery: the flex_attention path failed ({type(err).__name__}: {str(err)[:300]}); using the exact "
        "tiled pass from now on (set ATTNSURGERY_FLEX=0 to skip the attempt)."
    )


def flex_ready(query: torch.Tensor, call) -> bool:
    """True when this call can take the flex paths: inference (no gradient), a prefill, plain ``q.k`` scores and a
    boolean visibility mask (or none), on CUDA (or anywhere under ``ATTNSURGERY_FLEX=eager``)."""
    if not enabled_for(call.query, call.key, call.value):
        return False
    if call.query_len < 2 or call.kwargs.get("softcap") is not None:
        return False
    if call.kwargs.get("s_aux") is not None or call.kwargs.get("position_bias") is not None:
        return False
    mask = call.attention_mask
    if (
        mask is not None and mask.dim() == 4 and mask.shape[1] > 1
    ):  # a mask per head: the block masks have one
        return False
    return not has_bias(mask)


# -- compilation ---------------------------------------------------------------------------------------------

_COMPILED: dict[Callable, Callable] = {}
_STATIC: set[Callable] = set()  # passes compiled one kernel per shape


def _run(fn: Callable, *args):
    """``fn(*args)`` compiled on CUDA (one Triton kernel per pass; dynamic shapes so new lengths reuse it; one per
    shape where dynamic compilation fails or ``ATTNSURGERY_FLEX_DYNAMIC=0``), eager elsewhere (the reference
    semantics, used by the CPU tests)."""
    if not args[0].is_cuda:
        return fn(*args)
    if fn not in _COMPILED:
        if os.environ.get("ATTNSURGERY_FLEX_DYNAMIC", "1") == "0":
            _STATIC.add(fn)
        _COMPILED[fn] = torch.compile(fn, dynamic=fn not in _STATIC, fullgraph=True)
    try:
        return _COMPILED[fn](*args)
    except Exception as err:
        if fn in _STATIC:
            raise
        _warn(f"attnsurgery: flex_attention with dynamic shapes failed to compile ({type(err).__name__}: "
              f"{str(err)[:200]}); compiling one kernel per shape instead.")  # fmt: skip
        _STATIC.add(fn)
        _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
        return _COMPILED[fn](*args)


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _flex(q, k, v, score_mod, block_mask, scale, lse: bool):
    gqa = q.shape[1] != k.shape[1]
    if not lse:
        return flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa
        )
    if LSE_REQUEST is not None:
        out, aux = flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa,
            return_aux=LSE_REQUEST,
        )  # fmt: skip
        return out, aux.lse
    return flex_attention(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True
    )


# -- block masks -----------------------------------------------------------------------------------------------


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def _from_grid(any_: torch.Tensor, all_: torch.Tensor, mask_mod, q_len: int, k_len: int) -> BlockMask:
    """A BlockMask from a (B, H, QB, KB) grid of "some pair visible" / "every pair visible" blocks."""
    partial = any_ & ~all_

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = dense.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(
            torch.int32
        )  # listed blocks first
        return num, idx

    num, idx = ordered(partial)
    full_num, full_idx = ordered(all_)
    return BlockMask.from_kv_blocks(
        num, idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(q_len, k_len)
    )


def _edges(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block starts, last index (inclusive, clipped to n) and whether each block is whole."""
    start = torch.arange(_blocks(n), device=device) * BLOCK
    last = torch.clamp(start + BLOCK - 1, max=n - 1)
    return start, last, start + BLOCK <= n


_CAUSAL_CACHE: OrderedDict = OrderedDict()


def causal_block_mask(n: int, device: torch.device, transposed: bool = False) -> BlockMask:
    """Causal prefill of ``n`` tokens (query i sees keys 0..i); ``transposed``: rows are keys j, columns queries i,
    visible when ``i >= j``. Built from the block grid (not an n x n mask); one per (n, device) is kept, as every
    layer of a forward shares it."""
    key = (n, str(device), transposed)
    if key in _CAUSAL_CACHE:
        _CAUSAL_CACHE.move_to_end(key)
        return _CAUSAL_CACHE[key]
    start, last, whole = _edges(n, device)
    rs, rl, rw = start[:, None], last[:, None], whole[:, None]
    cs, cl, cw = start[None, :], last[None, :], whole[None, :]
    if transposed:
        any_, all_ = cl >= rs, (cs >= rl) & rw & cw

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx >= q_idx
    else:
        any_, all_ = cs <= rl, (cl <= rs) & rw & cw

        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

    mask = _from_grid(any_[None, None], all_[None, None], mask_mod, n, n)
    _CAUSAL_CACHE[key] = mask
    while len(_CAUSAL_CACHE) > 8:
        _CAUSAL_CACHE.popitem(last=False)
    return mask


@dataclass
class Visibility:
    """Which keys each query of a call sees, as flex block masks: ``forward`` (queries x keys) and, on demand,
    ``transposed`` (keys x real queries, for column sums). ``key_len`` is the number of key columns the passes
    read (a maskless causal prefill reads the first ``query_len``: SDPA's upper-left alignment, as transformers
    uses it with an empty static cache's extra slots)."""

    forward: BlockMask
    key_len: int
    _allowed: torch.Tensor | None  # (B, 1, Tq, Tk) bool, None for a maskless causal prefill
    _causal: bool

    @classmethod
    def of(cls, call) -> Visibility:
        q_len, k_len = call.query_len, call.key_len
        device = call.query.device
        if call.attention_mask is None and call.is_causal:
            return cls(causal_block_mask(q_len, device), q_len, None, True)
        allowed = visible(call.attention_mask, call.is_causal, q_len, k_len, device)
        allowed = allowed[:, :1].expand(-1, 1, q_len, k_len)  # a per-head mask is not something models pass

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed[b, 0, q_idx, kv_idx]

        forward = create_block_mask(mask_mod, allowed.shape[0], None, q_len, k_len, device=device)
        return cls(forward, k_len, allowed, False)

    def transposed(self, query_valid: torch.Tensor | None, q_len: int) -> BlockMask:
        """Rows: key columns; columns: query rows that are real (``query_valid`` (B, Tq) or None: all)."""
        device = self.forward.kv_num_blocks.device
        if self._causal and (query_valid is None or bool(query_valid.all())):
            return causal_block_mask(q_len, device, transposed=True)
        if self._allowed is None:
            allowed = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()[None, None]
        else:
            allowed = self._allowed
        if query_valid is not None:
            allowed = allowed & query_valid[:, None, :, None].to(device)
        allowed_t = allowed.transpose(-1, -2)  # (B, 1, Tk, Tq)

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed_t[b, 0, q_idx, kv_idx]

        return create_block_mask(
            mask_mod, allowed_t.shape[0], None, allowed_t.shape[2], allowed_t.shape[3], device=device
        )


# -- the passes (each compiled on CUDA) ------------------------------------------------------------------------


def _no_value(key: torch.Tensor) -> torch.Tensor:
    return key.new_zeros(*key.shape[:3], NO_VALUE_DIM)


_WIDE_VALUES: set[str] = set()  # passes whose 16-wide value tensor this machine's compiler refused


def _lse_pass(query, key, block_mask, scale):
    return _flex(query, key, _no_value(key), None, block_mask, scale, lse=True)[1]


def _lse_pass_wide(query, key, block_mask, scale):  # the key itself as the (unread) value: no narrow head dim
    return _flex(query, key, key, None, block_mask, scale, lse=True)[1]


def _narrow_or_wide(name: str, narrow: Callable, wide: Callable, *args) -> torch.Tensor:
    """A log-sum-exp pass with a 16-wide value tensor, or, where the compiler refuses a value head dim unlike the
    keys' (older Triton templates), with full-width values: the same numbers, more work."""
    if name not in _WIDE_VALUES:
        try:
            return _run(narrow, *args)
        except Exception as err:
            if not args[0].is_cuda:
                raise
            _warn(f"attnsurgery: {name} with a {NO_VALUE_DIM}-wide value tensor failed to compile ({err!s:.200}); "
                  "using full-width values.")  # fmt: skip
            _WIDE_VALUES.add(name)
    return _run(wide, *args)


def log_sum_exp(query: torch.Tensor, key: torch.Tensor, vis: Visibility, scale: float) -> torch.Tensor:
    """(B, H, Tq) fp32 log-sum-exp of every query row (``-inf`` for a row that sees no key)."""
    key = key[:, :, : vis.key_len]
    return _narrow_or_wide("log_sum_exp", _lse_pass, _lse_pass_wide, query, key, vis.forward, scale).float()


def _colsum_pass(keys_as_queries, query, lse, block_mask, scale):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score - lse[b, h, kv_idx]

    return _flex(keys_as_queries, query, _no_value(query), score_mod, block_mask, scale, lse=True)[1]


def _colsum_pass_wide(keys_as_queries, query, lse, block_mask, scale):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score - lse[b, h, kv_idx]

    return _flex(keys_as_queries, query, query, score_mod, block_mask, scale, lse=True)[1]


def column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    vis: Visibility,
    scale: float,
    query_valid: torch.Tensor | None,
    out_len: int,
) -> torch.Tensor:
    """(B, H, ``out_len``) fp32 ``sum_i A_ij`` over the real query rows, per query head (a GQA group's heads each
    get their own), zero past the columns the passes read."""
    groups = query.shape[1] // key.shape[1]
    keys = repeat_kv(key[:, :, : vis.key_len], groups).contiguous()
    # a row that sees no key has lse = -inf: keep it finite (it is masked out of the transposed pass anyway)
    lse = torch.nan_to_num(lse, neginf=0.0).float()
    transposed = vis.transposed(query_valid, query.shape[2])
    log_cols = _narrow_or_wide(
        "column_sums", _colsum_pass, _colsum_pass_wide, keys, query, lse, transposed, scale
    )
    cols = log_cols.float().exp()  # a column no query sees: exp(-inf) = 0
    if out_len > cols.shape[-1]:
        cols = torch.nn.functional.pad(cols, (0, out_len - cols.shape[-1]))
    return cols


def _shifted_pass(query, key, value, sinks, shift, block_mask, scale):
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(sinks[b, h, kv_idx], score + shift[b, h, q_idx], score)

    return _flex(query, key, value, score_mod, block_mask, scale, lse=False)


def shifted_columns(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    columns: torch.Tensor,
    shift: torch.Tensor,
    vis: Visibility,
    scale: float,
) -> torch.Tensor:
    """Attention (B, H, Tq, Dv) with ``shift`` (B, H, Tq) fp32 added to the scores of the key ``columns``
    (B, H, Tk) bool, then the row's softmax."""
    n = vis.key_len
    return _run(
        _shifted_pass, query, key[:, :, :n], value[:, :, :n], columns[..., :n].contiguous(),
        shift.float().contiguous(), vis.forward, scale,
    )  # fmt: skip


def _clipped_pass(query, key, value, lse, clip, stretch, gamma, block_mask, scale):
    def score_mod(score, b, h, q_idx, kv_idx):
        p = torch.exp(score - lse[b, h, q_idx])
        clipped = torch.log(torch.clamp(p * stretch + gamma, 0.0, 1.0))
        return torch.where(clip[h], clipped, score - lse[b, h, q_idx])

    return _flex(query, key, value, score_mod, block_mask, scale, lse=True)


def clipped_softmax(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    vis: Visibility,
    scale: float,
    stretch: float,
    gamma: float,
    heads: torch.Tensor,
) -> torch.Tensor:
    """``sum_j clip(stretch * A_ij + gamma, 0, 1) v_j`` on the heads flagged in ``heads`` (H,) bool, plain
    attention on the others: (B, H, Tq, Dv) in the value's dtype. The second pass's weights are the clipped
    probabilities over their own sum ``exp(lse')``; multiplying by it undoes that (plain heads: ``lse' = 0``)."""
    n = vis.key_len
    lse = torch.nan_to_num(log_sum_exp(query, key, vis, scale), neginf=0.0)
    # stretch and gamma go in as 0-d tensors: one compiled kernel serves every setting
    consts = [torch.tensor(x, dtype=torch.float32, device=query.device) for x in (stretch, gamma)]
    out, lse2 = _run(
        _clipped_pass, query, key[:, :, :n], value[:, :, :n], lse, heads.to(query.device), *consts,
        vis.forward, scale,
    )  # fmt: skip
    weight = torch.exp(lse2.float()).nan_to_num(0.0)  # a row whose clipped weights are all 0: exp(-inf) = 0
    for s in range(0, out.shape[2], 4096):  # in place, in fp32 row chunks: no fp32 copy of the whole output
        rows = slice(s, s + 4096)
        out[:, :, rows] = (out[:, :, rows].float() * weight[:, :, rows, None]).nan_to_num(0.0).to(out.dtype)
    return out.to(value.dtype)


def _routed_pass(packed, key, value, block_mask, scale):
    return _flex(packed, key, value, None, block_mask, scale, lse=False)


def routed_block_mask(positions: torch.Tensor, counts: torch.Tensor) -> BlockMask:
    """Block mask of packed causal rows: row r of head h is the query at ``positions`` (B, H, T) (ascending for
    ``r < counts`` (B, H), -1 past it, a row that sees nothing). Packed row block r spans the positions of its
    first and last valid rows: keys past the last are skipped, keys up to the first are fully visible, and a block
    past the count is empty."""
    n = positions.shape[-1]
    start, last_row, whole = _edges(n, positions.device)
    first_pos = positions[..., start]  # (B, H, QB); -1 for a block past the count
    last_valid = torch.minimum(last_row, counts[..., None] - 1).clamp(min=0)
    last_pos = torch.where(first_pos >= 0, positions.gather(-1, last_valid), -1)
    block_full = whole & (start + BLOCK <= counts[..., None])  # every row of the block is a real query
    k_start, k_last, k_whole = _edges(n, positions.device)
    any_ = k_start <= last_pos[..., None]
    all_ = (k_last <= first_pos[..., None]) & block_full[..., None] & k_whole

    def mask_mod(b, h, q_idx, kv_idx):
        return positions[b, h, q_idx] >= kv_idx

    return _from_grid(any_, all_, mask_mod, n, n)


def routed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selected: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal prefill attention of the (query, head) pairs in ``selected`` (B, H, T) bool only: (B, H, T, Dv) with
    zeros elsewhere. Each head's selected rows are packed to the front (ascending positions, so a block of them
    sees keys up to its last row's position), and the blocks past a head's count are never computed."""
    bsz, heads, n, dim = query.shape
    counts = selected.sum(-1)  # (B, H)
    order = torch.argsort(
        (~selected).to(torch.int8), dim=-1, stable=True
    )  # selected positions first, ascending
    rows = torch.arange(n, device=query.device)
    valid = rows < counts[..., None]  # (B, H, T): packed row r is a selected query
    positions = torch.where(valid, order, -1)  # -1: a packed row that sees no key
    packed = query.gather(2, order[..., None].expand(-1, -1, -1, dim))

    block_mask = routed_block_mask(positions, counts)
    out = _run(_routed_pass, packed, key, value, block_mask, scale)
    out = torch.where(valid[..., None], out, 0.0)
    return torch.zeros_like(out).scatter_(2, order[..., None].expand(-1, -1, -1, out.shape[-1]), out)
