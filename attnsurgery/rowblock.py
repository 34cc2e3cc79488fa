"""The CPU row-block kernel: exact attention that also returns what probability-level surgeries need.

PyTorch's CPU flash kernel gives the output and log-sum-exp but not the column sums ACT's detection reads, and
clipped softmax needs each row's final lse before it can change one probability. :func:`attention` does both in
one pass over blocks of whole query rows (``csrc/rowblock.cpp``): scores from one GEMM, each row normalised while it
is in cache, column sums and clipping fused there, the value product as a second GEMM. On the 2-core CI machine
(one SmolLM2 layer's real q/k/v, fp32, 2 threads) it costs 0.87-1.03x PyTorch's flash kernel where the same pass in
torch ops costs 1.8-2.3x (``evals/bench_rowblock.py``, docs/benchmarks-rowblock.md; whole prefills in
docs/benchmarks-cpu-kernels-time.md). Calls that need neither (MoH's routed rows) take key tiles with an online
softmax (flash attention's loop) instead, which keeps each tile's scores in a core's L2: 0.88-0.96x flash for every
row, 0.70-0.77x for MoH's 7 of 9 heads.

The kernel is C++ compiled on first use with ``torch.utils.cpp_extension`` (about 25 s once per machine and torch
version; cached by torch under ``$TORCH_EXTENSIONS_DIR``). Where no compiler is found or the build fails, callers
keep the exact torch path (:func:`attnsurgery.kernels.tiled_attention`) and a single warning says why;
``ATTNSURGERY_ROWBLOCK=0`` chooses that path on purpose. Inference only: a call that needs gradients takes the
torch path.
"""

from __future__ import annotations

import functools
import os
import platform
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from .kernels import TILE_BYTES, has_bias, visible

SOURCE = Path(__file__).with_name("csrc") / "rowblock.cpp"
#: query rows per block of the whole-row path (times the heads sharing a kv head: 192 GEMM rows on SmolLM2). Fewer
#: rows keep a block's scores nearer the core (1.5 MiB at 2k tokens, in its 2 MiB L2) and give threads more, smaller
#: units; too few starve the GEMMs. Timed on one SmolLM2 layer's real q/k/v at 2 threads (the calls of
#: evals/bench_rowblock.py): 64 rows beat 128 and 256 (the earlier ~6 MiB target) by 2-12% at 2k and 8k tokens; 32
#: rows matched 64 at 512-2k tokens and lost 14% at 8k
BLOCK_ROWS = 64
#: the most one thread's score block may take at very long context (rows shrink below BLOCK_ROWS past it)
MAX_BLOCK_BYTES = TILE_BYTES  # the torch tiled pass's budget (ATTNSURGERY_TILE_MB), read once in kernels

#: the calling convention this file speaks; csrc/rowblock.cpp exports the one it was built with. They differ when a
#: long-running process imported this file and attnsurgery was updated before its first kernel call: torch then
#: compiles the new source, and calling it with the old arguments would fail hours into a job
API = 4

_module: Any = None
_failure: str | None = None


@functools.cache
def _openmp() -> bool:
    """True where ATen parallelises with OpenMP (Linux wheels): ``at::parallel_for`` is a header template whose
    ``#pragma omp parallel`` only exists in code compiled with ``-fopenmp``. Without the flag the kernel's loop ran on
    one thread while MKL split each small GEMM across the others (a second thread gave it 1.18-1.37x where PyTorch's
    flash kernel gets 1.71-1.78x: docs/benchmarks-rowblock.md). Linked with ``-fopenmp``, the module shares torch's already loaded libgomp, so its threads
    are torch's ``torch.set_num_threads`` pool."""
    return platform.system() == "Linux" and "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _flags(openmp: bool) -> list[str]:
    flags = ["-O3"] + (["-fopenmp"] if openmp else [])
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=native")
        # ATen's vector types pick their instruction set from these macros (as PyTorch's own kernels are built)
        capability = torch.backends.cpu.get_cpu_capability()
        if capability in ("AVX2", "AVX512"):
            flags += [f"-DCPU_CAPABILITY_{capability}", f"-DCPU_CAPABILITY={capability}"]
    return flags


def enabled() -> bool:
    return os.environ.get("ATTNSURGERY_ROWBLOCK", "1") != "0"


def load() -> Any:
    """The compiled module, building it on first use; None where it cannot be built (warned once, with why)."""
    global _module, _failure
    if _module is not None or _failure is not None:
        return _module
    # a cached build loads in well under a second; say what the wait is only when there is one (a compile)
    notice = threading.Timer(1.0, _say_compiling)
    notice.daemon = True
    notice.start()
    try:
        from torch.utils.cpp_extension import load as build

        def compiled(openmp: bool) -> Any:
            return build(
                name="attnsurgery_rowblock",
                sources=[str(SOURCE)],
                extra_cflags=_flags(openmp),
                extra_ldflags=["-fopenmp"] if openmp else [],
                verbose=os.environ.get("ATTNSURGERY_ROWBLOCK_VERBOSE", "0") == "1",  # the compiler's output
            )

        try:
            _module = compiled(_openmp())
        except Exception:
            if not _openmp():
                raise
            # a compiler without OpenMP (clang lacking libomp): the kernel still builds, its loop on one thread
            _module = compiled(False)
            warnings.warn(
                "attnsurgery: the CPU row-block kernel was built without OpenMP (the compiler refused -fopenmp), "
                "so its loop runs on one thread; install the compiler's OpenMP support (libgomp / libomp) for "
                "the multi-threaded kernel.",
                RuntimeWarning,
                stacklevel=3,
            )
        if getattr(_module, "API", None) != API:
            raise RuntimeError(
                f"the compiled kernel speaks API {getattr(_module, 'API', None)}, this attnsurgery {API} (was "
                "attnsurgery updated while this process ran? restart it)"
            )
    except Exception as err:  # no compiler, no ninja, an unexpected toolchain: the torch path still works
        _module = None
        _failure = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        warnings.warn(
            "attnsurgery: the CPU row-block kernel could not be built or loaded "
            f"({_failure}); ACT, clipped softmax and MoH use their slower exact torch paths on CPU. A build needs a "
            "C++ compiler (e.g. apt install g++) and ninja (pip install ninja); ATTNSURGERY_ROWBLOCK_VERBOSE=1 "
            "shows the compiler's output, ATTNSURGERY_ROWBLOCK=0 silences this.",
            RuntimeWarning,
            stacklevel=3,
        )
    finally:
        notice.cancel()
    return _module


def _say_compiling() -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, markup=False, soft_wrap=True).print(
        "[attnsurgery] compiling the CPU attention kernel (once per machine and torch version, about 25 s)..."
    )


def ready(call: Any) -> bool:
    """True when ``call`` can take the kernel (see :func:`usable`); the kernel builds (once) on the first call that
    qualifies."""
    return usable(call.query, call.key, call.value, call.attention_mask, call.kwargs)


def usable(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict | None = None,
) -> bool:
    """CPU, inference, plain ``q.k`` scores (no softcap, sinks, position bias or additive bias) and one visibility
    mask for all heads (or none); builds the kernel on first use and is False where it cannot be built."""
    if not enabled() or query.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return False
    # float32 and the half types (computed in float32, as the torch path does); float64 keeps its precision there
    if not all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in (query, key, value)):
        return False
    kwargs = kwargs or {}
    if any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "position_bias")):
        return False
    mask = attention_mask
    if mask is not None and (mask.dim() != 4 or mask.shape[1] > 1 or has_bias(mask)):
        return False
    return load() is not None


#: keys per tile and the score tile's size (heads per kv head x rows x keys, fp32) of the online-softmax path that
#: calls needing neither column sums nor clipping take (MoH's routed rows): the tile stays in a core's L2 where whole
#: rows stream through the shared L3. Measured on SmolLM2 shapes (3 heads per kv head, 8k tokens, the loop then on one
#: thread): 256 rows x 256 keys was fastest of 3x3 shapes from 128 to 512; 0.88-0.96x flash at 2 threads now
TILE_KEYS = 256
TILE_SCORE_BYTES = 3 * 256 * 256 * 4
MIN_TILE_ROWS, MAX_TILE_ROWS = 16, 256


def tile_shape(groups: int, key_len: int) -> tuple[int, int]:
    """(rows per head, keys per tile) of the online-softmax path."""
    rows = TILE_SCORE_BYTES // (4 * groups * TILE_KEYS)
    return max(MIN_TILE_ROWS, min(MAX_TILE_ROWS, rows)), TILE_KEYS


def block_rows(groups: int, key_len: int) -> int:
    per_row = 4 * groups * max(1, key_len)
    return max(1, min(BLOCK_ROWS, MAX_BLOCK_BYTES // per_row))


def _readable(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernel reads it: fp32 rows of unit stride (transformers' transposed projections pass as they
    are, with no copy per layer); anything else as a contiguous fp32 copy."""
    if x.dtype == torch.float32 and x.stride(-1) == 1 and x.stride(-2) >= x.shape[-1]:
        return x
    return x.float().contiguous()


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    is_causal: bool,
    *,
    clip: tuple[torch.Tensor | None, float, float] | None = None,
    column_weights: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Exact attention of ``query`` (B, H, Tq, D) over ``key``/``value`` (B, Hkv, Tk, D|Dv) in fp32.

    ``attention_mask`` and ``is_causal`` as transformers passes them (a boolean or additive 0/-inf mask, or None
    for a plain causal prefill). ``clip=(heads, a, b)``: on ``heads`` ((H,) bool, None = all) the probabilities
    become ``clamp(a p + b, 0, 1)``. ``column_weights`` (B, Tq): also return ``sum_i w_i p_ij`` (B, H, Tk).
    ``active`` (B, H, Tq) bool: compute only those (head, query) rows (MoH's routed pairs); the others are never
    computed: out 0, lse ``+inf``, nothing in the column sums.
    Returns ``out`` (B, H, Tq, Dv) fp32 (a view of (B, Tq, H, Dv) memory: ``out.transpose(1, 2)`` is contiguous, the
    layout an attention function returns), ``lse`` (B, H, Tq) fp32 (``+inf`` on a row that sees no key, whose output
    is 0) and the column sums or None. Call :func:`ready` first.
    """
    module = load()
    bsz, num_heads, q_len, _ = query.shape
    k_len = key.shape[2]
    mask, causal = None, False
    if attention_mask is None:
        causal = is_causal and q_len > 1
    else:
        mask = visible(attention_mask, is_causal, q_len, k_len, query.device)
        mask = mask.expand(mask.shape[0], 1, q_len, k_len).contiguous()
    heads, a, b = None, 0.0, 0.0
    if clip is not None:
        heads, a, b = clip
        heads = torch.ones(num_heads, dtype=torch.bool) if heads is None else heads.to("cpu", torch.bool)
    weights = None if column_weights is None else column_weights.to(torch.float32).expand(bsz, q_len)
    groups = num_heads // key.shape[1]
    if clip is None and column_weights is None:  # plain rows: key tiles with an online softmax
        rows, keys = tile_shape(groups, k_len)
    else:  # whole rows: the column sums and the clipping need each row's final lse
        rows, keys = block_rows(groups, k_len), 0
    out, lse, cols = module.rowblock_attention(
        _readable(query),
        _readable(key),
        _readable(value),
        float(scaling),
        mask,
        causal,
        rows,
        heads,
        float(a),
        float(b),
        weights,
        None if active is None else active.to("cpu", torch.bool).expand(bsz, num_heads, q_len),
        keys,
    )
    return out, lse, (cols if column_weights is not None else None)


def gate_heads_(
    attn: torch.Tensor, logits: torch.Tensor, bias: torch.Tensor, scale: float, head_dim: int
) -> torch.Tensor:
    """Gated attention's elementwise gates in one pass: ``attn *= scale * sigmoid(logits + bias)`` in place, where
    ``attn`` and ``logits`` are fp32 and contiguous with ``bias.numel()`` channels per row (heads x head_dim);
    returns the per-head mean gate, ``(rows, heads)``. Inference on CPU only (no autograd): call :func:`load` first
    and keep the torch ops where it returns None."""
    return load().gate_heads_(attn, logits, bias, float(scale), int(head_dim))
