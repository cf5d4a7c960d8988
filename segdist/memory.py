"""Keep glibc from handing freed memory back to the OS on every training step (CPU training).

Why: PyTorch's CPU allocator is plain ``malloc``/``free``. glibc serves every block above its
mmap threshold (128 KiB, rising with use to at most 32 MiB on 64-bit) with a fresh ``mmap``
and ``munmap``s it on ``free``; smaller blocks come from the heap, whose free top is trimmed
back to the OS past 128 KiB. A segmentation step allocates and frees activations of tens of MB
(a (16, 32, 160, 160) float32 activation is 52 MB), so each step maps fresh zeroed pages and
takes a minor page fault on each 4 KiB page it first touches: hundreds of thousands per step,
each a kernel entry plus zeroing. ``segdist bench train`` measures it (docs/benchmarks.md).

:func:`tune_malloc` sets, through ``mallopt``, what these environment variables would set at
start-up::

    MALLOC_MMAP_MAX_=0                # no mmap'ed blocks: large blocks come from the heap
    MALLOC_TRIM_THRESHOLD_=2147483647 # never trim the heap's free top back to the OS

Freed memory then stays mapped in the process and is reused by the next step without faults.
The cost: the process's RSS stays at its peak (it would reach that peak every step anyway).
Setting the trim threshold also stops glibc's dynamic mmap threshold, as the variable does.

The commands that run the network batch after batch -- ``segdist train``, ``eval``, ``predict``
and ``demo`` (:data:`segdist.cli.BATCH_LOOPS`) -- call it first thing (``segdist.cli.main``).
Without it, ``segdist eval`` of a 59-class model on clothing-parsing's 803 training photos spent
4.1 of its 10.5 CPU minutes in the kernel. Other commands do not (their allocations
do not repeat batch after batch, and a held heap would only grow their RSS).
The settings hold for this process and for processes it *forks* afterwards (loader workers);
a process started with exec (``accelerate launch``, spawn) must call it again, or inherit the
environment variables instead. Where the user has set any ``MALLOC_*_`` tuning variable, it is
left alone: the user's choice wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
"""glibc's ``mallopt`` parameter numbers (malloc.h)."""
TRIM_THRESHOLD = 2**31 - 1
"""The largest value ``mallopt``'s int takes: a heap top below 2 GiB is never trimmed."""

ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
"""The environment variables with the same effect, for processes started with exec."""
USER_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
             "MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "SEGDIST_MALLOC")
"""Variables through which a user tunes glibc malloc (``SEGDIST_MALLOC=default``: leave glibc's defaults);
when one is set, :func:`tune_malloc` does nothing."""


def tune_malloc() -> bool:
    """Apply the settings above to this process with ``mallopt``; True when both took effect.

    False (and nothing changed) on a libc other than glibc (musl, macOS, Windows), or when the
    user set a ``MALLOC_*`` tuning variable or ``GLIBC_TUNABLES``. Safe to call more than once.
    """
    if platform.libc_ver()[0] != "glibc" or any(v in os.environ for v in USER_VARS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error; order: the trim threshold first, as glibc's env parsing does
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and mallopt(M_MMAP_MAX, 0) == 1


MALLOC_SETTINGS = {"default": "no MALLOC_* variables: the course on glibc's defaults, segdist as shipped "
                              "(tune_malloc() at start, as `segdist train` does)",
                   "env": "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 in the environment at start-up",
                   "mallopt": "segdist.memory.tune_malloc() called first thing in both processes"}
"""How each loop's process in ``segdist bench train`` is started (see this module). ``default`` is how users run each:
its speedup is the headline (the course loop as users run it vs segdist as shipped)."""
