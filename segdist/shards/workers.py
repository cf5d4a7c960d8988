"""The processes of a build or a verify: how many, the ordered process pool, the progress bar."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys

import cv2
from tqdm import tqdm


def default_workers() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - not Linux
        return max(os.cpu_count() or 1, 1)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one sample per process at a time; OpenCV's own pool would oversubscribe


@contextlib.contextmanager
def parallel_map(workers: int, n_items: int):
    """Yield ``map(f, items)``: in-process for 1 worker, else an ordered process pool.

    forkserver, not fork: workers start from a clean process, so they inherit neither the
    build lock's file descriptor nor threads of a caller that already imported torch.
    """
    if workers <= 1 or n_items <= 1:
        yield map
        return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["segdist.shards.sample", "segdist.shards.verify"])
    chunk = max(1, min(8, n_items // (workers * 8)))
    with ctx.Pool(min(workers, n_items), initializer=_init_worker) as pool:
        yield lambda f, items: pool.imap(f, items, chunksize=chunk)


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    """A tqdm bar over ``iterable`` on stderr (samples), off when not ``enabled`` or not a terminal."""
    return tqdm(iterable, total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True,
                disable=None if enabled else True, leave=False)
