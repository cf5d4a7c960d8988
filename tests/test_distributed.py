"""Real 2-process ``accelerate launch`` on CPU (gloo): training, exact metrics, no hang.

Every launch runs under a timeout, so a DDP hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.shardutil import write_shards

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCH = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def run(cmd: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-5000:]}"
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short 2-process training epoch on uneven shards (3 shards of 7, 5, 2 samples)."""
    tmp = tmp_path_factory.mktemp("dist")
    shards = write_shards(tmp / "shards", {"train": [7, 5, 2], "val": [7, 5, 2]}, size=64)
    overrides = [f"data.shards={shards}", "data.image_size=64", "data.batch_size=2", "data.num_workers=1",
                 "model.pretrained=none", "train.epochs=1", "train.name=dist", f"train.out_dir={tmp / 'runs'}",
                 "track.backend=none", "train.overlays=2"]
    p = run([*LAUNCH, "launch/train.py", *overrides])
    return {"tmp": tmp, "shards": shards, "run": tmp / "runs" / "dist", "stdout": p.stdout}


def eval_json(ckpt: Path, shards: Path, launcher: list[str]) -> dict:
    p = run([*launcher, "-m", "segdist.cli", "eval", str(ckpt), "--shards", str(shards), "--json",
             "--batch-size", "3", "--num-workers", "1"])
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_two_process_training_reports_what_one_process_eval_measures(trained):
    rows = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r.get("event") == "epoch"][-1]
    assert "world 2 x batch 2" in trained["stdout"]
    single = eval_json(trained["run"] / "last", trained["shards"], [sys.executable])
    assert single["num_samples"] == 14
    assert abs(single["iou"] - final["val_iou"]) < 1e-6
    assert abs(single["dice"] - final["val_dice"]) < 1e-6


def test_two_process_eval_equals_one_process_exactly(trained):
    single = eval_json(trained["run"] / "last", trained["shards"], [sys.executable])
    # the shipped 2-process CPU launcher config, as users run it
    cfg_launch = [str(BIN / "accelerate"), "launch", "--config_file", "launch/accelerate/cpu2.yaml"]
    double = eval_json(trained["run"] / "last", trained["shards"], cfg_launch)
    assert double["num_samples"] == single["num_samples"] == 14
    for a, b in zip(single["per_class"], double["per_class"]):
        assert (a["tp"], a["fp"], a["fn"]) == (b["tp"], b["fp"], b["fn"])
    for key in ("iou", "dice", "micro_iou", "micro_dice"):
        assert abs(single[key] - double[key]) < 1e-6
