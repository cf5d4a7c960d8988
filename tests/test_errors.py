"""Full disks with real OS errors: writes under RLIMIT_FSIZE (SIGXFSZ ignored) fail with EFBIG past the limit, as
writes to a full disk fail with ENOSPC -- in a child `segdist train`, and in this process for the writers that need
no process of their own (the soft limit is lowered for the block, then raised back). One line naming the path,
exit 2, temporaries removed, earlier files byte-identical, and the same command works once there is room."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from segdist.errors import DiskFull, disk_full_reason, os_error_line
from tests.conftest import REPO
from tests.test_resume import train
from tests.test_train import env, train_cmd
from tests.shardutil import write_shards


def limited(max_bytes: int):
    """preexec_fn: files may not grow past ``max_bytes``; a write past it fails with EFBIG (no signal)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return limit


@contextlib.contextmanager
def file_size_limit(max_bytes: int):
    """The same limit on this process for the block (only the soft limit moves: it can be raised back)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def hashes(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*"))
            if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if ".tmp" in p.name or ".old-" in p.name)


@pytest.mark.slow
def test_a_full_disk_in_training_keeps_the_previous_states_and_best_and_resume_auto_works_after(tmp_path):
    shards = write_shards(tmp_path / "s", {"train": [4, 4], "val": [2]}, size=32)
    args = ["train.keep_last=3", "data.image_size=32", "data.batch_size=4", "data.num_workers=0"]
    train(shards, tmp_path, "full", *args, "train.epochs=1")
    run_dir = tmp_path / "full"
    kept = hashes(run_dir / "states", run_dir / "best", run_dir / "last")

    cmd = train_cmd(shards, tmp_path, "full", *args, "train.epochs=2", "train.resume=auto",
                    "train.checkpoint_every=1")  # a periodic state: the first big write
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
                       preexec_fn=limited(4 << 20))  # 4 MiB: the model file is 21 MB
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith(f"segdist: error: cannot write {run_dir / 'states' / 'step-00000003'}: a file grew past "
                           f"the file size limit") and line.endswith("run the same command with train.resume=auto"), \
        p.stdout + p.stderr
    assert hashes(run_dir / "states", run_dir / "best", run_dir / "last") == kept and leftovers(run_dir) == []

    assert train(shards, tmp_path, "full", *args, "train.epochs=2", "train.resume=auto")  # room again: it goes on


def test_a_full_disk_saving_a_model_folder_keeps_the_previous_one(ckpt, tmp_path):
    from segdist.checkpoint import read_meta, save_model
    from segdist.models import load_model

    best = tmp_path / "best"
    shutil.copytree(ckpt, best)
    kept = hashes(best)
    with pytest.raises(DiskFull) as e, file_size_limit(1 << 20):
        save_model(load_model(ckpt), best, read_meta(ckpt))
    assert str(e.value).startswith(f"cannot write {best}: a file grew past the file size limit")
    assert hashes(best) == kept and leftovers(tmp_path) == []


def test_a_full_disk_in_shards_build_keeps_the_previous_shards(tmp_path):
    from segdist.shards import build_shards
    from segdist.synth import make_synthetic

    make_synthetic(tmp_path / "syn", n=8, size=64, seed=2)
    out = tmp_path / "shards"
    build_shards(tmp_path / "syn", out, workers=1, progress=False)
    kept = hashes(out)
    with pytest.raises(DiskFull) as e, file_size_limit(20_000):
        build_shards(tmp_path / "syn", out, workers=1, progress=False, val_fraction=0.5)
    assert str(e.value).startswith(f"cannot write {out}: a file grew past the file size limit")
    assert str(e.value).endswith("run the build again") and hashes(out) == kept and leftovers(tmp_path) == []


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
    read_only = os_error_line(OSError(errno.EROFS, "Read-only file system", "/x/y"))
    assert read_only.startswith("cannot write /x/y (read-only")
    assert os_error_line(OSError(errno.ENOENT, "No such file", "/x")) is None  # not ours to word: a bug shows


def test_a_full_disk_while_predicting_names_the_file(ckpt, tmp_path):
    from segdist.infer import predict_paths
    from tests.shardutil import sample_bytes

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "photo.png").write_bytes(sample_bytes(0, 32)[0])
    with pytest.raises(DiskFull) as e, file_size_limit(300):  # the mask PNG fits, its overlay does not
        predict_paths(ckpt, tmp_path / "in", tmp_path / "out", device="cpu")
    assert str(e.value).startswith(f"cannot write {tmp_path / 'out' / 'overlays' / 'photo.png'}: a file grew past")
    assert (tmp_path / "out" / "masks" / "photo.png").is_file() and leftovers(tmp_path / "out") == []


def test_a_full_disk_while_logging_names_the_file(tmp_path):
    from types import SimpleNamespace

    from segdist.track import RunLog, plot_curves

    log = RunLog(SimpleNamespace(is_main_process=True), tmp_path, "none")
    log.log({"event": "epoch", "epoch": 1, "train_loss": 0.5}, 1)
    with pytest.raises(DiskFull, match=f"cannot write {tmp_path / 'metrics.jsonl'}: .* train.resume=auto"), \
            file_size_limit(log.path.stat().st_size + 10):
        log.log({"event": "epoch", "epoch": 2, "train_loss": 0.25, "note": "x" * 100}, 2)
    with pytest.raises(DiskFull, match=f"cannot write {tmp_path / 'curves.png'}"), file_size_limit(1000):
        plot_curves(log.path, tmp_path / "curves.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
