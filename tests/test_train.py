"""Trainer: kill -9 + resume is bit-identical, accumulation == big batch, NaN guard, W&B offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from segdist.errors import UserError
from tests.cliutil import is_segdist_command, run_segdist
from tests.conftest import REPO
from tests.shardutil import write_shards

BASE = ["data.image_size=64", "data.num_workers=1", "model.pretrained=none", "track.backend=none",
        "train.overlays=2", "optim.lr=0.01"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("train"), {"train": [7, 5, 4], "val": [3, 3]}, size=64)


def train_cmd(shards, out, name, *extra):
    return [sys.executable, "-m", "segdist.cli", "train", f"data.shards={shards}", f"train.out_dir={out}",
            f"train.name={name}", *BASE, *extra]


def env():
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run_ok(cmd, timeout=300, process: bool = False):
    """Run a training command and require exit 0: in this process (tests/cliutil.py), or with ``process`` as a
    process of its own (what W&B's service needs)."""
    if process or not is_segdist_command(cmd):
        p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    else:
        p = run_segdist(*cmd[3:])
    assert p.returncode == 0, f"STDOUT:\n{p.stdout[-2000:]}\nSTDERR:\n{p.stderr[-4000:]}"
    return p


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "last" / "model.safetensors"))


@pytest.mark.slow
def test_kill9_then_resume_auto_is_bit_identical(shards, tmp_path):
    args = ["data.batch_size=2", "train.epochs=3", "train.checkpoint_every=2", "train.keep_last=3"]
    run_ok(train_cmd(shards, tmp_path, "straight", *args))

    cmd = train_cmd(shards, tmp_path, "killed", *args)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    states = tmp_path / "killed" / "states"
    deadline = time.time() + 240
    # Kill mid-epoch-2: after a periodic state of the second epoch exists (8 steps/epoch).
    while time.time() < deadline and not (states / "step-00000010").exists():
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "states" / "step-00000024").exists()

    p = run_ok(train_cmd(shards, tmp_path, "killed", *args, "train.resume=auto"))
    assert "resumed from" in p.stdout
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r.get("event") == "epoch"][-1] == 3


@pytest.mark.slow
def test_accumulation_2x4_equals_batch_8(tmp_path):
    # 8 train samples: one optimiser step either way. BCE is a per-pixel mean (Dice is not
    # additive over samples), BN frozen, no augmentation, no clipping.
    shards = write_shards(tmp_path / "s", {"train": [8], "val": [2]}, size=64)
    common = ["train.epochs=1", "loss.name=bce", "model.freeze_bn=true", "augment.enabled=false",
              "optim.grad_clip=0", "optim.name=sgd", "optim.momentum=0", "optim.scheduler=constant",
              "optim.weight_decay=0", "optim.lr=0.5", "data.shuffle_buffer=1"]
    run_ok(train_cmd(shards, tmp_path, "big", *common, "data.batch_size=8"))
    run_ok(train_cmd(shards, tmp_path, "accum", *common, "data.batch_size=4", "optim.accumulate=2"))
    a, b = weights(tmp_path / "big"), weights(tmp_path / "accum")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    # and the step really moved the weights (the comparison is not between two untouched models)
    run_ok(train_cmd(shards, tmp_path, "other", *common, "data.batch_size=4"))  # 2 steps of 4
    c = weights(tmp_path / "other")
    assert any(not torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-6) for k in a if a[k].is_floating_point())


class NaNAt(torch.nn.Module):
    """Fault injection: wraps the real loss and returns NaN on the listed calls (1-based)."""

    def __init__(self, inner, bad):
        super().__init__()
        self.inner, self.bad, self.calls = inner, bad, 0

    def forward(self, logits, target):
        self.calls += 1
        loss = self.inner(logits, target)
        return loss * float("nan") if self.calls in self.bad else loss


@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def nan_run(shards, tmp_path, monkeypatch, bad, name):
    import segdist.train as train
    from segdist.config import load_config

    real = train.create_loss
    monkeypatch.setattr(train, "create_loss", lambda cfg, ch, *w: NaNAt(real(cfg, ch, *w), bad))
    cfg = load_config(None, [f"data.shards={shards}", f"train.out_dir={tmp_path}", f"train.name={name}", *BASE,
                             "data.num_workers=0", "data.batch_size=2", "train.epochs=1", "train.max_nonfinite=3",
                             "train.log_every=1"])
    return train.run(cfg), tmp_path / name


def test_single_nan_is_skipped_and_counted(shards, tmp_path, monkeypatch, fresh_accelerate):
    metrics, run_dir = nan_run(shards, tmp_path, monkeypatch, {2}, "one-nan")
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["count"] for e in events if e.get("event") == "nonfinite"] == [1]
    steps = [e for e in events if e.get("event") == "train"]
    assert len(steps) == 7  # 8 batches, one skipped
    assert all(torch.isfinite(t).all() for t in weights(run_dir).values())
    assert metrics["num_samples"] == 6


def test_repeated_nans_stop_cleanly_with_a_saved_state(shards, tmp_path, monkeypatch, fresh_accelerate):
    with pytest.raises(UserError, match="non-finite for 3 consecutive steps"):
        nan_run(shards, tmp_path, monkeypatch, set(range(3, 100)), "many-nans")
    states = list((tmp_path / "many-nans" / "states").glob("step-*"))
    assert len(states) == 1
    state = load_file(str(states[0] / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())
    loop = json.loads((states[0] / "loop.json").read_text())
    assert loop["step"] == 2 and loop["nonfinite"] == 3


@pytest.mark.slow
def test_wandb_offline_run_has_metrics_and_images(shards, tmp_path):
    run_ok(train_cmd(shards, tmp_path, "wb", "data.batch_size=4", "train.epochs=1", "track.backend=wandb"),
           process=True)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    blob = b"".join(f.read_bytes() for f in runs[0].glob("*.wandb"))
    for key in (b"val_iou", b"train_loss", b"val/overlays", b"val/confusion"):
        assert key in blob, key
    images = list(runs[0].glob("files/media/images/**/*.png"))
    assert images, "no overlay images logged"
    assert (tmp_path / "wb" / "curves.png").is_file() and (tmp_path / "wb" / "confusion.png").is_file()
    assert (tmp_path / "wb" / "config.yaml").is_file()
    assert (tmp_path / "wb" / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_ema_and_tensorboard_and_resume_with_ema(shards, tmp_path):
    args = ["data.batch_size=4", "optim.ema=0.9", "track.backend=tensorboard"]
    run_ok(train_cmd(shards, tmp_path, "ema", *args, "train.epochs=1"))
    state = sorted((tmp_path / "ema" / "states").glob("step-*"))[-1]
    assert (state / "ema.safetensors").is_file()
    assert list((tmp_path / "ema").rglob("events.out.tfevents.*"))
    p = run_ok(train_cmd(shards, tmp_path, "ema", *args, "train.epochs=2", "train.resume=auto"))
    assert "resumed from" in p.stdout and "epoch 2 |" in p.stdout


def test_resume_auto_skips_torn_states(tmp_path):
    from segdist.checkpoint import find_resume, torn_states

    states = tmp_path / "states"
    for name, complete in (("step-00000002", True), ("step-00000004", True), (".tmp-step-00000006", False),
                           ("step-00000008", False)):
        (states / name).mkdir(parents=True)
        if complete:
            (states / name / "loop.json").write_text("{}")
    assert [p.name for p in find_resume("auto", states)] == ["step-00000004", "step-00000002"]  # newest first
    assert [p.name for p in torn_states(states)] == [".tmp-step-00000006", "step-00000008"]
    assert find_resume("", states) == []
    with pytest.raises(UserError, match="not a complete state"):
        find_resume(str(states / "step-00000008"), states)


def test_a_resume_keeps_the_seed_and_carries_the_epoch_into_another_layout(tmp_path):
    import dataclasses

    from segdist.resume import Loop, elastic

    plan = {"world_size": 2, "num_workers": 2, "batch_size": 8, "accumulate": 1, "seed": 0, "stream": 2}
    saved = Loop(epoch=3, batch=5, step=40, plan=dict(plan))
    said = []
    assert elastic(saved, plan, tmp_path, said.append) == saved and not said
    with pytest.raises(UserError, match="seed 0 -> 1"):
        elastic(saved, {**plan, "seed": 1}, tmp_path, said.append)
    moved = elastic(saved, {**plan, "world_size": 1}, tmp_path, said.append)
    old = {k: plan[k] for k in ("world_size", "num_workers", "batch_size", "seed")}
    assert (moved.epoch, moved.batch, moved.step, moved.carry) == (3, 0, 40, [{"plan": old, "batch": 5}])
    assert moved.plan["world_size"] == 1 and "world_size 2 -> 1" in said[-1]
    at_epoch_end = elastic(dataclasses.replace(saved, batch=0), {**plan, "world_size": 1}, tmp_path, said.append)
    assert at_epoch_end.carry == [] and at_epoch_end.plan["world_size"] == 1
    more_steps = elastic(saved, {**plan, "accumulate": 4}, tmp_path, said.append)  # same sample order
    assert (more_steps.batch, more_steps.carry) == (5, [])


def test_num_classes_that_contradicts_the_manifest_is_refused():
    from types import SimpleNamespace

    from segdist.config import load_config
    from segdist.train import out_channels_for

    binary = SimpleNamespace(task="binary", num_classes=2)
    multi = SimpleNamespace(task="multiclass", num_classes=5)
    assert out_channels_for(load_config(None, []), binary) == 1
    assert out_channels_for(load_config(None, ["model.num_classes=2"]), binary) == 2
    assert out_channels_for(load_config(None, []), multi) == 5
    with pytest.raises(UserError, match="model.num_classes"):
        out_channels_for(load_config(None, ["model.num_classes=3"]), multi)


def run_fails(cmd) -> str:
    p = run_segdist(*cmd[3:])
    assert p.returncode == 2, f"rc {p.returncode}\nSTDOUT:\n{p.stdout[-2000:]}\nSTDERR:\n{p.stderr[-4000:]}"
    assert "Traceback" not in p.stderr
    return p.stderr


@pytest.mark.slow
def test_a_rerun_without_resume_never_deletes_the_previous_run(shards, tmp_path):
    args = ["data.batch_size=4", "train.epochs=1"]
    run_ok(train_cmd(shards, tmp_path, "r", *args))
    states = sorted((tmp_path / "r" / "states").glob("step-*"))
    log = (tmp_path / "r" / "metrics.jsonl").read_text()
    err = run_fails(train_cmd(shards, tmp_path, "r", *args))
    assert "holds a previous run" in err and "train.resume=auto" in err and "train.overwrite=true" in err
    assert sorted((tmp_path / "r" / "states").glob("step-*")) == states
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == log
    p = run_ok(train_cmd(shards, tmp_path, "r", *args, "train.overwrite=true"))
    assert "removing the previous run's" in p.stdout


@pytest.mark.slow
def test_damaged_states_are_named_and_resume_auto_falls_back(shards, tmp_path):
    import pickle

    args = ["data.batch_size=4", "train.keep_last=3"]
    run_ok(train_cmd(shards, tmp_path, "d", *args, "train.epochs=2"))
    first, newest = sorted((tmp_path / "d" / "states").glob("step-*"))
    opt = newest / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])  # truncated
    err = run_fails(train_cmd(shards, tmp_path, "d", *args, "train.epochs=3", f"train.resume={newest}"))
    assert f"state {newest} is damaged: optimizer.bin has" in err and "truncated or replaced" in err
    p = run_ok(train_cmd(shards, tmp_path, "d", *args, "train.epochs=3", "train.resume=auto"))
    assert f"state {newest} is damaged" in p.stdout and "falling back" in p.stdout
    assert f"resumed from {first}" in p.stdout

    # A foreign pickle in an RNG file: accelerate would skip it silently ("Could not load random
    # states") and the resume would no longer be exact; the file check names it instead.
    newest = sorted((tmp_path / "d" / "states").glob("step-*"))[-1]
    rng = newest / "random_states_0.pkl"
    rng.write_bytes(pickle.dumps({"not": "a state"}))
    err = run_fails(train_cmd(shards, tmp_path, "d", *args, "train.epochs=4", f"train.resume={newest}"))
    assert "random_states_0.pkl has" in err
    size = json.loads((newest / "files.json").read_text())["random_states_0.pkl"][0]
    rng.write_bytes(bytes(size))  # same size, other bytes
    err = run_fails(train_cmd(shards, tmp_path, "d", *args, "train.epochs=4", f"train.resume={newest}"))
    assert "random_states_0.pkl differs from what was saved" in err

    # loop.json is written last and is not in files.json: a torn one is named, and auto falls back past it
    (newest / "loop.json").write_text('{"epoch": 3, "ba')
    err = run_fails(train_cmd(shards, tmp_path, "d", *args, "train.epochs=4", f"train.resume={newest}"))
    assert f"state {newest} is damaged: loop.json is unreadable" in err
    p = run_ok(train_cmd(shards, tmp_path, "d", *args, "train.epochs=4", "train.resume=auto"))
    assert f"state {newest} is damaged: loop.json" in p.stdout and "falling back" in p.stdout
    # ...but another seed is a refusal, not damage: auto must not fall back past every state for it
    err = run_fails(train_cmd(shards, tmp_path, "d", *args, "train.epochs=5", "train.seed=7", "train.resume=auto"))
    assert "the sample order changed (seed" in err and "falling back" not in err


@pytest.mark.slow
def test_a_train_process_reads_the_remote_manifest_once(tmp_path):
    """Over http(s) every manifest read is a request: one per `segdist train` process."""
    import functools
    import http.server
    import threading
    from collections import Counter

    shards = write_shards(tmp_path / "s", {"train": [4, 4], "val": [2]}, size=64)
    gets: Counter = Counter()

    class Counting(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            gets[self.path] += 1
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Counting, directory=str(shards)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        run_ok(train_cmd(base, tmp_path, "http", "data.batch_size=4", "train.epochs=2"))
    finally:
        server.shutdown()
        server.server_close()
    assert gets["/manifest.json"] == 1
    assert gets["/train-000000.tar"] >= 2  # the shards themselves are streamed every epoch


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """24 real, non-square human-segmentation photos (max side 160) in train/val shards."""
    import csv

    from segdist.shards import build_shards
    from tests.conftest import HUMAN_SEG, require_dataset

    root = require_dataset(HUMAN_SEG)
    tmp = tmp_path_factory.mktemp("photos")
    rows = list(csv.DictReader((root / "train.csv").open()))[:24]
    with (tmp / "subset.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["images", "masks"])
        w.writeheader()
        for r in rows:
            w.writerow({"images": str(root / r["images"]), "masks": str(root / r["masks"])})
    build_shards(tmp / "subset.csv", tmp / "shards", max_side=160, val_fraction=0.25, progress=False)
    return tmp / "shards"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["short_side", "none"])
def test_training_on_real_non_square_photos_in_crop_modes(photo_shards, tmp_path, mode):
    extra = ["data.image_size=[64, 96]", f"data.resize={mode}", "data.scale=[0.5, 1.0]", "data.short_side=96",
             "data.batch_size=4", "train.epochs=1", "augment.crop_p=0"]
    p = run_ok(train_cmd(photo_shards, tmp_path, mode, *extra))
    assert "final val IoU" in p.stdout
    meta = json.loads((tmp_path / mode / "best" / "segdist.json").read_text())
    assert meta["image_size"] == [64, 96] and meta["config"]["data"]["resize"] == mode  # the file keeps both


@pytest.mark.slow
def test_clothing_training_keeps_the_datasets_colours_for_predicted_masks(tmp_path):
    """Real palette masks (clothing-parsing) -> manifest palette -> the model's meta -> palette PNGs from predict,
    with the dataset's own colours; per-class scores over 59 classes without a crash on absent classes."""
    from PIL import Image

    from segdist.shards import build_shards
    from tests.conftest import CLOTHING, require_dataset

    root = require_dataset(CLOTHING)
    src = tmp_path / "src"
    for sub in ("images", "masks"):
        (src / sub).mkdir(parents=True)
    for n in ("0001", "0002", "0003", "0004", "0005", "0006"):
        (src / "images" / f"{n}.jpg").symlink_to(root / "photos" / f"{n}.jpg")
        (src / "masks" / f"{n}.png").symlink_to(root / "masks" / f"{n}.png")
    build_shards(src, tmp_path / "shards", classes=root / "classes.json", max_side=96, val_fraction=0.34,
                 workers=1, progress=False)
    run_ok([*train_cmd(tmp_path / "shards", tmp_path, "cloth", "data.batch_size=2", "train.epochs=1",
                       "data.image_size=[96,64]", "data.resize=short_side")])
    from segdist.checkpoint import read_meta

    meta = read_meta(tmp_path / "cloth" / "best")
    with Image.open(root / "masks" / "0001.png") as im:
        pal = im.getpalette()
    assert meta.palette == [pal[3 * i:3 * i + 3] for i in range(59)]
    out = tmp_path / "pred"
    run_ok([sys.executable, "-m", "segdist", "predict", str(tmp_path / "cloth" / "best"),
            str(root / "photos" / "0001.jpg"), "--out", str(out), "--device", "cpu"])
    with Image.open(out / "masks" / "0001.png") as im:
        assert im.mode == "P" and im.size == (550, 832) and im.getpalette()[:3 * 59] == pal[:3 * 59]
    metrics = [json.loads(line) for line in (tmp_path / "cloth" / "metrics.jsonl").read_text().splitlines()][-1]
    assert 0 <= metrics["val_pixel_acc"] <= 1 and 0 <= metrics["val_iou_present"] <= 1
