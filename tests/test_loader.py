"""segdist.loader: persistent workers, the shared-memory ring, and every way a worker can fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segdist.errors import UserError
from segdist.loader import Loader
from tests.shardutil import make_loader
from segdist.shards import open_shards
from segdist.stream import ShardStream
from tests.shardutil import UNEVEN, sample_bytes, write_shards


def train_stream(shards, workers, batch_size=2, **kw):
    urls, sizes = open_shards(str(shards)).split("train")
    return ShardStream(urls, sizes, batch_size=batch_size, image_size=32, train=True, num_workers=workers,
                       seed=4, **kw)


def batches_by_epoch(loader, epochs):
    return [[(b["key"], b["image"], b["mask"]) for b in loader.epoch(e)] for e in epochs]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_persistent_loader_equals_one_loader_per_epoch(shards, workers):
    """Workers that run on across epochs (and hold a 2-slot ring) deliver what per-epoch loaders do."""
    with Loader(train_stream(shards, workers), end_epoch=3, pin_memory=False, prefetch=2) as loader:
        got = batches_by_epoch(loader, range(3))
    urls, sizes = open_shards(str(shards)).split("train")
    for e in range(3):
        want = list(make_loader(urls, sizes, batch_size=2, image_size=32, train=True, num_workers=workers,
                                seed=4, epoch=e, pin_memory=False))
        assert [k for k, _, _ in got[e]] == [b["key"] for b in want]
        # batches held while later ones were decoded into the same ring slots are intact
        assert all(torch.equal(i, b["image"]) and torch.equal(m, b["mask"]) for (_, i, m), b in zip(got[e], want))


def test_worker_process_batches_equal_in_process_batches(shards):
    """The shared-memory ring path and the in-process path decode the same pixels for every key."""
    urls, sizes = open_shards(str(shards)).split("val")
    rows = {}
    for workers in (0, 2):
        stream = ShardStream(urls, sizes, batch_size=3, image_size=32, train=False, num_workers=workers)
        with Loader(stream, end_epoch=1, pin_memory=False) as loader:
            rows[workers] = {k: (i, m) for b in loader.epoch(0) for k, i, m in zip(b["key"], b["image"], b["mask"])}
    assert rows[0].keys() == rows[2].keys() and len(rows[0]) == sum(UNEVEN)
    assert all(torch.equal(rows[0][k][0], rows[2][k][0]) and torch.equal(rows[0][k][1], rows[2][k][1]) for k in rows[0])


def test_resumed_persistent_loader_continues_mid_epoch(shards):
    with Loader(train_stream(shards, 2, batch_size=1), end_epoch=2, pin_memory=False) as loader:
        full = [[b["key"] for b in loader.epoch(e)] for e in range(2)]
    with Loader(train_stream(shards, 2, batch_size=1), start_epoch=0, start_batch=3, end_epoch=2,
                pin_memory=False) as loader:
        first = loader.epoch(0)
        assert len(first) == len(full[0]) - 3
        rest = [[b["key"] for b in first], [b["key"] for b in loader.epoch(1)]]
    assert rest == [full[0][3:], full[1]]


def test_leaving_an_epoch_early_still_gives_the_next_epoch_whole(shards):
    with Loader(train_stream(shards, 2), end_epoch=2, pin_memory=False, prefetch=1) as loader:
        want = [b["key"] for b in Loader(train_stream(shards, 2), start_epoch=1, end_epoch=2,
                                         pin_memory=False).epoch(1)]
        it = iter(loader.epoch(0))
        next(it)
        second = loader.epoch(1)
        assert [b["key"] for b in second] == want
        with pytest.raises(ValueError, match="not ahead"):
            loader.epoch(0)
        with pytest.raises(ValueError, match="already iterated"):
            iter(second)


def test_close_stops_the_workers(shards):
    loader = Loader(train_stream(shards, 2), pin_memory=False)  # unbounded epochs
    next(iter(loader.epoch(0)))
    procs = list(loader._procs)
    assert len(procs) == 2 and all(p.is_alive() for p in procs)
    loader.close()
    assert not any(p.is_alive() for p in procs)
    assert [p.exitcode for p in procs] == [0, 0]  # they stopped themselves, none had to be terminated


def test_a_worker_without_batches_waits_instead_of_running_ahead(tmp_path):
    """3 samples, batch 2, 2 workers: worker 1 has no batches; unbounded, it must still block."""
    out = write_shards(tmp_path / "s", {"train": [3]}, size=32)
    urls, sizes = open_shards(str(out)).split("train")
    loader = Loader(ShardStream(urls, sizes, batch_size=2, image_size=32, train=True, num_workers=2),
                    pin_memory=False, prefetch=2)
    assert [len(list(loader.epoch(e))) for e in range(3)] == [1, 1, 1]
    procs = list(loader._procs)
    import time

    time.sleep(1.5)
    idle_cpu = __import__("psutil").Process(procs[1].pid).cpu_times()
    loader.close()
    assert [p.exitcode for p in procs] == [0, 0]
    assert idle_cpu.user + idle_cpu.system < 1.0  # a spinning worker burns the whole 1.5 s and more


@pytest.mark.timeout(120)
def test_a_worker_killed_mid_message_is_an_error_not_a_hang(tmp_path):
    """Device-decode messages carry JPEG bytes (MBs): a worker killed half-way through one."""
    import os
    import signal
    import time

    import cv2
    import webdataset as wds

    out = write_shards(tmp_path / "s", {"train": [1]}, size=32)
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(out / "train-000000.tar")) as w:  # noise JPEGs: ~0.5 MB each
        for i in range(24):
            img = cv2.imencode(".jpg", rng.integers(0, 255, (512, 512, 3), np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 98])[1]
            w.write({"__key__": f"k{i}", "image.jpg": img.tobytes(), "mask.png": sample_bytes(i, 32)[1]})
    stream = ShardStream([str(out / "train-000000.tar")], [24], batch_size=4, image_size=32, train=True,
                         num_workers=1, device_decode=True)
    loader = Loader(stream, pin_memory=False)
    it = iter(loader.epoch(0))
    assert len(next(it)["jpeg"][0]) > 100_000
    time.sleep(1.0)  # the worker is now blocked half-way through sending a 2 MB message
    os.kill(loader._procs[0].pid, signal.SIGKILL)
    with pytest.raises(UserError, match="worker 0 died.*-9"):
        for _ in range(10):
            next(it)
    loader.close()


def test_a_killed_worker_is_an_error_not_a_hang(shards):
    import os
    import signal

    loader = Loader(train_stream(shards, 2, batch_size=1), pin_memory=False, prefetch=1)
    it = iter(loader.epoch(0))
    next(it)
    os.kill(loader._procs[1].pid, signal.SIGKILL)
    with pytest.raises(UserError, match="worker 1 died.*-9"):
        for _ in range(100):  # its already-decoded batch may still arrive first
            next(it)
    loader.close()


def test_a_corrupt_image_in_a_worker_is_a_user_error(tmp_path):
    import webdataset as wds

    out = write_shards(tmp_path / "s", {"train": [4]}, size=32)
    with wds.TarWriter(str(out / "train-000000.tar")) as w:  # same count, one image is garbage
        for i in range(4):
            img, mask = sample_bytes(i, 32)
            w.write({"__key__": f"k{i}", "image.png": img if i != 2 else b"not an image", "mask.png": mask})
    urls, sizes = open_shards(str(out)).split("train")
    stream = ShardStream(urls, sizes, batch_size=2, image_size=32, train=True, num_workers=2)
    with Loader(stream, end_epoch=1, pin_memory=False) as loader, pytest.raises(UserError, match="shards verify"):
        list(loader.epoch(0))


def test_too_little_shared_memory_is_a_user_error_up_front(tmp_path):
    import shutil

    from segdist.loader import check_shared_memory

    free = shutil.disk_usage(tmp_path).free
    check_shared_memory(1024, str(tmp_path))
    with pytest.raises(UserError, match="data.prefetch.*shm-size"):
        check_shared_memory(2**62, str(tmp_path))
    check_shared_memory(free // 3, str(tmp_path), ranks=2)
    with pytest.raises(UserError, match="8 processes on this node"):  # every rank on a node allocates its own
        check_shared_memory(free // 3, str(tmp_path), ranks=8)


def test_an_epoch_cannot_be_read_after_a_later_one(shards):
    with Loader(train_stream(shards, 2), end_epoch=3, pin_memory=False) as loader:
        first, second = loader.epoch(1), loader.epoch(2)
        assert len(list(second)) == len(second)
        with pytest.raises(ValueError, match="after epoch 2"):
            next(iter(first))
    with Loader(train_stream(shards, 2), end_epoch=2, pin_memory=False) as loader:
        want = [b["key"] for b in Loader(train_stream(shards, 2), start_epoch=1, end_epoch=2,
                                         pin_memory=False).epoch(1)]
        stale = iter(loader.epoch(0))
        next(stale)
        fresh = iter(loader.epoch(1))
        got = [next(fresh)["key"]]
        with pytest.raises(ValueError, match="stale"):  # and it must not eat one of epoch 1's batches
            next(stale)
        assert got + [b["key"] for b in fresh] == want
    loader = Loader(train_stream(shards, 2), pin_memory=False)
    batches = loader.epoch(0)
    loader.close()
    with pytest.raises(ValueError, match="closed"):
        next(iter(batches))


def test_spawned_workers_deliver_the_same_batches(shards):
    """The start method where fork does not exist (macOS, Windows): everything pickles across."""
    with Loader(train_stream(shards, 2), end_epoch=1, pin_memory=False, start_method="spawn") as loader:
        spawned = [(b["key"], b["image"]) for b in loader.epoch(0)]
    with Loader(train_stream(shards, 2), end_epoch=1, pin_memory=False) as loader:
        forked = [(b["key"], b["image"]) for b in loader.epoch(0)]
    assert [k for k, _ in spawned] == [k for k, _ in forked]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(spawned, forked))


def test_workers_exit_when_the_training_process_is_killed(shards):
    """kill -9 of the training process must not leave decoders behind (they poll their parent)."""
    import os
    import subprocess
    import sys
    import time

    import psutil

    script = f"""
import os, signal, sys
from segdist.loader import Loader
from segdist.shards import open_shards
from segdist.stream import ShardStream
urls, sizes = open_shards({str(shards)!r}).split("train")
loader = Loader(ShardStream(urls, sizes, batch_size=1, image_size=32, train=True, num_workers=2), pin_memory=False)
next(iter(loader.epoch(0)))
print(" ".join(str(p.pid) for p in loader._procs), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert p.returncode == -9, p.stderr
    pids = [int(x) for x in p.stdout.split()]
    assert len(pids) == 2

    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in pids)


def test_a_val_loader_forked_beside_a_train_loader_does_not_pin_its_pipes(shards):
    """Workers of a second loader close the first loader's pipe ends, so closing the first stays prompt."""
    import time

    train = Loader(train_stream(shards, 2, device_decode=False), pin_memory=False, prefetch=1)
    next(iter(train.epoch(0)))
    import psutil

    before = {c.pid for c in psutil.Process().children()}
    urls, sizes = open_shards(str(shards)).split("val")
    val = iter(make_loader(urls, sizes, batch_size=2, image_size=32, train=False, num_workers=2, pin_memory=False))
    next(val), next(val)  # one batch from each val worker: both forked while the train loader ran, both started
    val_workers = [c for c in psutil.Process().children() if c.pid not in before]
    import os

    def pipes_of(pid):  # the pipes (by inode) a process holds an end of
        fd_dir = f"/proc/{pid}/fd"
        return {t for t in (os.readlink(f"{fd_dir}/{n}") for n in os.listdir(fd_dir)) if t.startswith("pipe:")}

    train_pipes = {os.readlink(f"/proc/self/fd/{r.fileno()}") for r in train._readers}
    assert len(val_workers) == 2 and len(train_pipes) == 2
    for c in val_workers:
        assert not (train_pipes & pipes_of(c.pid)), "a val worker holds a train loader pipe"
    procs = list(train._procs)
    t0 = time.monotonic()
    train.close()
    assert time.monotonic() - t0 < 3 and [p.exitcode for p in procs] == [0, 0]
    del val


def test_start_method_must_be_fork_or_spawn(shards):
    with pytest.raises(ValueError, match="fork' or 'spawn"):
        Loader(train_stream(shards, 1), start_method="forkserver")


def test_workers_leave_stop_signals_to_the_trainer(shards):
    """SLURM signals every process of a job: decoders must outlive SIGTERM/SIGUSR1 (the trainer
    pauses after its step and closes them), and must not run a forked copy of the trainer's handler."""
    import os
    import signal
    import time

    old = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        loader = Loader(train_stream(shards, 2), pin_memory=False, prefetch=1)
        batches = iter(loader.epoch(0))
        next(batches)
    finally:
        signal.signal(signal.SIGTERM, old)
    procs = list(loader._procs)
    for p in procs:
        os.kill(p.pid, signal.SIGTERM)
        os.kill(p.pid, signal.SIGUSR1)
    time.sleep(1.0)
    assert all(p.is_alive() for p in procs)
    assert len(list(batches)) == loader.stream.num_batches(0) - 1  # still delivering
    loader.close()
    assert all(p.exitcode == 0 for p in procs)
