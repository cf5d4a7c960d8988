"""The classic course's recipe, kept apart from segdist's product code: the baseline ``segdist bench`` measures.

The course reads a CSV (``images,masks``) with a cv2 + albumentations ``Dataset`` into a shuffling
``DataLoader`` of float tensors, and trains ``smp.Unet`` on ``tu-efficientnet_lite0`` with
Dice + BCE and Adam (3e-3). :func:`course_loader` and :func:`course_stepper` are that code, as
the course writes it; ``launch/course_reference.py`` runs its whole script on its own split.
Nothing in segdist's training, evaluation or inference imports this module.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError


def read_course_csv(csv_path: Path, limit: int = 0) -> list[tuple[str, str]]:
    """(image path, mask path) rows of a course-style CSV (``images,masks``, relative paths)."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"images", "masks"} <= set(reader.fieldnames):
            raise UserError(f"{csv_path} needs 'images' and 'masks' columns (the course's train.csv format); "
                            f"has {reader.fieldnames}")
        root = csv_path.parent
        rows = [(str(root / (r["images"] or "")), str(root / (r["masks"] or ""))) for r in reader]
    rows = rows[:limit] if limit else rows
    if not rows:
        raise UserError(f"{csv_path} lists no samples")
    # Both loops must read the same images: a row only one of them could read would skew the comparison.
    check_listed_files(csv_path, rows, " (paths are relative to the CSV's folder); fix the CSV or pass --limit "
                                       "to bench its first rows")
    return rows


def check_listed_files(csv_path: Path, rows: list[tuple[str, str]], fix: str) -> None:
    """Every image and mask path in ``rows`` is a file; else a UserError counting the missing ones, then ``fix``."""
    missing = [p for row in rows for p in row if not Path(p).is_file()]
    if missing:
        raise UserError(f"{csv_path}: {len(missing)} listed file(s) not found, e.g. '{missing[0]}'{fix}")


class CourseDataset(Dataset):
    """The course's ``SegmentationDataset``: image (3, S, S) float32 in [0, 1], mask (1, S, S) float32 {0, 1}."""

    def __init__(self, rows: list[tuple[str, str]], augmentations):
        self.rows, self.augmentations = rows, augmentations

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int):
        image_path, mask_path = self.rows[idx]
        image = cv2.imread(image_path)
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        mask = cv2.imread(mask_path, cv2.IMREAD_GRAYSCALE)  # (h, w)
        mask = np.expand_dims(mask, axis=-1)  # (h, w, 1)
        data = self.augmentations(image=image, mask=mask)
        image, mask = data["image"], data["mask"]
        image = np.transpose(image, (2, 0, 1)).astype(np.float32)
        mask = np.transpose(mask, (2, 0, 1)).astype(np.float32)
        return torch.Tensor(image) / 255.0, torch.round(torch.Tensor(mask) / 255.0)


def course_loader(rows: list[tuple[str, str]], size: int, batch: int, workers: int) -> DataLoader:
    import albumentations as A  # lazy: a dev dependency, needed by the course's baseline only

    # is_check_shapes=False: 198 of the 290 masks are stored smaller than their image; Resize fixes both.
    # Workers inherit cv2.setNumThreads(1) from segdist.decode's import; on 2 cores the course measured
    # the same with OpenCV's default threads (~415-420 img/s either way), so this costs it nothing.
    augs = A.Compose([A.Resize(size, size), A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)],
                     is_check_shapes=False)
    return DataLoader(CourseDataset(rows, augs), batch_size=batch, shuffle=True, num_workers=workers)


def course_stepper(args, rows: list, urls: list, sizes: list, stack: contextlib.ExitStack):
    """The course's loop, as the course writes it: Unet + Dice(binary) + BCEWithLogits, Adam(3e-3),
    float batches from ``course_loader`` (a new DataLoader iterator every epoch)."""
    # lazy: `bench data` uses the course's loader only, and SMP/timm in this process would weigh on every
    # loader worker it forks
    import segmentation_models_pytorch as smp

    device = torch.device(args.device)
    model = smp.Unet(encoder_name="tu-efficientnet_lite0", encoder_weights=None, in_channels=3, classes=1,
                     activation=None).to(device)
    dice, bce = smp.losses.DiceLoss(mode="binary"), torch.nn.BCEWithLogitsLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = course_loader(rows, args.size, args.batch, args.workers)
    batches = (b for _ in itertools.count() for b in loader)  # epochs forever, a new iterator each
    model.train()

    def step() -> float:
        t0 = time.perf_counter()
        images, masks = next(batches)
        wait = time.perf_counter() - t0
        images, masks = images.to(device), masks.to(device)
        optimizer.zero_grad()
        logits = model(images)
        loss = dice(logits, masks) + bce(logits, masks)
        loss.backward()
        optimizer.step()
        loss.item()  # the course sums loss.item() per batch
        return wait

    return step
