"""Counters of object-storage traffic, shared by a process and the loader workers it forks.

The block of counters is allocated in shared memory by :func:`allocate`, which
:func:`segdist.storage.configure` calls: the training process configures storage before its loader
forks, so a worker's GETs and retries land in the same counters the training loop reads each epoch.
A process that counts before any :func:`allocate` (or one started with ``spawn``) gets its own
block; its counts are not seen by its parent. Importing this module allocates nothing.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.sharedctypes

NAMES = ("gets", "heads", "lists", "puts", "mb", "retries", "retry_s", "cache_hits", "cache_fetches",
         "cache_bypass", "cache_evictions")
"""What is counted: requests by kind, MB received, retries, seconds from a failure to the next
response, and the cache's hits, whole-shard fetches, shards streamed past a full cache, and evictions."""

_values = None  # the shared block, once allocated
_lock = None
_mark = [0.0] * len(NAMES)  # what take() returned last, in this process


def allocate() -> None:
    """Allocate the shared counters in this process (once); forked children share them from then on."""
    global _values, _lock
    if _values is None:
        _values = multiprocessing.sharedctypes.RawArray("d", len(NAMES))
        _lock = multiprocessing.Lock()


def add(**counts: float) -> None:
    """Add to counters by name (``add(gets=1, mb=0.5)``)."""
    allocate()
    # Bounded wait: a worker killed while holding the lock must not stall the others; a count is
    # then lost, which a report can afford.
    if not _lock.acquire(timeout=1.0):
        return
    try:
        for name, v in counts.items():
            _values[NAMES.index(name)] += v
    finally:
        _lock.release()


def snapshot() -> dict[str, float]:
    """The totals so far (this process and every worker forked from it after :func:`allocate`)."""
    allocate()
    return dict(zip(NAMES, _values[:]))


def take() -> tuple[tuple[str, ...], list[float]]:
    """Counts since the previous ``take()`` in this process: ``(NAMES, values)``."""
    allocate()
    now = _values[:]
    delta = [a - b for a, b in zip(now, _mark)]
    _mark[:] = now
    return NAMES, delta
