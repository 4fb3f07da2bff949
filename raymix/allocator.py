"""glibc malloc thresholds for the training process.

By default glibc maps a large allocation apart and unmaps it when it is
freed (above a threshold it adapts, up to 32 MiB), and returns the heap's
free top to the system above another. A pass that frees and reallocates
the same large buffers (ADAPT's meta passes of 64 examples: 32 MiB of
logits for ``llama-micro`` at 64 tokens) then faults them back in page by
page every time. With both thresholds fixed high (mmap at 256 MiB, trim at
1 GiB; ``mallopt``), a no-grad forward of 64 x 64 tokens on a thread, as Ray
Train runs the training function, took 33.8 ms with 615 minor page faults
against 43.8 ms with 8,193 (``llama-micro``, one thread).

Set in the training process only, when its loop starts
(:func:`tune_this_process`), not in the environment of every Ray process:
with the thresholds and one malloc arena (``MALLOC_ARENA_MAX=1``, which a
training step of 16 x 64 tokens on a thread needs to stop faulting at all:
37-38 ms to 32-34 ms in the same measurement) in all of a local Ray's
processes, shard preparation took 11.7-12.0 s against 9.2-9.4 s at 20
tasks (7.2-8.2 s against 5.8-6.8 s at 1,000) and the training loop was
unchanged within its spread (``task_runs``, two runs of each, alternated).

The cost: memory the training process freed stays mapped up to the trim
threshold, so its resident size follows its peak rather than its current
use. Allocations above 256 MiB (larger models' activations) are mapped and
returned as before. A user's own ``MALLOC_*`` or ``glibc.malloc`` tunable
wins: nothing is changed where one is set.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def user_set() -> bool:
    """Whether the environment sets glibc's malloc itself."""
    return any(k.startswith("MALLOC_") for k in os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


def tune_this_process() -> bool:
    """Fix both thresholds in this process (see the module docstring);
    whether they were set (not on another C library, nor where the user
    set malloc's own)."""
    if user_set() or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD))
                and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD)))
