"""The node-local shard cache (``data.cache_dir``, segdist/storage/cache.py) against the moto endpoint of
tests/s3util.py: processes share it and each shard is fetched once per node, a warm epoch makes no
GET, its size stays within ``data.cache_limit`` while several processes read, nothing is deleted
under a reader, and neither a failed nor a killed fetch leaves a temporary file behind."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from segdist import storage
from tests.s3util import client, s3_server, store  # noqa: F401 (fixtures)

CTX = multiprocessing.get_context("fork")  # the loader's way: settings and counters are inherited


@pytest.fixture(scope="module")
def blobs(s3_server, tmp_path_factory) -> list[tuple[str, bytes]]:
    """6 shards of ~200 KB (2 samples of random bytes each) under s3://data/blobs/: ``[(url, bytes)]``."""
    rng, out = np.random.default_rng(1), []
    folder = tmp_path_factory.mktemp("blobs")
    c = client(s3_server.url)
    for i in range(6):
        path = folder / f"blob-{i:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for j in range(2):
                w.write({"__key__": f"b{i}_{j}", "image.png": rng.bytes(100_000 + 4_000 * i), "mask.png": b"m"})
        c.put_object(Bucket="data", Key=f"blobs/{path.name}", Body=path.read_bytes())
        out.append((f"s3://data/blobs/{path.name}", path.read_bytes()))
    return out


def read_all(url: str) -> bytes:
    with storage.open_remote(url) as f:
        return f.read()


def _read_each(urls: list[str], digests: list[str], rounds: int, start) -> None:
    """A child process: read every URL ``rounds`` times through the cache; exit 1 on wrong bytes."""
    start.wait()
    for r in range(rounds):
        for i in np.random.default_rng(os.getpid() + r).permutation(len(urls)):
            if hashlib.sha256(read_all(urls[i])).hexdigest() != digests[i]:
                os._exit(1)


def run_readers(n: int, blobs, rounds: int = 1) -> None:
    urls, digests = [u for u, _ in blobs], [hashlib.sha256(d).hexdigest() for _, d in blobs]
    start = CTX.Barrier(n)
    procs = [CTX.Process(target=_read_each, args=(urls, digests, rounds, start)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * n


def tar_gets(store) -> Counter:
    return Counter(g["key"] for g in store.faults.gets if g["key"].endswith(".tar"))


def cache_bytes(folder: Path) -> int:
    """Bytes of every file in the cache, each inode once (a .part renamed mid-scan is not counted twice)."""
    sizes = {}
    for e in os.scandir(folder):
        if not e.name.startswith("."):
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            sizes[st.st_ino] = st.st_size
    return sum(sizes.values())


def test_processes_sharing_a_cache_fetch_each_shard_once_and_a_warm_epoch_makes_no_get(store, blobs, tmp_path):
    storage.configure(cache_dir=str(tmp_path / "cache"))
    run_readers(2, blobs)  # both start together and contend for the same shards
    assert tar_gets(store) == Counter({u.split("/", 3)[3]: 1 for u, _ in blobs})
    assert not list((tmp_path / "cache").glob("*.part"))

    store.faults.reset()  # a warm epoch in a process that has not read these yet: one HEAD per shard, no GET
    assert [read_all(u) for u, _ in blobs] == [d for _, d in blobs]
    assert not tar_gets(store) and store.faults.count("HEAD", ".tar") == len(blobs)
    store.faults.reset()  # and its next epoch: no request at all
    assert [read_all(u) for u, _ in blobs] == [d for _, d in blobs]
    assert not store.faults.log


def test_the_cache_stays_within_its_limit_and_deletes_nothing_being_read(store, blobs, tmp_path):
    folder = tmp_path / "cache"
    limit = int(2.5 * max(len(d) for _, d in blobs))
    storage.configure(cache_dir=str(folder), cache_limit=limit)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], cache_bytes(folder))
            time.sleep(0.001)

    folder.mkdir()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run_readers(3, blobs, rounds=2)  # 3 processes, each every shard twice in its own order
    finally:
        done.set()
        sampler.join()
    assert 0 < peak[0] <= limit
    assert not list(folder.glob("*.part")) and cache_bytes(folder) <= limit

    (u0, d0), (u1, d1), (u2, d2) = blobs[:3]
    before = storage.stats.snapshot()
    with storage.open_remote(u0) as held:  # read the other shards while this one is open
        for url, data in blobs[1:]:
            assert read_all(url) == data  # each needs room: only what nobody reads may go
            assert os.fstat(held.fileno()).st_nlink == 1  # still in the cache, not just an open unlinked file
        assert held.read() == d0
    with storage.open_remote(u0) as a, storage.open_remote(u1) as b:  # two held: a third cannot fit
        assert read_all(u2) == d2 and a.read() == d0 and b.read() == d1
    after = storage.stats.snapshot()
    assert after["cache_evictions"] > before["cache_evictions"] and after["cache_bypass"] == before["cache_bypass"] + 1
    assert cache_bytes(folder) <= limit


def _fetch_stalled(url: str) -> None:
    read_all(url)


def test_a_failed_or_killed_fetch_leaves_no_temporary(store, blobs, tmp_path):
    folder = tmp_path / "cache"
    storage.configure(cache_dir=str(folder), retries=1)
    (u0, _), (u1, d1) = blobs[:2]
    store.faults.reset(["truncate"], after="reset", match="blob-000000")
    with pytest.raises(storage.RemoteError, match=r"^reading s3://data/blobs/blob-000000.tar failed at byte [1-9]"):
        read_all(u0)
    assert not list(folder.iterdir()) or [p.name for p in folder.iterdir()] == [".lock"]

    store.faults.reset(["stall"], match="blob-000001")
    store.faults.stall_s = 20.0
    child = CTX.Process(target=_fetch_stalled, args=(u1,))
    child.start()
    deadline = time.monotonic() + 20
    while not list(folder.glob("*.part")) and time.monotonic() < deadline:
        time.sleep(0.02)
    while not [g for g in store.faults.gets if g["fault"] == "stall"] and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # the body is stalled now
    child.kill()  # mid-fetch: its .part stays, its lock goes with it
    child.join(10)
    assert len(list(folder.glob("*.part"))) == 1
    store.faults.reset()
    assert read_all(u1) == d1  # the next reader removes the dead one's .part and fetches
    assert not list(folder.glob("*.part"))
