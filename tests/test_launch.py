"""Launchers: accelerate configs load, the SLURM script parses, the Colab notebook uses real keys;
launch/course_split.py writes the course's split; launch/course_reference.py runs the course's script;
launch/compare_runs.py compares runs."""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segdist.config import load_config
from tests.conftest import HUMAN_SEG, REPO, require_dataset

LAUNCH = REPO / "launch"
ROOT = REPO


@pytest.mark.parametrize("name", ["1gpu", "8gpu", "2x8gpu", "cpu2"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(LAUNCH / "accelerate" / f"{name}.yaml"))
    assert cfg.num_processes >= 1 and cfg.num_machines >= 1


def test_slurm_script_is_valid_bash_sets_ranks_and_requeues_on_pause():
    from segdist.errors import REQUEUE_EXIT

    text = (LAUNCH / "slurm.sbatch").read_text()
    subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")], check=True)
    for needle in ("RANK=$SLURM_PROCID", "WORLD_SIZE=$SLURM_NTASKS", "LOCAL_RANK=$SLURM_LOCALID", "MASTER_ADDR=",
                   "train.resume=auto", "--signal=USR1@", f'"$status" -eq {REQUEUE_EXIT}', "scontrol requeue"):
        assert needle in text, needle


def _gpu_check(tmp_path, budget: str, python: str) -> tuple[str, Path]:
    """Run launch/gpu_check.sh in ``tmp_path`` with ``budget`` seconds and ``python``; (log text, output dir)."""
    script = LAUNCH / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    p = subprocess.run(["bash", str(script), "out", budget], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": python, "SEEDS": "2"},
                       timeout=120)
    assert p.returncode == 0, p.stderr
    log = (tmp_path / "out" / "log.txt").read_text()
    assert log.rstrip().splitlines()[-1].startswith("== done after")
    return log, tmp_path / "out"


GPU_CHECK_STEPS = ["cuda-tests", "sweep-eager", "sweep-compile", "data", "course-split", "shards", "recipe-seed1",
                   "recipe-seed2"]


def test_gpu_check_script_skips_every_step_when_its_budget_is_spent(tmp_path):
    """With no budget left each step is logged as skipped, in order, and an earlier run's metrics are not passed
    off as this run's."""
    stale = tmp_path / "runs" / "gpu-hs-s1" / "metrics.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"epoch": 1}\n')
    log, out = _gpu_check(tmp_path, "0", sys.executable)
    assert re.findall(r"^== (\S+): skipped \(budget spent\)$", log, re.M) == GPU_CHECK_STEPS, log
    assert not (out / "results.jsonl").exists() and not list(out.glob("hs-s*.jsonl"))


def test_gpu_check_script_clamps_each_step_to_what_is_left_and_records_each_bench(tmp_path):
    """A step gets min(its own limit, what is left of the budget); every bench leaves one JSON line, with a null
    result when the command printed none (here a stand-in python that does nothing and exits 0)."""
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    log, out = _gpu_check(tmp_path, "40", str(stub))
    limits = dict(re.findall(r"^== \S+ (\S+) \(limit (\d+)s\)", log, re.M))
    assert list(limits) == GPU_CHECK_STEPS, log
    assert all(20 <= int(v) <= 40 for v in limits.values()), limits  # every step's own limit is above 40 s
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["label"] for r in lines] == ["sweep-eager", "sweep-compile", "data"]
    assert all(r["rc"] == 0 and r["result"] is None for r in lines)


def test_colab_notebook_commands_use_valid_config_keys():
    nb = json.loads((LAUNCH / "colab.ipynb").read_text())
    src = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    train = re.search(r"!segdist train (.+?)(?:\n(?!\s)|$)", src.replace("\\\n", " "), re.S).group(1)
    words = shlex.split(train.replace("$SHARDS", "x").replace("$PRECISION", "bf16"))
    overrides = [w for w in words if "=" in w]
    assert words[0] == "--config"
    load_config(REPO / words[1], overrides)  # raises on any unknown key


def test_course_split_is_the_courses_permutation_and_builds_shards(tmp_path):
    root = require_dataset(HUMAN_SEG)
    out = tmp_path / "split.csv"
    run = subprocess.run([sys.executable, "launch/course_split.py", str(root), str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    with (root / "train.csv").open(newline="") as f:
        original = list(csv.DictReader(f))
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["images"]).name for r in rows] == [Path(r["images"]).name for r in original]  # file order kept
    val = {i for i, r in enumerate(rows) if r["split"] == "val"}
    assert val == set(np.random.RandomState(42).permutation(290)[:58].tolist())  # the course's val rows
    assert all(Path(r["images"]).is_file() and Path(r["masks"]).is_file() for r in rows)

    from segdist.shards import build_shards, open_shards

    build_shards(out, tmp_path / "shards", max_side=64, workers=1, progress=False)
    shards = open_shards(str(tmp_path / "shards"))
    assert sum(shards.split("train")[1]) == 232 and sum(shards.split("val")[1]) == 58


def test_course_split_names_a_wrong_folder(tmp_path):
    run = subprocess.run([sys.executable, "launch/course_split.py", str(tmp_path), str(tmp_path / "x.csv")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "train.csv not found" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "x.csv").exists()
    root = require_dataset(HUMAN_SEG)
    run = subprocess.run([sys.executable, "launch/course_split.py", str(root), str(tmp_path)],  # a folder
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "cannot write" in run.stderr and "Traceback" not in run.stderr


def test_compare_runs_tables_the_epochs_and_plots(tmp_path):
    for name, scores in {"a": [0.5, 0.91, 0.93], "b": [0.6, 0.88, 0.95]}.items():
        (tmp_path / name).mkdir()
        rows = [{"event": "epoch", "epoch": e + 1, "val_iou": v, "val_input_iou": v - 0.01}
                for e, v in enumerate(scores)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = subprocess.run([sys.executable, "launch/compare_runs.py", str(tmp_path / "a"), str(tmp_path / "b"),
                          "--ref", "course:1=0.7,3=0.9", "--out", str(tmp_path / "c.png")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "| 2 | 0.9100 (0.9000) | 0.8800 (0.8700) |" in run.stdout
    assert "- a: final 0.9300 (epoch 3), best 0.9300 (epoch 3), first >= 0.9 at epoch 2" in run.stdout
    assert "- mean of 2: final 0.9400 (min 0.9300, max 0.9500" in run.stdout
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    with (tmp_path / "a" / "metrics.jsonl").open("a") as f:  # a resume logs epoch 3 again; a torn last line
        f.write(json.dumps({"event": "epoch", "epoch": 3, "val_iou": 0.94}) + "\n" + '{"event": "ep')
    run = subprocess.run([sys.executable, "launch/compare_runs.py", str(tmp_path / "a"), str(tmp_path / "b")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "| 3 | 0.9400 | 0.9500 (0.9400) |" in run.stdout and "1 unreadable" in run.stderr
    bad = subprocess.run([sys.executable, "launch/compare_runs.py", str(tmp_path / "missing")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "metrics.jsonl not found" in bad.stderr and "Traceback" not in bad.stderr
    for args, message in ((["--key", "val_iuo"], "--key val_iuo: no run logged it; these runs have val_input_iou, "
                                                  "val_iou"),
                          (["--out", str(tmp_path)], f"--out {tmp_path} is a folder")):
        bad = subprocess.run([sys.executable, "launch/compare_runs.py", str(tmp_path / "a"), *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert "| epoch |" not in bad.stdout  # refused before any output


def _course_reference():
    import importlib.util

    spec = importlib.util.spec_from_file_location("course_reference", LAUNCH / "course_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_course_reference_iou_counts_are_tp_fp_fn_by_hand():
    import torch

    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]], [[[-0.1, 4.0], [0.0, 1.0]]]])  # (2, 1, 2, 2)
    masks = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.0]]]])
    # logit > 0 is person: image 1 TP (0,0), FN (0,1), FP (1,0); image 2 FN (0,0), TP (0,1), FP (1,1); 0.0 is not > 0
    assert _course_reference().iou_counts(logits, masks).tolist() == [2, 2, 2]


def test_course_reference_refuses_bad_values_and_missing_files_before_training(tmp_path, capsys):
    main = _course_reference().main
    split = tmp_path / "split.csv"
    split.write_text(f"images,masks,split\n{tmp_path / 'a.jpg'},{tmp_path / 'a.png'},train\n"
                     f"{tmp_path / 'b.jpg'},{tmp_path / 'b.png'},val\n")
    for args, message in ((["--seed", "-1"], "--seed must be >= 0"), (["--batch", "0"], "--batch must be >= 1"),
                          (["--size", "300"], "--size must be a multiple of 32"),
                          ([], "4 listed file(s) not found, e.g. '" + str(tmp_path / "a.jpg"))):
        assert main([str(split), str(tmp_path / "run"), *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_course_reference_trains_on_the_course_split_and_compare_runs_reads_it(tmp_path):
    root = require_dataset(HUMAN_SEG)
    split = tmp_path / "split.csv"
    subprocess.run([sys.executable, "launch/course_split.py", str(root), str(split)], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    train_rows, val_rows = _course_reference().read_split(split)
    assert len(train_rows) == 232 and len(val_rows) == 58 and not set(train_rows) & set(val_rows)
    cmd = [sys.executable, "launch/course_reference.py", str(split), str(tmp_path / "c1"), "--limit", "8",
           "--size", "64", "--epochs", "2", "--seed", "1"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (tmp_path / "c1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["best_valid_loss"] is True
    assert all(0.0 <= r["val_input_iou"] <= 1.0 and r["img_s"] > 0 for r in rows)
    assert rows[1]["best_valid_loss"] == (rows[1]["val_loss"] < rows[0]["val_loss"])
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)  # never appends to a run
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
    table = subprocess.run([sys.executable, "launch/compare_runs.py", str(tmp_path / "c1"), "--key", "val_input_iou",
                            "--also", ""], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and f"| 2 | {rows[1]['val_input_iou']:.4f} |" in table.stdout
    bad = subprocess.run([sys.executable, "launch/course_reference.py", str(root / "train.csv"), str(tmp_path / "c2")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # no split column
    assert bad.returncode == 2 and "split" in bad.stderr and "Traceback" not in bad.stderr
