"""Tiny shard sets for stream/train tests, written with webdataset.ShardWriter directly.

Each sample's image is a flat colour that encodes its global index and its mask is a
constant class, so a test can tell which sample a decoded batch row came from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds


def sample_bytes(i: int, size: int, ext: str = "png") -> tuple[bytes, bytes]:
    rng = np.random.default_rng(i)
    img = np.full((size, size, 3), (i * 37 % 256, i * 91 % 256, i * 13 % 256), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [int(rng.integers(size // 8, size // 3))]
    fg = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    img[fg] = (255 - img[fg]) // 2 + 60
    mask = fg.astype(np.uint8)
    enc = cv2.imencode(f".{ext}", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes()
    return enc, cv2.imencode(".png", mask)[1].tobytes()


def write_shards(out: Path, splits: dict[str, list[int]], size: int = 32, ext: str = "png") -> Path:
    """splits: {"train": [7, 5, 2], "val": [...]} = samples per shard. Writes manifest.json."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "segdist-shards", "version": 1, "task": "binary", "num_classes": 2,
                "class_names": ["background", "foreground"], "ignore_index": 255, "splits": {}}
    gid = 0
    for split, sizes in splits.items():
        shards = []
        for s, n in enumerate(sizes):
            name = f"{split}-{s:06d}.tar"
            with wds.TarWriter(str(out / name)) as w:
                for _ in range(n):
                    img, mask = sample_bytes(gid, size, ext)
                    w.write({"__key__": f"{split}_{gid:05d}", f"image.{ext}": img, "mask.png": mask})
                    gid += 1
            data = (out / name).read_bytes()
            shards.append({"name": name, "samples": n, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
        manifest["splits"][split] = {"samples": sum(sizes), "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


UNEVEN = [7, 5, 2]
"""Samples per shard of the standard test shard set: uneven on purpose (ranks must still agree)."""


def keys_of(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


def make_loader(urls: list[str], sizes: list[int], *, batch_size: int, image_size: int, train: bool,
                num_workers: int = 0, pin_memory: bool | None = None, epoch: int = 0, start_batch: int = 0,
                prefetch: int = 4, start_method: str | None = None, **stream_kw):
    """One epoch of one rank's batches (``len()`` known up front) from a :class:`ShardStream` over ``urls``;
    the workers live for the epoch (training uses :class:`segdist.loader.Loader` over many epochs)."""
    from segdist.loader import OneEpoch
    from segdist.stream import ShardStream

    stream = ShardStream(urls, sizes, batch_size=batch_size, image_size=image_size, train=train,
                         num_workers=num_workers, **stream_kw)
    return OneEpoch(stream, epoch, start_batch, pin_memory=pin_memory, prefetch=prefetch,
                    start_method=start_method)


def rank_loader(shards, rank, world, workers, train, **kw):
    """One epoch of one rank's batches from the test shard set (32 px, batch 2)."""
    from segdist.shards import open_shards

    urls, sizes = open_shards(str(shards)).split("train" if train else "val")
    return make_loader(urls, sizes, batch_size=kw.pop("batch_size", 2), image_size=32, train=train,
                       num_workers=workers, rank=rank, world_size=world, seed=kw.pop("seed", 0),
                       pin_memory=False, **kw)
