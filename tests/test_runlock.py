"""One owner per run folder: real concurrent `segdist train` processes, a real kill -9, real read-only folders."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segdist.errors import UserError
from segdist.runlock import LOCK_FILE, RunLock
from tests.conftest import REPO
from tests.test_resume import train
from tests.test_train import env, train_cmd
from tests.shardutil import write_shards


ARGS = ["data.batch_size=2", "data.image_size=32", "data.num_workers=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("lock"), {"train": [8, 8], "val": [2]}, size=32)


def wait_for(what, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_two_starts_in_one_run_folder_one_trains_and_a_kill_9_lock_is_taken_over(shards, tmp_path, capsys):
    run_dir = tmp_path / "one"
    cmd = train_cmd(shards, tmp_path, "one", *ARGS, "train.epochs=3", "train.checkpoint_every=2")
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs))
        loser, = [p for p in procs if p.poll() is not None]
        winner, = [p for p in procs if p is not loser]
        err = loser.stderr.read()
        assert loser.returncode == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith(f"segdist: error: run folder {run_dir} is in use by pid "
                                                       f"{winner.pid} on {socket.gethostname()}")
        wait_for(lambda: list((run_dir / "states").glob("step-*")))  # the owner is training
        assert winner.poll() is None, "the owner finished before it could be killed; make the run longer"
        os.kill(winner.pid, signal.SIGKILL)
        winner.wait(timeout=30)
    finally:
        for p in procs:
            p.kill()
            p.communicate(timeout=30)
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == winner.pid  # left behind by the kill

    train(shards, tmp_path, "one", *ARGS, "train.epochs=1", "train.resume=auto")  # in this process: a new owner
    out = capsys.readouterr().out
    assert f"took over the lock {run_dir / LOCK_FILE} left by pid {winner.pid}" in out
    assert "that process is gone" in out and "resumed from" in out
    assert not (run_dir / LOCK_FILE).exists()  # released at the end


HOLD = """
import sys, time
from segdist.runlock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_live_holder_is_named_and_a_dead_or_released_one_is_taken_over(tmp_path):
    run_dir = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (run_dir / LOCK_FILE).read_bytes()
        with pytest.raises(UserError, match=f"is in use by pid {holder.pid} on {socket.gethostname()}"):
            RunLock(run_dir).acquire()
        assert (run_dir / LOCK_FILE).read_bytes() == before  # the refused one changed nothing
    finally:
        holder.kill()
        holder.wait()
    # killed: its lock file stays, its lock is gone with it
    lock = RunLock(run_dir)
    note = lock.acquire()
    assert f"left by pid {holder.pid}" in note and "that process is gone" in note
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert sorted(run_dir.iterdir()) == []

    # a lock file written on another host, whose lock is free (the run there ended without removing it)
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "yesterday"}))
    lock = RunLock(run_dir)
    assert "left by pid 1 on elsewhere" in lock.acquire()
    lock.release()

    # a start that fails after taking the lock leaves no folder it made
    fresh = tmp_path / "new" / "run"
    lock = RunLock(fresh)
    assert lock.acquire() == "" and fresh.is_dir()
    lock.release(failed=True)
    assert not fresh.exists()


def test_a_working_folder_or_out_dir_that_cannot_be_written_is_one_line(shards, monkeypatch, capsys):
    from segdist.cli import main

    # /sys refuses new files to everyone, root included (EPERM; EROFS where it is mounted read-only): a real
    # OS refusal on any machine, where a chmod'ed folder would not stop root.
    monkeypatch.chdir("/sys")
    monkeypatch.setenv("SEGDIST_MALLOC", "default")  # leave this process's malloc as it is
    for out in ([], ["train.out_dir=/sys/segdist-runs"]):  # the default "runs" in the working folder, and out_dir
        assert main(["train", f"data.shards={shards}", "model.pretrained=none", "track.backend=none", *out]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        lock = Path(out[0].split("=")[1] if out else "runs") / "run" / LOCK_FILE
        assert line.startswith(f"segdist: error: cannot create the run folder lock {lock} (")
        assert line.endswith("set train.out_dir to a folder you can write to")
    assert not Path("/sys/runs").exists()
