"""Build, verify and describe WebDataset shard folders (``segdist shards build|verify|info``).

A shard folder holds ``{split}-{index:06d}.tar`` files and ``manifest.json`` (see docs/shards.md).
Each sample is ``{key}.image.jpg`` (the source JPEG's bytes when nothing had to change) or
``{key}.image.png``, plus ``{key}.mask.png``: an 8-bit one-channel PNG of class indices
(binary: {0, 1}; void: 255).

The build reads user data as it comes -- a folder with ``images/`` + ``masks/``, pre-split
``train/`` + ``val/`` folders, a CSV or JSON-lines manifest -- and repairs what can be repaired
without guessing (mask stored at another scale of the same frame, palette masks, 0/255 masks,
EXIF orientation, 16-bit or CMYK images). Everything else is skipped or ignored with a reason that
ends up in the manifest. The modules, in the order data flows through them:

* :mod:`.manifest` -- read ``manifest.json``, shard URLs and counts, :func:`open_shards`
  (stdlib only: the part training imports);
* :mod:`.reader` -- the one tar reader, the member picker and the per-shard identity check
  (stdlib only, also read by training);
* :mod:`.discover` -- find image/mask pairs, give them keys and splits;
* :mod:`.labels` -- class names, palettes, the task and the raw -> stored mask value map;
* :mod:`.sample` -- per-sample decode/check/repair/encode in worker processes;
* :mod:`.build` -- the build: options, the parallel pass over the samples, the manifest;
  :mod:`.writer` -- the output's lock and checks, the tar writer; :mod:`.workers` -- the process
  pool and progress bar (shared with verify);
* :mod:`.classes` and :mod:`.fingerprint` -- a shard set's class table and its identity;
* :mod:`.verify` and :mod:`.cli` at the edges.

``manifest``, ``reader`` and ``discover`` (stdlib only) load with the package; the names of the other
modules load on first use, so ``import segdist.shards.manifest`` pulls in no numpy, OpenCV or PIL.
"""

from __future__ import annotations

from ..lazy import attach
from .discover import (IMAGE_EXTS, MAX_KEY_LEN, SPLIT_ALIASES, SPLIT_ORDER, STRAY_NAMES, Discovery, Pair,
                       assign_splits, discover, sanitize_key, split_order_key)
from .manifest import (FORMAT, MANIFEST, VERSION, ShardSet, expand_urls, is_pattern, open_shards, read_manifest,
                       shard_sizes, shard_urls)
from .reader import IGNORE_INDEX, IMAGE_MEMBERS, MASK_MEMBER, ShardId, image_bytes, mask_bytes, read_samples

_LAZY = {
    "labels": ("Labels", "decide_labels", "read_class_names", "read_palette"),
    "sample": ("Options", "Result", "apply_orientation", "process_pair", "scan_mask"),
    "build": ("BuildOptions", "build_shards"),
    "workers": ("default_workers",),
    "verify": ("summarize", "verify_shards"),
    "cli": ("add_cli",),
}

__all__ = [
    "FORMAT", "MANIFEST", "VERSION", "ShardSet", "expand_urls", "is_pattern", "open_shards", "read_manifest",
    "shard_sizes", "shard_urls",
    "IGNORE_INDEX", "IMAGE_MEMBERS", "MASK_MEMBER", "ShardId", "image_bytes", "mask_bytes", "read_samples",
    "IMAGE_EXTS", "MAX_KEY_LEN", "SPLIT_ALIASES", "SPLIT_ORDER", "STRAY_NAMES", "Discovery", "Pair",
    "assign_splits", "discover", "sanitize_key", "split_order_key",
    *(name for names in _LAZY.values() for name in names),
]

__getattr__, __dir__ = attach(__name__, _LAZY)
