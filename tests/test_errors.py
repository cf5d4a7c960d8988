"""Full disks with real OS errors: child processes under RLIMIT_FSIZE (SIGXFSZ ignored), so every write past the
limit fails with EFBIG, as a full disk fails with ENOSPC. One line naming the path, exit 2, temporaries removed,
earlier files intact, and the same command works again once there is room."""

from __future__ import annotations

import errno
import hashlib
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from segdist.errors import disk_full_reason, os_error_line
from tests.conftest import REPO
from tests.test_train import env, run_ok, train_cmd
from tests.shardutil import write_shards


def limited(max_bytes: int):
    """preexec_fn: files may not grow past ``max_bytes``; a write past it fails with EFBIG (no signal)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return limit


def run_full(cmd, max_bytes: int = 4 << 20) -> str:
    """Run ``cmd`` with a 4 MiB file size limit (the model file is 21 MB); it must fail with one line."""
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
                       preexec_fn=limited(max_bytes))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return p.stderr.strip().splitlines()[-1]


def hashes(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*"))
            if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if ".tmp" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("full"), {"train": [4, 4], "val": [2]}, size=64)


@pytest.mark.slow
def test_a_full_disk_in_training_keeps_the_previous_state_and_best_and_resume_auto_works_after(shards, tmp_path):
    args = ["data.batch_size=4", "train.keep_last=3"]
    run_ok(train_cmd(shards, tmp_path, "full", *args, "train.epochs=1"))
    run_dir = tmp_path / "full"
    kept = hashes(run_dir / "states", run_dir / "best", run_dir / "last")

    # epoch 2 trains, then saving last/ fails
    line = run_full(train_cmd(shards, tmp_path, "full", *args, "train.epochs=2", "train.resume=auto"))
    assert line.startswith(f"segdist: error: cannot write {run_dir / 'last'}: a file grew past the file size limit")
    assert line.endswith("run the same command with train.resume=auto")
    # a periodic state comes first: saving it fails
    line = run_full(train_cmd(shards, tmp_path, "full", *args, "train.epochs=2", "train.resume=auto",
                              "train.checkpoint_every=1"))
    assert line.startswith(f"segdist: error: cannot write {run_dir / 'states' / 'step-00000003'}: a file grew past")
    assert hashes(run_dir / "states", run_dir / "best", run_dir / "last") == kept and leftovers(run_dir) == []

    p = run_ok(train_cmd(shards, tmp_path, "full", *args, "train.epochs=2", "train.resume=auto"))  # room again
    assert f"resumed from {run_dir / 'states' / 'step-00000002'}" in p.stdout and "final val IoU" in p.stdout


@pytest.mark.slow
def test_a_full_disk_in_shards_build_keeps_the_previous_shards(tmp_path):
    from segdist.shards import build_shards
    from segdist.synth import make_synthetic

    make_synthetic(tmp_path / "syn", n=8, size=64, seed=2)
    out = tmp_path / "shards"
    build_shards(tmp_path / "syn", out, workers=1, progress=False)
    kept = hashes(out)
    line = run_full([sys.executable, "-m", "segdist.cli", "shards", "build", str(tmp_path / "syn"), "--out", str(out),
                     "--workers", "1", "--val-fraction", "0.5"], max_bytes=20_000)
    assert line.startswith(f"segdist: error: cannot write {out}: a file grew past the file size limit")
    assert line.endswith("run the build again") and hashes(out) == kept and leftovers(tmp_path) == []


def test_full_disk_errors_are_recognised_in_every_writers_words():
    assert disk_full_reason(OSError(errno.ENOSPC, "No space left on device")) == "the disk is full"
    assert disk_full_reason(OSError(errno.EDQUOT, "Disk quota exceeded")) == "the disk quota is used up"
    rust = Exception("Error while serializing: I/O error: File too large (os error 27)")  # safetensors
    assert disk_full_reason(rust).startswith("a file grew past the file size limit")
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("writing failed") from e
    except RuntimeError as chained:
        assert disk_full_reason(chained) == "the disk is full"
    assert disk_full_reason(ValueError("a bug")) is None
    assert os_error_line(OSError(errno.EROFS, "Read-only file system", "/x/y")).startswith("cannot write /x/y (read-only")
    assert os_error_line(OSError(errno.ENOENT, "No such file", "/x")) is None  # not ours to word: a bug shows
