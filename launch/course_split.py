"""Write the course's train/val split of the human-segmentation dataset as a CSV with a split column.

The course keeps ``train.csv``'s row order and takes the first 58 rows of
``numpy.random.RandomState(42).permutation(290)`` as validation, the other 232 as training.
This script writes the same rows with absolute paths and a ``split`` column, so that

    python launch/course_split.py ../shared/datasets/human-segmentation runs/course_split.csv
    segdist shards build runs/course_split.csv --out runs/human-seg-course

builds shards on exactly the course's split (``segdist shards build`` reads the ``split`` column).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

from segdist.atomic import atomic_write_text
from segdist.errors import UserError


def course_split(dataset: Path, val: int = 58, seed: int = 42) -> list[dict]:
    """Rows of ``dataset/train.csv`` in file order, each with absolute ``images``/``masks`` and ``split``."""
    manifest = dataset / "train.csv"
    if not manifest.is_file():
        raise UserError(f"{manifest} not found; pass the human-segmentation folder (the one holding train.csv)")
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"images", "masks"} <= set(rows[0]):
        raise UserError(f"{manifest} has no 'images' and 'masks' columns; is this the human-segmentation dataset?")
    if len(rows) <= val:
        raise UserError(f"{manifest} lists {len(rows)} rows; the course's split needs more than {val} "
                        f"(it is the 290-photo human-segmentation dataset)")
    val_rows = set(np.random.RandomState(seed).permutation(len(rows))[:val].tolist())
    return [{"images": str((dataset / r["images"]).resolve()), "masks": str((dataset / r["masks"]).resolve()),
             "split": "val" if i in val_rows else "train"} for i, r in enumerate(rows)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", type=Path, help="the human-segmentation folder (holds train.csv)")
    p.add_argument("out", type=Path, help="CSV to write (images, masks, split)")
    args = p.parse_args(argv)
    try:
        rows = course_split(args.dataset)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["images", "masks", "split"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        try:
            atomic_write_text(args.out, buf.getvalue())
        except OSError as e:
            raise UserError(f"cannot write {args.out} ({e.strerror}); pass a CSV file path in a writable "
                            f"folder") from None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_val = sum(r["split"] == "val" for r in rows)
    print(f"wrote {args.out}: {len(rows) - n_val} train, {n_val} val (the course's split)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
