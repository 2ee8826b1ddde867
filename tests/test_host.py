"""tune_glibc_malloc: freed large blocks stay in the heap, so reusing them faults in no new pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each probe is a fresh Python process

PROBE = """
import resource, sys
import torch
torch.set_num_threads(1)  # the fill on one thread: the count is then the allocator's alone
from msit_rec.host import tune_glibc_malloc
tuned = tune_glibc_malloc() if sys.argv[1] == "tune" else None
def touch():
    torch.ones(16 << 20)  # 64 MiB written and freed: above glibc's mmap threshold
for _ in range(10):  # the heap settles at its working size first
    touch()
faults = []
for _ in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, sorted(faults)[5])  # the median block: one heap growth in the run (seen in CI: one block's pages
# faulted once in ten) is not what this measures
"""


def _faults_per_block(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True).stdout
    tuned, faults = out.split()
    return tuned, float(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_malloc_reuses_pages_of_freed_large_blocks():
    _, default_faults = _faults_per_block("default")
    tuned, tuned_faults = _faults_per_block("tune")
    assert tuned == "True"
    assert default_faults > 4096  # 64 MiB = 16384 pages of 4 KiB (fewer with transparent huge pages)
    assert tuned_faults < default_faults / 20
