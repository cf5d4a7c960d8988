"""Helpers of the shard build/verify tests: run the CLI, read and decode every sample of a shard
folder, build a small shard folder from synthetic data."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from segdist.shards import build_shards
from segdist.synth import make_synthetic
from tests.cliutil import run_segdist
from tests.conftest import REPO


def run_cli(*args, process: bool = False, timeout: float = 180) -> subprocess.CompletedProcess:
    """``segdist ARGS``: in this process (tests/cliutil.py), or with ``process`` as a process of its own -- for a
    test that must see everything written to the real stderr, worker processes' output included."""
    if not process:
        return run_segdist(*args)
    return subprocess.run([sys.executable, "-m", "segdist.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)


def read_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard: {key: {"image.jpg"|"image.png": bytes, "mask.png": bytes}}."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tf.extractfile(member).read()
    return samples


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def make_small_shards(base: Path) -> Path:
    """24 synthetic 64 px samples in ``base/syn``, built into ``base/shards``: train 6+6+6+1, val 5."""
    make_synthetic(base / "syn", n=24, size=64, seed=5)
    out = base / "shards"
    build_shards(base / "syn", out, samples_per_shard=6, workers=1, progress=False)
    return out


CAMVID_CLASSES = REPO / "configs" / "camvid_classes.json"


def make_camvid_like(root: Path, counts=(("train", 6), ("val", 6), ("test", 6)), size=(36, 48), seed: int = 0,
                     mask_suffix: str = "annot") -> Path:
    """SegNet's CamVid layout in miniature: ``{split}/`` RGB PNGs and ``{split}{mask_suffix}/`` masks of the same
    name holding class ids 0-10 in blocks, plus 11 (void) along the top row."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split, n in counts:
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}{mask_suffix}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            blocks = rng.integers(0, 11, size=(h // 6 + 1, w // 6 + 1))
            mask = np.kron(blocks, np.ones((6, 6), np.int64))[:h, :w].astype(np.uint8)
            mask[0] = 11
            image = (mask[..., None] * np.array([23, 57, 91]) % 256 + rng.integers(0, 20, (h, w, 3))).astype(np.uint8)
            name = f"0001TP_{i:06d}.png"
            Image.fromarray(image).save(root / split / name)
            Image.fromarray(mask).save(root / f"{split}{mask_suffix}" / name)
    (root / "train.txt").write_text("a SegNet list file: not data\n")
    return root
