"""Real 2-process ``accelerate launch`` on CPU (gloo): training, exact metrics, no hang.

Every launch runs under a timeout, so a DDP hang fails the test instead of blocking CI. The
launches are pinned to the CPU (CUDA_VISIBLE_DEVICES=""), also on a GPU host: these tests
compare 1- and 2-process results exactly, and cuDNN autotuning and TF32 convolutions could flip
a few pixels between batch shapes there. GPU exactness is its own test (tests/test_cuda.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.shardutil import write_shards

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCH = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def run(cmd: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "CUDA_VISIBLE_DEVICES": ""}
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


def train_overrides(shards: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [f"data.shards={shards}", "data.image_size=64", "data.batch_size=2", "data.num_workers=1",
            "model.pretrained=none", "track.backend=none", "train.overlays=0", f"train.out_dir={out}",
            f"train.name={name}", *extra]


def start_ranks(argv: list[str], port: int, world: int = 2) -> list[subprocess.Popen]:
    """Start ``world`` trainer processes the way launch/slurm.sbatch's srun does: no launcher in
    between, the rank layout in RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR."""
    procs = []
    for rank in range(world):
        env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
               "CUDA_VISIBLE_DEVICES": "", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, text))
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in rows if r.get("event") == "train"]


def pause_mid_epoch(procs: list[subprocess.Popen], run_dir: Path) -> list[tuple[int, str]]:
    """SIGUSR1 to every rank mid-epoch 1 (6 steps per epoch: once 8 steps are logged); their results."""
    import signal
    import time

    deadline = time.time() + 300
    while time.time() < deadline and len(step_losses(run_dir) if (run_dir / "metrics.jsonl").exists() else []) < 8:
        assert all(p.poll() is None for p in procs), wait_all(procs)
        time.sleep(0.05)
    for p in procs:
        os.kill(p.pid, signal.SIGUSR1)
    return wait_all(procs)


@pytest.mark.timeout(900)
def test_sigusr1_pauses_both_ranks_at_one_step_and_the_rerun_continues_exactly(tmp_path):

    from segdist.errors import REQUEUE_EXIT

    shards = write_shards(tmp_path / "shards", {"train": [9, 8, 7], "val": [4, 4]}, size=64)
    argv = ["launch/train.py", *train_overrides(shards, tmp_path, "x", "train.epochs=2", "train.log_every=1",
                                                 "train.resume=auto")]
    run_dir = tmp_path / "x"
    results = pause_mid_epoch(start_ranks(argv, free_port()), run_dir)
    assert [rc for rc, _ in results] == [REQUEUE_EXIT] * 2, results
    assert all("paused by" in text for _, text in results)
    assert "paused by SIGUSR1" in results[0][1]
    states = sorted((run_dir / "states").glob("step-*"))
    paused = json.loads((states[-1] / "loop.json").read_text())
    assert paused["epoch"] == 1 and 0 < paused["batch"] < 6  # mid-epoch
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in states[-1].iterdir()}

    resumed = wait_all(start_ranks(argv, free_port()))
    assert [rc for rc, _ in resumed] == [0, 0], resumed
    assert f"resumed from {states[-1]}" in resumed[0][1]

    ref = wait_all(start_ranks(["launch/train.py", *train_overrides(shards, tmp_path, "ref", "train.epochs=2",
                                                                      "train.log_every=1")], free_port()))
    assert [rc for rc, _ in ref] == [0, 0], ref
    assert step_losses(run_dir) == step_losses(tmp_path / "ref")
    assert len(step_losses(run_dir)) == 12


@pytest.mark.timeout(600)
def test_inf_gradients_with_a_finite_loss_skip_the_step_on_both_ranks(tmp_path):
    shards = write_shards(tmp_path / "shards", {"train": [6, 6], "val": [2, 2]}, size=64)
    argv = ["tests/scripts/inf_grad_train.py", *train_overrides(shards, tmp_path, "inf", "train.epochs=1",
                                                                 "train.max_nonfinite=100", "train.log_every=1")]
    results = wait_all(start_ranks(argv, free_port()))
    assert [rc for rc, _ in results] == [0, 0], results
    for rank in (0, 1):
        assert json.loads((tmp_path / "inf" / f"grads-rank{rank}.json").read_text()) == {"unchanged": True,
                                                                                         "finite": True}
    rows = [json.loads(x) for x in (tmp_path / "inf" / "metrics.jsonl").read_text().splitlines()]
    assert [r["count"] for r in rows if r.get("event") == "nonfinite"] == [1, 2, 3]  # 12 samples / (2 x 2)
    assert not [r for r in rows if r.get("event") == "train"]



def trained_keys_by_epoch(run_dir: Path) -> dict[int, Counter]:
    out: dict[int, Counter] = {}
    for f in run_dir.glob("keys-rank*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["epoch"], Counter()).update(rec["keys"])
    return out


@pytest.mark.timeout(900)
def test_a_two_process_run_paused_mid_epoch_resumes_on_one_process_without_repeating_or_skipping(tmp_path):

    from segdist.errors import REQUEUE_EXIT
    from segdist.shards import open_shards
    from segdist.stream import ShardStream

    shards = write_shards(tmp_path / "shards", {"train": [9, 8, 7], "val": [4, 4]}, size=64)
    args = train_overrides(shards, tmp_path, "e", "train.epochs=2", "train.log_every=1", "train.resume=auto")
    run_dir = tmp_path / "e"
    results = pause_mid_epoch(start_ranks(["tests/scripts/record_keys_train.py", *args], free_port()), run_dir)
    assert [rc for rc, _ in results] == [REQUEUE_EXIT] * 2
    paused = json.loads((sorted((run_dir / "states").glob("step-*"))[-1] / "loop.json").read_text())
    assert paused["epoch"] == 1 and 0 < paused["batch"] < 6

    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "tests/scripts/record_keys_train.py", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "world_size 2 -> 1" in p.stdout and "spread over 1 process(es)" in p.stdout

    # The epoch's plan under the original 2-process layout, every rank, decoded for real.
    urls, sizes = open_shards(str(shards)).split("train")
    plan = Counter()
    for rank in range(2):
        s = ShardStream(urls, sizes, batch_size=2, image_size=64, train=True, seed=42, rank=rank, world_size=2,
                        num_workers=1)
        plan.update(k for _, _, keys, _ in s.slot_batches(1, 0) for k in keys)
    trained = trained_keys_by_epoch(run_dir)
    assert trained[1] == plan  # each sample of the interrupted epoch exactly once
    assert sum(trained[1].values()) == 24
