"""attnsurgery.train.heap: inside keep_freed_memory a freed large block is reused without new page faults, and the
defaults come back on exit (a large block is again a fresh mapping that faults its pages in)."""

from __future__ import annotations

import resource

import pytest
import torch

from attnsurgery.train.heap import _glibc, keep_freed_memory

MIB = 256  # well above glibc's 32 MB mmap ceiling: without the kept heap every such block is a fresh mapping
PAGES = MIB * 1024 * 1024 // 4096

pytestmark = pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's (Linux)")


def _faults_of_second_block() -> int:
    """Minor page faults taken while a MIB block is allocated, filled and freed a second time."""
    torch.empty(MIB * 1024 * 1024, dtype=torch.uint8).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(MIB * 1024 * 1024, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_kept_heap_reuses_pages_and_defaults_return():
    # the default: a fresh mapping each time, every page faulted in again (PAGES faults, or PAGES / 512 where
    # transparent huge pages are on for every mapping; relative checks below hold either way)
    fresh = _faults_of_second_block()
    assert fresh >= PAGES // 512 // 2, fresh
    with keep_freed_memory() as on:
        assert on
        kept = _faults_of_second_block()
    assert kept * 10 <= fresh, (kept, fresh)
    assert _faults_of_second_block() * 2 >= fresh  # restored on exit


def test_switches_off(monkeypatch):
    with keep_freed_memory(enabled=False) as on:
        assert not on
    monkeypatch.setenv("ATTNSURGERY_KEEP_HEAP", "0")
    with keep_freed_memory() as on:
        assert not on
        assert _faults_of_second_block() >= PAGES // 512 // 2
