"""Shared test fixtures: real datasets (skip only outside CI), small synthetic shard sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One compute thread per process, in this one and every process a test starts (they inherit it), set before
# anything imports torch: the test processes run beside loader workers and each other on 2 cores, and two
# torch threads contending for a busy core made a 64 px training step 7-10x slower than one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
HUMAN_SEG = SHARED / "human-segmentation"
CLOTHING = SHARED / "clothing-parsing"


def require_dataset(path: Path) -> Path:
    """Return ``path``; skip the test when it is absent outside CI, fail when absent under CI."""
    if not path.is_dir():
        if "CI" in os.environ:  # set at all, even empty: a CI run must have the data
            pytest.fail(f"dataset {path} is missing under CI (../shared/datasets must be present)")
        pytest.skip(f"dataset {path} not present")
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A small shard set (train and val: shards of 7, 5, 2 samples; 32 px) from tests/shardutil.py."""
    from tests.shardutil import UNEVEN, write_shards

    return write_shards(tmp_path_factory.mktemp("shards"), {"train": UNEVEN, "val": UNEVEN}, size=32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny untrained binary model folder (64 px, no pretrained weights), as `save_model` writes it."""
    from segdist.checkpoint import ModelMeta, save_model
    from segdist.config import load_config
    from segdist.models import create_model

    cfg = load_config(None, ["model.pretrained=none", "data.image_size=64"])
    out = tmp_path_factory.mktemp("ckpt") / "best"
    save_model(create_model(cfg.model, 1), out, ModelMeta(cfg, ("background", "foreground"), 2, True))
    return out
