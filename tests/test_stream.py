"""Stream invariants: equal batches per rank, val exactly once, determinism, resume, http."""

from __future__ import annotations

import functools
import http.server
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from segdist.errors import UserError
from segdist.stream import (Loader, ShardStream, batches_per_epoch, make_loader, plan_epoch, resolve_shards,
                            shuffle)
from tests.shardutil import sample_bytes, write_shards

UNEVEN = [7, 5, 2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), {"train": UNEVEN, "val": UNEVEN}, size=32)


def keys_of(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


def rank_loader(shards, rank, world, workers, train, **kw):
    urls, sizes = resolve_shards(str(shards), "train" if train else "val")
    return make_loader(urls, sizes, batch_size=kw.pop("batch_size", 2), image_size=32, train=train,
                       num_workers=workers, rank=rank, world_size=world, seed=kw.pop("seed", 0),
                       pin_memory=False, **kw)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 3), (3, 8), (4, 2)])
def test_plans_equal_train_batches_and_exact_val_partition(world, workers):
    for sizes in ([7, 5, 2], [1], [30, 1, 1, 1], [4] * 9):
        plans = plan_epoch(sizes, batch_size=2, world_size=world, workers=workers, seed=3, epoch=1, train=True)
        nwk = max(workers, 1)
        per_rank = [sum(p.num_batches for p in plans[r * nwk:(r + 1) * nwk]) for r in range(world)]
        assert per_rank == [batches_per_epoch(sizes, 2, world)] * world
        val = plan_epoch(sizes, batch_size=2, world_size=world, workers=workers, seed=3, epoch=1, train=False)
        covered = Counter((u.shard, i) for p in val for u in p.units for i in range(u.part, sizes[u.shard], u.parts))
        assert sorted(covered) == [(s, i) for s, n in enumerate(sizes) for i in range(n)]
        assert set(covered.values()) == {1}


@pytest.mark.parametrize("workers", [0, 2])
def test_val_over_ranks_visits_every_key_once(shards, workers):
    keys = [k for r in range(2) for k in keys_of(rank_loader(shards, r, 2, workers, train=False))]
    assert len(keys) == sum(UNEVEN) and len(set(keys)) == sum(UNEVEN)


@pytest.mark.parametrize("workers", [0, 2])
def test_train_ranks_yield_equal_full_batches(shards, workers):
    counts = []
    for r in range(2):
        loader = rank_loader(shards, r, 2, workers, train=True, batch_size=3)
        batches = list(loader)
        assert all(b["image"].shape == (3, 3, 32, 32) for b in batches)
        assert len(batches) == len(loader)
        counts.append(len(batches))
    assert counts[0] == counts[1] == batches_per_epoch(UNEVEN, 3, 2)


def test_same_seed_same_order_other_seed_or_epoch_differs(shards):
    a = keys_of(rank_loader(shards, 0, 1, 2, train=True, seed=5))
    b = keys_of(rank_loader(shards, 0, 1, 2, train=True, seed=5))
    c = keys_of(rank_loader(shards, 0, 1, 2, train=True, seed=6))
    d = keys_of(rank_loader(shards, 0, 1, 2, train=True, seed=5, epoch=1))
    assert a == b
    assert a != c and a != d


@pytest.mark.parametrize("workers,skip", [(0, 3), (2, 1), (2, 2), (3, 4)])
def test_resume_yields_exactly_the_remaining_batches(shards, workers, skip):
    full = [b["key"] for b in rank_loader(shards, 1, 2, workers, train=True, seed=1, epoch=2, batch_size=1)]
    rest = [b["key"] for b in rank_loader(shards, 1, 2, workers, train=True, seed=1, epoch=2, batch_size=1,
                                          start_batch=skip)]
    assert rest == full[skip:]


def test_decoded_pixels_match_what_was_written(shards):
    import cv2

    batch = next(iter(rank_loader(shards, 0, 1, 0, train=False, batch_size=4)))
    for key, img, mask in zip(batch["key"], batch["image"], batch["mask"]):
        i = int(key.split("_")[1])
        png_img, png_mask = sample_bytes(i, 32)
        want_img = cv2.cvtColor(cv2.imdecode(np.frombuffer(png_img, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        want_mask = cv2.imdecode(np.frombuffer(png_mask, np.uint8), cv2.IMREAD_UNCHANGED)
        assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(want_img))
        assert torch.equal(mask, torch.from_numpy(want_mask))
    assert batch["image"].dtype == torch.uint8 and batch["mask"].dtype == torch.uint8


def test_http_stream_equals_local(shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls, sizes = resolve_shards(base, "val")
        assert urls[0].startswith("http://127.0.0.1")
        remote = list(make_loader(urls, sizes, batch_size=4, image_size=32, train=False, pin_memory=False))
        local = list(rank_loader(shards, 0, 1, 0, train=False, batch_size=4))
        assert [b["key"] for b in remote] == [b["key"] for b in local]
        assert all(torch.equal(r["image"], l["image"]) and torch.equal(r["mask"], l["mask"])
                   for r, l in zip(remote, local))
    finally:
        server.shutdown()


def test_brace_pattern_and_glob(shards):
    urls, sizes = resolve_shards(str(shards / "train-{000000..000002}.tar"), "train")
    assert sizes == UNEVEN
    urls2, sizes2 = resolve_shards(str(shards / "train-*.tar"), "train")
    assert urls2 == urls and sizes2 == sizes


def test_shuffle_buffer_is_a_permutation():
    items = [{"__key__": str(i)} for i in range(50)]
    out = list(shuffle(iter(items), 8, np.random.default_rng(0)))
    assert sorted(int(s["__key__"]) for s in out) == list(range(50))
    assert [s["__key__"] for s in out] != [s["__key__"] for s in items]


def test_too_small_for_batch_is_a_user_error(shards):
    with pytest.raises(UserError, match="batch_size"):
        ShardStream(["x"], [3], batch_size=4, image_size=32, train=True)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device,workers", [(d, w) for d in DEVICES for w in (0, 2)])
def test_device_jpeg_decode_matches_cpu_decode(tmp_path, device, workers):
    from segdist.stream import to_device

    jpg = write_shards(tmp_path, {"val": [6]}, size=96, ext="jpg")
    urls, sizes = resolve_shards(str(jpg), "val")
    kw = dict(batch_size=3, image_size=64, train=False, pin_memory=False, num_workers=workers)
    on_cpu = list(make_loader(urls, sizes, **kw))
    on_dev = list(make_loader(urls, sizes, device_decode=True, **kw))
    assert all(b["jpeg"] and all(j is not None for j in b["jpeg"]) for b in on_dev)
    for a, b in zip(on_cpu, on_dev):
        ia, ma = to_device(a, device)
        ib, mb = to_device(b, device)
        assert ib.dtype == torch.uint8 and ib.shape == ia.shape and ib.device.type == device
        assert torch.equal(ma, mb)
        # different decoders and resamplers: close, not equal
        assert (ia.float() - ib.float()).abs().mean() < 4.0


# ------------------------------------------------------------------ the persistent loader
def train_stream(shards, workers, batch_size=2, **kw):
    urls, sizes = resolve_shards(str(shards), "train")
    return ShardStream(urls, sizes, batch_size=batch_size, image_size=32, train=True, num_workers=workers,
                       seed=4, **kw)


def batches_by_epoch(loader, epochs):
    return [[(b["key"], b["image"], b["mask"]) for b in loader.epoch(e)] for e in epochs]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_persistent_loader_equals_one_loader_per_epoch(shards, workers):
    """Workers that run on across epochs (and hold a 2-slot ring) deliver what per-epoch loaders do."""
    with Loader(train_stream(shards, workers), end_epoch=3, pin_memory=False, prefetch=2) as loader:
        got = batches_by_epoch(loader, range(3))
    urls, sizes = resolve_shards(str(shards), "train")
    for e in range(3):
        want = list(make_loader(urls, sizes, batch_size=2, image_size=32, train=True, num_workers=workers,
                                seed=4, epoch=e, pin_memory=False))
        assert [k for k, _, _ in got[e]] == [b["key"] for b in want]
        # batches held while later ones were decoded into the same ring slots are intact
        assert all(torch.equal(i, b["image"]) and torch.equal(m, b["mask"]) for (_, i, m), b in zip(got[e], want))


def test_worker_process_batches_equal_in_process_batches(shards):
    """The shared-memory ring path and the in-process path decode the same pixels for every key."""
    urls, sizes = resolve_shards(str(shards), "val")
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
    urls, sizes = resolve_shards(str(out), "train")
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
    urls, sizes = resolve_shards(str(out), "train")
    stream = ShardStream(urls, sizes, batch_size=2, image_size=32, train=True, num_workers=2)
    with Loader(stream, end_epoch=1, pin_memory=False) as loader, pytest.raises(UserError, match="shards verify"):
        list(loader.epoch(0))


def test_too_little_shared_memory_is_a_user_error_up_front(tmp_path):
    from segdist.stream import check_shared_memory

    import shutil

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


def test_pipe_command_shards_equal_local(shards):
    path = shards / "val-000000.tar"
    urls, sizes = resolve_shards(f"pipe:cat {path}", "val")
    assert urls == [f"pipe:cat {path}"] and sizes == [UNEVEN[0]]
    piped = list(make_loader(urls, sizes, batch_size=4, image_size=32, train=False, num_workers=1, pin_memory=False))
    local = list(make_loader([str(path)], sizes, batch_size=4, image_size=32, train=False, pin_memory=False))
    assert [b["key"] for b in piped] == [b["key"] for b in local]
    assert all(torch.equal(p["image"], q["image"]) for p, q in zip(piped, local))


def test_jpeg_size_reads_the_frame_header_like_pil(tmp_path):
    import io

    import cv2
    from PIL import Image

    from segdist.stream import jpeg_size
    from tests.conftest import HUMAN_SEG, require_dataset

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (37, 53, 3), np.uint8)
    variants = [cv2.imencode(".jpg", img)[1].tobytes(),
                cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()]
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: an APP1 segment before the frame header
    Image.fromarray(img).save(buf, "JPEG", exif=exif, icc_profile=b"\0" * 3000)
    variants.append(buf.getvalue())
    photos = sorted(require_dataset(HUMAN_SEG).rglob("*.jpg"))[::10]
    variants += [p.read_bytes() for p in photos]
    for data in variants:
        assert jpeg_size(data) == Image.open(io.BytesIO(data)).size
    assert len(variants) > 20
    for broken in (b"\xff\xd8", b"\xff\xd8\xff\xe0\x00", b"\xff\xd8garbage", variants[0][:20]):
        assert jpeg_size(broken) is None



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
from segdist.stream import Loader, ShardStream, resolve_shards
urls, sizes = resolve_shards({str(shards)!r}, "train")
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


def test_decode_without_opencv_rgb_flag_gives_the_same_pixels(monkeypatch):
    """OpenCV < 4.10 has no IMREAD_COLOR_RGB: the BGR path must give identical output."""
    import cv2

    import segdist.stream as stream

    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (300, 200, 3), np.uint8)
    blobs = [cv2.imencode(".jpg", img)[1].tobytes(), cv2.imencode(".png", img)[1].tobytes()]
    with_flag = [stream.decode_image(b, 64) for b in blobs] + [stream.decode_image(blobs[0], 128)]
    monkeypatch.setattr(stream, "_RGB", None)
    out = np.zeros((64, 64, 3), np.uint8)
    without = [stream.decode_image(b, 64) for b in blobs] + [stream.decode_image(blobs[0], 128)]
    assert all(np.array_equal(a, b) for a, b in zip(with_flag, without))
    assert stream.decode_image(blobs[1], 64, out=out) is out and np.array_equal(out, with_flag[1])



def test_a_val_loader_forked_beside_a_train_loader_does_not_pin_its_pipes(shards):
    """Workers of a second loader close the first loader's pipe ends, so closing the first stays prompt."""
    import time

    train = Loader(train_stream(shards, 2, device_decode=False), pin_memory=False, prefetch=1)
    next(iter(train.epoch(0)))
    import psutil

    before = {c.pid for c in psutil.Process().children()}
    urls, sizes = resolve_shards(str(shards), "val")
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


def test_workers_do_not_inherit_a_sigterm_handler(shards):
    """A trainer's graceful-stop SIGTERM handler must not make its decoders unkillable by terminate()."""
    import os
    import signal
    import time

    old = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        loader = Loader(train_stream(shards, 2), pin_memory=False, prefetch=1)
        next(iter(loader.epoch(0)))
    finally:
        signal.signal(signal.SIGTERM, old)
    p = loader._procs[0]
    os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while p.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.exitcode == -signal.SIGTERM
    loader.close()
