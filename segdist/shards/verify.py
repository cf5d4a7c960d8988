"""Check a built shard folder (``segdist shards verify``) and describe it (``segdist shards info``).

``verify`` re-hashes every shard, decodes every sample, and checks sample counts, keys, image/mask
sizes, mask values and per-split pixel counts against ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from .reader import IGNORE_INDEX
from ..errors import UserError
from .workers import default_workers, parallel_map, progress_bar
from .manifest import MANIFEST, local_path, read_manifest
from .reader import IMAGE_MEMBERS, MASK_MEMBER, is_url, tar_samples


def _verify_shard(task: tuple[str, dict, str, int, int]) -> tuple[list[str], list[str], np.ndarray]:
    """Worker: check one shard file. Returns (problems, keys in order, stored-mask value counts)."""
    path, record, split, num_classes, channels = task
    name = record["name"]
    hist = np.zeros(256, np.int64)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return [f"{name}: missing or unreadable ({e.strerror or e})"], [], hist
    problems = []
    if len(data) != record.get("bytes"):
        problems.append(f"{name}: {len(data)} bytes, manifest says {record.get('bytes')} (truncated or changed)")
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        problems.append(f"{name}: sha256 differs from the manifest (file corrupted or changed)")
    keys: list[str] = []
    try:
        for sample in tar_samples(io.BytesIO(data), name):
            keys.append(sample["__key__"])
            files = {k: v for k, v in sample.items() if k != "__key__"}
            problems += [f"{name}: sample {sample['__key__']}: {p}" for p in _check_sample(files, num_classes, channels,
                                                                                          hist)]
    except (tarfile.TarError, EOFError, OSError, ValueError, UserError) as e:
        problems.append(f"{name}: unreadable tar after {len(keys)} samples ({e})")
    if len(keys) != record.get("samples"):
        problems.append(f"{name}: {len(keys)} samples, manifest says {record.get('samples')}")
    return problems, keys, hist


def _check_sample(files: dict[str, bytes], num_classes: int, channels: int, hist: np.ndarray) -> list[str]:
    image_exts = [e for e in files if e in IMAGE_MEMBERS]
    if len(image_exts) != 1 or MASK_MEMBER not in files or len(files) != 2:
        return [f"expected {'|'.join(IMAGE_MEMBERS)} + {MASK_MEMBER}, found {sorted(files)}"]
    try:
        image = Image.open(io.BytesIO(files[image_exts[0]]))
        image.load()
        mask = Image.open(io.BytesIO(files[MASK_MEMBER]))
        mask.load()
    except (OSError, SyntaxError, ValueError) as e:
        return [f"cannot decode ({e})"]
    problems = []
    want = "RGB" if channels == 3 else "L"
    if image.mode != want:
        problems.append(f"image mode {image.mode}, expected {want}")
    if mask.mode != "L":
        problems.append(f"mask mode {mask.mode}, expected L (8-bit one channel)")
        return problems
    if image.size != mask.size:
        problems.append(f"image is {image.size[0]}x{image.size[1]} but mask is {mask.size[0]}x{mask.size[1]}")
    counts = np.bincount(np.asarray(mask).ravel(), minlength=256)
    bad = [v for v in np.flatnonzero(counts) if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        problems.append(f"mask values {bad[:10]} outside 0..{num_classes - 1} and 255")
    hist += counts
    return problems


def verify_shards(folder, workers: int | None = None, progress: bool = True) -> list[str]:
    """Re-hash and decode every shard of a local shard folder; return the problems (empty: all good).

    Raises UserError when ``folder`` is not a shard folder at all.
    """
    if is_url(str(folder)) and not str(folder).startswith("file://"):
        raise UserError(f"verify needs a local shard folder, not {folder}: download it first")
    folder = local_path(folder)
    manifest = read_manifest(folder)
    k, channels = int(manifest.get("num_classes", 2)), int(manifest.get("channels", 3))
    tasks, problems = [], []
    for split, info in manifest["splits"].items():
        for record in info.get("shards", []):
            tasks.append((str(folder / record["name"]), record, split, k, channels))
    listed = {Path(t[0]).name for t in tasks}
    problems += [f"{p.name}: not listed in {MANIFEST}" for p in sorted(folder.glob("*.tar")) if p.name not in listed]
    workers = default_workers() if not workers or workers < 1 else workers
    seen: dict[str, str] = {}
    hist_by_split: dict[str, np.ndarray] = {}
    sources = manifest.get("sources", {})
    with parallel_map(workers, len(tasks)) as pmap:
        for task, (found, keys, hist) in zip(tasks, progress_bar(pmap(_verify_shard, tasks), len(tasks),
                                                              "verify shards", progress)):
            name, split = task[1]["name"], task[2]
            problems += found
            hist_by_split[split] = hist_by_split.get(split, np.zeros(256, np.int64)) + hist
            for key in keys:
                if key in seen:
                    problems.append(f"{name}: key {key} also in {seen[key]}")
                seen[key] = name
                if sources and sources.get(key, {}).get("shard") not in (None, name):
                    problems.append(f"{name}: key {key} belongs to {sources[key]['shard']} per {MANIFEST}")
    problems += _verify_totals(manifest, seen, sources, hist_by_split, k)
    return problems


def _verify_totals(manifest: dict, seen: dict, sources: dict, hist_by_split: dict, k: int) -> list[str]:
    problems = []
    for split, info in manifest["splits"].items():
        total = sum(int(s.get("samples", 0)) for s in info.get("shards", []))
        if total != info.get("samples"):
            problems.append(f"split {split}: shards hold {total} samples, manifest says {info.get('samples')}")
        expected = info.get("class_pixels")
        got = hist_by_split.get(split)
        if expected is not None and got is not None and [int(v) for v in got[:k]] != expected:
            problems.append(f"split {split}: mask pixel counts differ from {MANIFEST}")
    if sources:
        missing = sorted(set(sources) - set(seen))
        extra = sorted(set(seen) - set(sources))
        for shard, keys in sorted(_group_by_shard(missing, sources).items()):
            problems.append(f"{shard}: {len(keys)} samples of {MANIFEST} not found (e.g. {', '.join(keys[:5])})")
        if extra:
            problems.append(f"{len(extra)} samples in shards are not in {MANIFEST} (e.g. {', '.join(extra[:5])})")
    return problems


def _group_by_shard(keys: list[str], sources: dict) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(sources[key].get("shard", "?"), []).append(key)
    return groups


# ----------------------------------------------------------------------------- info
def summarize(manifest: dict, max_classes: int = 20) -> str:
    """Human-readable summary of a manifest (what ``segdist shards info`` prints)."""
    lines = [f"task: {manifest['task']}, {manifest['num_classes']} classes, channels {manifest.get('channels', 3)}"]
    for split, info in manifest["splits"].items():
        shards = info.get("shards", [])
        mb = sum(s.get("bytes", 0) for s in shards) / 1e6
        lines.append(f"  {split:<6} {info['samples']:>7} samples in {len(shards)} shard(s), {mb:.1f} MB")
    size = manifest.get("image_size") or {}
    if size:
        lines.append(f"image width {size['min_w']}..{size['max_w']} (mean {size['mean_w']:.0f}), "
                     f"height {size['min_h']}..{size['max_h']} (mean {size['mean_h']:.0f})")
    freqs = manifest.get("class_frequencies", [])
    names = manifest.get("class_names", [])
    lines.append("class pixel frequencies:")
    for i, (n, f) in enumerate(zip(names, freqs)):
        if i == max_classes:
            lines.append(f"  ... {len(names) - max_classes} more (segdist shards info --json)")
            break
        lines.append(f"  {i:>3} {n:<20} {f:8.4f}")
    counts = manifest.get("counts", {})
    lines.append("counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return "\n".join(lines)
