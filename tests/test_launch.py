"""launch/course_split.py: the course's train/val split of the human-segmentation dataset."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import HUMAN_SEG, require_dataset

ROOT = Path(__file__).resolve().parents[1]


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


def test_compare_runs_tables_the_epochs_and_plots(tmp_path):
    import json

    for name, scores in {"a": [0.5, 0.91, 0.93], "b": [0.6, 0.88, 0.95]}.items():
        (tmp_path / name).mkdir()
        rows = [{"event": "epoch", "epoch": e + 1, "val_iou": v, "val_input_iou": v - 0.01} for e, v in enumerate(scores)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = subprocess.run([sys.executable, "launch/compare_runs.py", str(tmp_path / "a"), str(tmp_path / "b"),
                          "--ref", "course:1=0.7,3=0.9", "--out", str(tmp_path / "c.png")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "| 2 | 0.9100 (0.9000) | 0.8800 (0.8700) |" in run.stdout
    assert "- a: final 0.9300 (epoch 3), best 0.9300 (epoch 3), first >= 0.9 at epoch 2" in run.stdout
    assert "- mean of 2: final 0.9400 (min 0.9300, max 0.9500" in run.stdout
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "launch/compare_runs.py", str(tmp_path / "missing")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "metrics.jsonl not found" in bad.stderr and "Traceback" not in bad.stderr
