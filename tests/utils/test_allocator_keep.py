"""dino_d2.utils.allocator.keep_freed_memory: glibc keeps freed memory for reuse, unless told not to."""

import platform
import subprocess
import sys

import pytest

from dino_d2.utils.allocator import keep_freed_memory

__all__ = []

# A child process: mallopt changes the whole process, and the test must see fresh defaults.
_CHILD = """
import resource, sys, torch
from dino_d2.utils.allocator import keep_freed_memory
torch.set_num_threads(1)
applied = keep_freed_memory() if sys.argv[1] == "1" else False
x = torch.ones(64 * 1024 * 1024 // 2, dtype=torch.bfloat16)  # 64 MiB: above any mmap threshold
(x + x).sum()  # the first allocation of that size
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    (x + x).sum()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _child(apply: str):
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, apply], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults_kept = _child("1")
    assert applied
    _, faults_default = _child("0")
    # By default each of the 20 additions maps its 64 MiB result anew and faults it in (16384
    # faults with 4 KiB pages, at least one with huge pages); kept, the memory is reused.
    assert faults_kept < 20 <= faults_default - faults_kept, (faults_kept, faults_default)


def test_environment_variable_turns_it_off(monkeypatch):
    monkeypatch.setenv("DINO_D2_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
