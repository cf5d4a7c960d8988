"""``segdist demo`` / ``make demo``: the whole pipeline on the embedded synthetic dataset.

synth -> shards build -> shards verify -> train (configs/demo.yaml) -> eval -> predict -> export
(ONNX, checked against PyTorch on the val shards).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from .config import load_config
from .errors import UserError
from .train import run

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def run_demo(workdir: str = "runs", overrides: list[str] | tuple = ()) -> dict:
    t0 = time.perf_counter()
    work = Path(workdir)
    data, shards = work / "demo-data", work / "demo-shards"
    # train.overwrite: `make demo` is meant to be run again; its run folder is its own.
    cfg = load_config(DEMO_CONFIG, [f"data.shards={shards}", f"train.out_dir={work}", "train.overwrite=true",
                                    *overrides])

    def step(title: str, argv: list[str]) -> None:
        # The same commands a user types, as `python -m segdist ...` processes.
        print(f"\n== {title}: segdist {' '.join(argv)}", flush=True)
        if subprocess.run([sys.executable, "-m", "segdist", *argv]).returncode != 0:
            raise UserError(f"demo step {title!r} failed (its message is above)")

    step("1/6 synthetic data", ["synth", str(data), "--n", "240", "--size", "256", "--classes", "1", "--seed", "0"])
    step("2/6 build shards", ["shards", "build", str(data), "--out", str(shards), "--samples-per-shard", "32"])
    step("3/6 verify shards", ["shards", "verify", str(shards)])
    print(f"\n== 4/6 train: segdist train --config {DEMO_CONFIG.relative_to(DEMO_CONFIG.parents[1])} "
          f"data.shards={shards} train.out_dir={work}", flush=True)
    metrics = run(cfg)
    best = work / cfg.train.name / "best"
    step("5/6 predict", ["predict", str(best), str(data / "images"), "--out", str(work / cfg.train.name / "predict")])
    run_dir = work / cfg.train.name
    step("6/6 export", ["export", str(best), "--onnx", str(run_dir / "model.onnx"), "--shards", str(shards)])
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s: final val IoU {metrics['iou']:.4f}, "
          f"Dice {metrics['dice']:.4f}\n  curves:   {run_dir / 'curves.png'}\n  overlays: {run_dir / 'overlays'} "
          f"and {run_dir / 'predict' / 'overlays'}\n  model:    {best}\n  onnx:     {run_dir / 'model.onnx'}")
    return metrics
