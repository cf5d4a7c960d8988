"""Where a run starts: refusals change nothing on disk (hashed before and after), resumes onto other data or
classes are refused naming what changed, and a finished run started again does nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segdist.errors import UserError
from tests.conftest import REPO
from tests.shardutil import write_shards
from tests.test_train import BASE

SPLITS = {"train": [4, 4], "val": [2]}


def train(shards, out: Path, name: str, *extra: str) -> dict:
    """``segdist train`` in this process (no worker processes), with Accelerate's global state reset after."""
    from accelerate.state import AcceleratorState, GradientState

    import segdist.train
    from segdist.config import load_config

    cfg = load_config(None, [f"data.shards={shards}", f"train.out_dir={out}", f"train.name={name}", *BASE,
                             "data.num_workers=0", "data.batch_size=4", "data.image_size=32", *extra])
    try:
        return segdist.train.run(cfg)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256), and every folder (-> "dir")."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A shard set and a finished one-epoch run on it (copied by each test before it changes anything)."""
    base = tmp_path_factory.mktemp("resume")
    shards = write_shards(base / "shards", SPLITS, size=32)
    train(shards, base, "done", "train.epochs=1")
    return shards, base / "done"


@pytest.fixture
def run_dir(finished, tmp_path):
    shutil.copytree(finished[1], tmp_path / "done")
    return tmp_path / "done"


def refused(shards, run_dir: Path, *extra: str) -> str:
    """The UserError of a start in ``run_dir`` that must be refused; asserts the folder is byte-identical after."""
    before = tree(run_dir)
    with pytest.raises(UserError) as e:
        train(shards, run_dir.parent, run_dir.name, *extra)
    assert tree(run_dir) == before
    return str(e.value)


def other_shards(tmp_path: Path, **edit) -> Path:
    """The same shard layout with other pixels, or (``edit``) the run's own shards with manifest keys replaced."""
    if not edit:
        return write_shards(tmp_path / "other", SPLITS, size=40)
    return edited(edit.pop("of"), tmp_path / "edited", **edit)


def edited(shards: Path, out: Path, **keys) -> Path:
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, **keys}))
    return out


def test_refused_starts_change_nothing_on_disk(finished, run_dir, tmp_path):
    shards = finished[0]
    err = refused(shards, run_dir, "train.epochs=2")
    assert "holds a previous run" in err and "train.resume=auto" in err

    err = refused(other_shards(tmp_path), run_dir, "train.epochs=2", "train.resume=auto")
    assert "the dataset changed since it was saved (train: changed train-000000.tar, train-000001.tar; " \
           "val: changed val-000000.tar)" in err and "train.allow_new_data=true" in err

    renamed = other_shards(tmp_path, of=shards, class_names=["background", "person"])
    for allow in ("false", "true"):  # other classes: never, whatever allow_new_data says
        err = refused(renamed, run_dir, "train.epochs=2", "train.resume=auto", f"train.allow_new_data={allow}")
        assert "the class table changed (class 1 'foreground' -> 'person')" in err

    leaky = json.loads((shards / "manifest.json").read_text())["splits"]
    leaky["val"]["shards"].append(leaky["train"]["shards"][1])
    err = refused(edited(shards, tmp_path / "leaky", splits=leaky), run_dir, "train.resume=auto", "train.epochs=2")
    assert "train-000001.tar serve(s) both train and val" in err

    err = refused(f"{shards}/*.tar", run_dir, "train.resume=auto", "train.epochs=2")
    assert "names shard files, so the same files would serve as train and val" in err

    from tests.test_runlock import HOLD

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        before = tree(run_dir)
        with pytest.raises(UserError, match=f"is in use by pid {holder.pid}"):
            train(shards, run_dir.parent, run_dir.name, "train.resume=auto", "train.epochs=2")
        assert tree(run_dir) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_finished_run_started_again_says_so_and_does_nothing(finished, run_dir, capsys):
    before = tree(run_dir)
    assert train(finished[0], run_dir.parent, run_dir.name, "train.epochs=1", "train.resume=auto") == {}
    assert f"{run_dir} has finished 1 epoch(s) (step 2) and train.epochs is 1: nothing to train" in \
        capsys.readouterr().out
    assert tree(run_dir) == before


def test_allow_new_data_continues_and_restarts_best_tracking(finished, run_dir, tmp_path, capsys):
    new = other_shards(tmp_path)
    old_best = json.loads((run_dir / "best" / "segdist.json").read_text())
    train(new, run_dir.parent, run_dir.name, "train.epochs=2", "train.resume=auto", "train.allow_new_data=true")
    out = capsys.readouterr().out
    assert "train.allow_new_data=true: continuing on changed data (train: changed" in out
    assert "best IoU tracking restarts" in out
    best = json.loads((run_dir / "best" / "segdist.json").read_text())
    assert best["dataset"]["digest"] != old_best["dataset"]["digest"]  # best/ is from the new data, whatever its IoU
    (state,) = sorted((run_dir / "states").glob("step-*"))[-1:]
    assert json.loads((state / "dataset.json").read_text())["digest"] == best["dataset"]["digest"]
    assert best["classes"] == {"task": "binary", "num_classes": 2, "names": ["background", "foreground"],
                               "ids": [0, 1], "ignore_index": 255}
