"""glibc malloc settings for training on CPU.

By default glibc returns freed memory to the system (``munmap`` above a
dynamic threshold of at most 32 MiB, a trim of the heap's top above another),
and gives each thread that allocates its own arena of 64 MiB heaps. A
training step frees and reallocates the same activation buffers at every
step, so each step faulted its buffers back in page by page: with
``llama-micro`` on one thread, in a thread as Ray Train runs the training
function, a training step of 16 x 64 tokens took 37-38 ms with about 3,000
minor page faults, and a no-grad forward of 64 x 64 tokens (ADAPT's meta
passes; its logits are 32 MiB) 44 ms with 8,193. With the three settings
below (thresholds fixed, freed memory kept, one arena), 32-34 ms and 31-34
ms, with no page faults. The two thresholds without the single arena
still faulted about 3,000 times per training step (the training thread's
own arena); the single arena alone, all 8,193 of the forward; the trim
threshold alone 7 times as many as the defaults (60 ms a step).

The cost: memory a process freed stays mapped up to the trim threshold, so
its resident size follows its peak, not its current use. Allocations above
the mmap threshold (256 MiB: larger models' activations) are mapped and
returned as before.

The settings must be in a process's environment when it starts (the arena
count is read then): :func:`ray_env` gives them to a local Ray instance
that raymix starts, whose every process inherits them; :func:`tune_this_process`
sets the two thresholds in a running process (the driver, whose training
runs on its main thread with ``runtime.num_workers=0``). A user's own
``MALLOC_*`` setting wins: nothing is changed where one is set, since the
three only help together. A cluster's processes are left as they are (GPU
training allocates its activations on the GPU).
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30
ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
       "MALLOC_ARENA_MAX": "1"}

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def _user_set() -> bool:
    return any(k.startswith("MALLOC_") for k in os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


def _is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def ray_env() -> dict[str, str]:
    """The environment for a local Ray instance's processes (empty where the
    user set glibc's malloc, or the C library is not glibc)."""
    return {} if _user_set() or not _is_glibc() else dict(ENV)


def tune_this_process() -> bool:
    """Set the two thresholds in this process (see the module docstring);
    whether they were set."""
    if _user_set() or not _is_glibc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD))
                and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD)))
