"""Reader faults are one-line UserErrors, never silent or hung: a shard whose sample count is not
its manifest's, a stalled HTTP server, a sample without its image or mask.

The servers here are real (127.0.0.1, port 0, a thread each); every stall they make is bounded
in time and released when the test ends, and every subprocess runs under a timeout.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import os
import re
import subprocess
import tarfile
import threading
import time
from itertools import islice
from pathlib import Path

import psutil
import pytest
import webdataset as wds

from segdist.errors import UserError
from segdist.shards import open_shards, read_samples
from tests.cliutil import alive, run_segdist
from tests.conftest import REPO
from tests.shardutil import UNEVEN, make_loader, sample_bytes, write_shards

ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def rewrite_shard(path: Path, keep: int | None = None, extra: int = 0, size: int = 32) -> None:
    """Rewrite ``path`` as another valid tar: its first ``keep`` samples only, plus ``extra`` new ones."""
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m, _ in members))[:keep]
    with tarfile.open(path, "w") as dst:  # members were read whole above
        for m, data in members:
            if m.name.split(".", 1)[0] in keys:
                dst.addfile(m, io.BytesIO(data))
        for j in range(extra):
            for name, data in zip(("image.png", "mask.png"), sample_bytes(90_000 + j, size)):
                info = tarfile.TarInfo(f"extra_{j:05d}.{name}")
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))


def split_loader(shards: Path, train: bool, workers: int, **kw):
    urls, sizes = open_shards(str(shards)).split("train" if train else "val")
    return make_loader(urls, sizes, batch_size=2, image_size=32, train=train, num_workers=workers,
                       pin_memory=False, **kw)


# ------------------------------------------------------------------------- sample counts
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["cut", "appended"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("workers", [0, 2])
def test_shard_count_other_than_the_manifest_is_an_error(tmp_path, fault, train, workers):
    """cut: shard 1 keeps its first 3 samples, a valid, shorter tar (only the manifest's count tells).
    appended: every shard gets one sample more; whichever is read past its count first is named."""
    shards = write_shards(tmp_path, {"train": UNEVEN, "val": UNEVEN})
    split = "train" if train else "val"
    if fault == "cut":
        rewrite_shard(shards / f"{split}-000001.tar", keep=3)
        holds = {1: 3}
    else:
        for s in range(len(UNEVEN)):
            rewrite_shard(shards / f"{split}-{s:06d}.tar", extra=1)
        holds = {s: n + 1 for s, n in enumerate(UNEVEN)}
    with pytest.raises(UserError) as e:
        list(split_loader(shards, train, workers))
    d = re.escape(str(shards))
    m = re.fullmatch(rf"shard '{d}/{split}-(\d+)\.tar' holds (\d+) samples but its manifest says (\d+): it is "
                     rf"truncated or was replaced; run `segdist shards verify {d}`", str(e.value))
    assert m, str(e.value)
    s = int(m[1])
    assert s in holds and (int(m[2]), int(m[3])) == (holds[s], UNEVEN[s])


def test_a_shard_left_early_is_not_short(shards):
    """Training's take() stops mid-tar: only a tar read to its end is counted."""
    path = str(shards / "train-000000.tar")
    samples = read_samples(path, UNEVEN[0])
    assert len(list(islice(samples, 3))) == 3
    samples.close()  # no error: the rest was never read
    assert len(list(read_samples(path, UNEVEN[0]))) == UNEVEN[0]
    with pytest.raises(UserError, match="holds 7 samples but its manifest says 8"):
        list(read_samples(path, 8))


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return run_segdist(*args)


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_eval_and_train_on_a_cut_shard_exit_2_naming_it(tmp_path, ckpt):
    shards = write_shards(tmp_path / "shards", {"train": UNEVEN, "val": UNEVEN}, size=64)
    for split in ("train", "val"):
        rewrite_shard(shards / f"{split}-000001.tar", keep=3, size=64)
    p = run_cli(["eval", str(ckpt), "--shards", str(shards)])
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"shard '{shards / 'val-000001.tar'}' holds 3 samples but its manifest says 5" in p.stderr
    p = run_cli(["train", f"data.shards={shards}", f"train.out_dir={tmp_path / 'runs'}", "data.image_size=64",
                 "data.batch_size=2", "data.num_workers=1", "model.pretrained=none", "track.backend=none",
                 "train.epochs=1"])
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"shard '{shards / 'train-000001.tar'}' holds 3 samples but its manifest says 5" in p.stderr


# ------------------------------------------------------------------------- missing members
@pytest.mark.parametrize("missing,members", [("image", "mask.png"), ("mask", "image.png")])
def test_sample_without_image_or_mask_names_shard_and_key(tmp_path, missing, members):
    path = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(3):
            img, mask = sample_bytes(i, 32)
            sample = {"__key__": f"k{i:03d}", "image.png": img, "mask.png": mask}
            if i == 1:
                del sample[f"{missing}.png"]
            w.write(sample)
    want = f"sample 'k001' in shard '{path}' has no {missing} (members: {members}); rebuild the shards"
    with pytest.raises(UserError, match=re.escape(want)):
        list(make_loader([str(path)], [3], batch_size=2, image_size=32, train=False, pin_memory=False))


# ------------------------------------------------------------------------- http
@contextlib.contextmanager
def serve(folder: Path, stall: str = "", fail_first: str = ""):
    """Serve ``folder`` on 127.0.0.1. ``stall``: for that file send the headers and a third of the
    body, then nothing (until the test ends, at most 60 s). ``fail_first``: answer 503 once."""
    release = threading.Event()
    failed: set[str] = set()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            name = self.path.lstrip("/")
            if name == fail_first and name not in failed:
                failed.add(name)
                self.send_error(503)
                return
            if name != stall:
                return super().do_GET()
            data = (folder / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 3])
            self.wfile.flush()
            release.wait(60)  # bounded: a stuck test still ends

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [0, 2])
def test_stalled_http_read_fails_naming_the_url(shards, workers):
    with serve(shards, stall="val-000001.tar") as base:
        loader = split_loader(base, train=False, workers=workers, read_timeout=2)
        t0 = time.monotonic()
        with pytest.raises(UserError, match=re.escape(f"no data from {base}/val-000001.tar for 2 s "
                                                      "(data.read_timeout); is the server up?")):
            list(loader)
        elapsed = time.monotonic() - t0
    assert 2 <= elapsed < 2 + 8, elapsed


@pytest.mark.timeout(90)
def test_transient_http_status_is_retried(shards):
    with serve(shards, fail_first="val-000002.tar") as base:
        keys = [k for b in split_loader(base, train=False, workers=0) for k in b["key"]]
    assert len(keys) == sum(UNEVEN)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_process_training_on_a_stalled_server_exits_and_leaves_no_process(tmp_path):
    """Rank 1 reads train-000002.tar in epoch 0 (2 ranks x 1 worker: its slot holds shards 1 and 2);
    it fails after 3 s without data, the launcher ends rank 0, and every process of the tree ends."""
    from tests.test_distributed import LAUNCH

    bound = 180  # s; it took 29 s on 2 cores (start-up, 3 s stall, the launcher ending rank 0)
    shards = write_shards(tmp_path / "shards", {"train": UNEVEN, "val": UNEVEN}, size=64)
    with serve(shards, stall="train-000002.tar") as base:
        cmd = [*LAUNCH, "launch/train.py", f"data.shards={base}/", "data.read_timeout=3", "data.image_size=64",
               "data.batch_size=2", "data.num_workers=1", "model.pretrained=none", "track.backend=none",
               "train.epochs=1", f"train.out_dir={tmp_path / 'runs'}"]
        with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
            t0 = time.monotonic()
            launcher = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=err)
            tree = psutil.Process(launcher.pid)
            seen: dict[int, psutil.Process] = {}
            try:
                while launcher.poll() is None and time.monotonic() - t0 < bound:
                    try:
                        seen.update((c.pid, c) for c in tree.children(recursive=True))
                    except psutil.NoSuchProcess:
                        pass
                    time.sleep(0.2)
            finally:
                if launcher.poll() is None:
                    for c in [*seen.values(), tree]:
                        with contextlib.suppress(psutil.NoSuchProcess):
                            c.kill()
            elapsed = time.monotonic() - t0
    stderr = (tmp_path / "err").read_text()
    assert launcher.wait(10) != 0 and elapsed < bound, stderr[-3000:]
    assert f"no data from {base}/train-000002.tar for 3 s (data.read_timeout)" in stderr, stderr[-3000:]
    assert len(seen) >= 2  # the ranks (and their loader workers) were seen
    deadline = time.monotonic() + 15  # orphans notice their dead parent within a poll or a read_timeout
    while time.monotonic() < deadline and alive(seen.values()):
        time.sleep(0.2)
    assert not alive(seen.values()), [p.cmdline() for p in alive(seen.values())]
