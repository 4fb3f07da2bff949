"""raymix.allocator: glibc malloc settings that a training process keeps
its freed buffers with, and the user's own settings left alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from raymix import allocator

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc's malloc settings (mallopt, MALLOC_* variables) exist on glibc only")


@glibc
def test_ray_env_gives_all_three_settings_or_none(monkeypatch) -> None:
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert allocator.ray_env() == allocator.ENV
    # A user's own setting wins, and the others are not added beside it: a
    # trim threshold alone (dynamic mmap threshold off) faults far more.
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert allocator.ray_env() == {} and allocator.tune_this_process() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert allocator.ray_env() == {}


CHILD = r"""
import ctypes, sys
import numpy as np
from raymix import allocator
if sys.argv[1] == "1":
    assert allocator.tune_this_process()

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
buf = np.ones(40 << 20 >> 3)  # 40 MiB: above the largest mmap threshold glibc adapts to by itself (32 MiB)
mapped = libc.mallinfo2().hblkhd
del buf
print(mapped >> 20, libc.mallinfo2().fordblks >> 20)
"""


@glibc
def test_tuned_process_keeps_a_freed_buffer_for_the_next_step() -> None:
    """A 40 MiB buffer, as a forward's logits: by default glibc maps it
    apart and unmaps it when freed, so the next step's faults it in page by
    page again; tuned, it comes from the heap and stays there, free, for the
    next step. Read from glibc's own counters (mallinfo2), in child processes
    (this one's malloc state is the suite's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    got = {}
    for tuned in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", CHILD, tuned], env=env, capture_output=True, text=True,
                             check=True)
        got[tuned] = tuple(int(x) for x in out.stdout.split())  # (MiB mapped apart while held, MiB free in the heap after)
    assert got["0"][0] >= 40 and got["0"][1] < 40, got
    assert got["1"][0] == 0 and got["1"][1] >= 40, got
