"""Training keeps freed memory in the process heap (glibc): each step's large tensors reuse the previous step's pages.

A training step allocates and frees the same large tensors every step: Gemma-3's 262k-word logits are 1 GB per
1,024 tokens, and the teacher's, the student's, the kd softmax and their gradient are one each. glibc serves every
block above 32 MB with a fresh ``mmap`` and unmaps it on ``free``, so each step faults in and zeroes gigabytes of
new pages in the kernel. Measured (docs/benchmarks-bf16.md, 2 threads, batch 4 x 256): a Gemma-3 gated-retrofit
step 1.63x faster in fp32 (12.7 s -> 7.8 s) and 2.45x under bf16 autocast, which makes more short-lived copies;
SmolLM2 steps 1.04-1.06x; the same arithmetic either way. The price is peak memory: the heap keeps what it once
held, up to 1.24x the resident peak on Gemma-3 (10.5 GB against 8.5 GB). PyTorch's CPU tuning guide gets the same
by preloading jemalloc or tcmalloc; this is the part of it a running process can still switch on, with the C
library's own ``mallopt``.

Inside :func:`keep_freed_memory` the heap serves every size (no ``mmap`` per block) and is never trimmed; on exit
the defaults come back and the free memory is returned to the system (``malloc_trim``). Elsewhere than glibc
(macOS, Windows, musl) it does nothing. ``ATTNSURGERY_KEEP_HEAP=0`` turns it off. One case it cannot help: after a
failed allocation (an out-of-memory error caught and survived) glibc moves the thread to a secondary arena for the
rest of the process, and a secondary arena maps every block above 64 MB fresh whatever ``mallopt`` says; a training
run in its own process (``attnsurgery train``) is not affected.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's defaults, restored on exit
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present on glibc only (musl has mallopt but ignores it)
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Keep freed blocks in the heap for the duration (glibc only); yields whether it is on."""
    libc = _glibc() if enabled and os.environ.get("ATTNSURGERY_KEEP_HEAP", "1") != "0" else None
    if libc is None:
        yield False
        return
    try:
        # -1: never trim (malloc.h's documented value); no block by mmap: the heap serves every size
        on = bool(libc.mallopt(_M_TRIM_THRESHOLD, -1)) and bool(libc.mallopt(_M_MMAP_MAX, 0))
        yield on
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)  # the kept memory back to the system
