"""attnsurgery.train.heap: inside keep_freed_memory a freed large block is reused without new page faults, and the
defaults come back on exit (a large block is again a fresh mapping that faults its pages in).

Each measurement runs in a fresh interpreter: glibc moves a thread to a secondary arena for good after one failed
allocation (any earlier test that provokes an out-of-memory error in the same worker), and a secondary arena maps
every block above 64 MB fresh whatever mallopt says, so the page counts depend on what ran before in the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from attnsurgery.train.heap import _glibc

MIB = 256  # well above glibc's 32 MB mmap ceiling: without the kept heap every such block is a fresh mapping
PAGES = MIB * 1024 * 1024 // 4096

pytestmark = pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's (Linux)")

_PROBE = f"""
import json, resource, sys
import torch
from attnsurgery.train.heap import keep_freed_memory

def faults_of_third_block():
    # minor page faults taken while a {MIB} MB block is allocated, filled and freed a third time: the steady state of
    # a training loop. The second is not always it: torch allocates with posix_memalign, whose request carries
    # alignment slack, so a freed first block that a small allocation has cut off from the heap's top is too short
    # for the same request; the second block then comes from the top, and the two free neighbours merge
    for _ in range(2):
        torch.empty({MIB} * 2**20, dtype=torch.uint8).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty({MIB} * 2**20, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

result = {{"fresh": faults_of_third_block()}}
with keep_freed_memory(enabled=sys.argv[1] == "on") as on:
    result["on"] = on
    result["inside"] = faults_of_third_block()
result["after"] = faults_of_third_block()
print(json.dumps(result))
"""


def _probe(mode: str, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                          timeout=300, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kept_heap_reuses_pages_and_defaults_return():
    # the default: a fresh mapping each time, every page faulted in again (PAGES faults, or PAGES / 512 where
    # transparent huge pages are on for every mapping; relative checks below hold either way)
    got = _probe("on")
    assert got["fresh"] >= PAGES // 512 // 2, got
    assert got["on"], got
    assert got["inside"] * 10 <= got["fresh"], got
    assert got["after"] * 2 >= got["fresh"], got  # restored on exit


def test_switches_off(monkeypatch):
    got = _probe("off")
    assert not got["on"] and got["inside"] >= PAGES // 512 // 2, got
    monkeypatch.setenv("ATTNSURGERY_KEEP_HEAP", "0")
    got = _probe("on", env=dict(os.environ))
    assert not got["on"] and got["inside"] >= PAGES // 512 // 2, got
