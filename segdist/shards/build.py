"""The parallel build: options, worker processes, the lock, tar writing, statistics and the manifest.

Stages, in order:

    discover (pairs + skipped/ignored) -> keys -> splits -> label scheme (may pre-scan masks)
    -> decode/check/encode in worker processes -> parent writes tars in key order -> manifest

The output appears atomically: it is written to ``.<out>.tmp-*`` and renamed at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import json
import os
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_dir, check_out_dir, shared_mode_dir
from ..errors import UserError
from .discover import Discovery, Pair, assign_splits, discover, display_path, split_rank
from .labels import Labels, decide_labels, label_files
from .manifest import FORMAT, MANIFEST, VERSION
from .reader import IGNORE_INDEX
from .sample import Options, Result, process_pair, scan_mask
from .workers import default_workers, parallel_map, progress_bar
from .writer import ShardSink, build_lock, check_out, remove_stale

# ============================================================================= options
UNKNOWN_VALUES = ("error", "ignore", "skip")
REENCODE = ("png", "jpeg")
ON_ERROR = ("skip", "fail")


@dataclass(frozen=True)
class BuildOptions:
    """The options of a build: :func:`build_shards`'s keyword arguments and the flags of
    ``segdist shards build`` (``--mask-pattern`` is ``mask_pattern``...). Checked on construction.

    The field order is the order of ``builder`` in the manifest.
    """

    images: str | os.PathLike | None = None
    masks: str | os.PathLike | None = None
    mask_pattern: str | None = None
    image_col: str | None = None
    mask_col: str | None = None
    split_col: str | None = None
    val_fraction: float = 0.2
    split_seed: int = 42
    palette: str | os.PathLike | None = None
    classes: str | os.PathLike | None = None
    void: int | None = None
    unknown_values: str = "error"
    mask_threshold: int | None = None
    channels: int = 3
    reencode: str = "png"
    jpeg_quality: int = 95
    max_side: int = 0
    samples_per_shard: int = 64
    shard_size_mb: float | None = None
    on_error: str = "skip"
    workers: int | None = None
    force: bool = False
    aspect_tolerance: float = 0.02

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.val_fraction < 1.0, f"--val-fraction must be in [0, 1) (got {self.val_fraction})"),
            (self.unknown_values in UNKNOWN_VALUES, "--unknown-values must be error, ignore or skip"),
            (self.channels in (1, 3), f"--channels must be 1 or 3 (got {self.channels})"),
            (self.reencode in REENCODE, f"--reencode must be png or jpeg (got {self.reencode})"),
            (1 <= self.jpeg_quality <= 100, f"--jpeg-quality must be 1..100 (got {self.jpeg_quality})"),
            (not self.max_side or self.max_side >= 16, f"--max-side must be >= 16 pixels (got {self.max_side})"),
            (self.samples_per_shard >= 1, f"--samples-per-shard must be >= 1 (got {self.samples_per_shard})"),
            (self.shard_size_mb is None or self.shard_size_mb > 0,
             f"--shard-size-mb must be > 0 (got {self.shard_size_mb})"),
            (self.on_error in ON_ERROR, "--on-error must be skip or fail"),
            (self.void is None or 0 <= self.void <= 65535, f"--void must be a mask value 0..65535 (got {self.void})"),
            (self.mask_threshold is None or 0 <= self.mask_threshold < 65535, "--mask-threshold must be 0..65534"),
            (0.0 <= self.aspect_tolerance < 0.5, "--aspect-tolerance must be in [0, 0.5)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def record(self) -> dict:
        """The options as the manifest's ``builder`` records them (paths as strings)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in values.items()}


# ============================================================================= the manifest's version
def segdist_version() -> str:
    """The installed segdist's version (pyproject.toml), recorded in each manifest."""
    try:
        return importlib.metadata.version("segdist")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ============================================================================= writing
class _Stats:
    """Per-split sample/pixel counts and image sizes, accumulated as results arrive."""

    def __init__(self):
        self.class_pixels: dict[str, np.ndarray] = {}
        self.sizes: list[tuple[int, int]] = []
        self.flags: Counter = Counter()

    def add(self, result: Result) -> None:
        self.class_pixels.setdefault(result.split, np.zeros(256, np.int64))
        self.class_pixels[result.split] += result.hist
        self.sizes.append((result.width, result.height))
        self.flags.update(result.flags)

    def size_summary(self) -> dict:
        if not self.sizes:
            return {}
        w, h = np.array(self.sizes).T
        return {"min_w": int(w.min()), "max_w": int(w.max()), "mean_w": round(float(w.mean()), 1),
                "min_h": int(h.min()), "max_h": int(h.max()), "mean_h": round(float(h.mean()), 1)}


# ============================================================================= build
def _scan_values(pmap, pairs: list[Pair], opts: Options, progress: bool, root: Path) -> list[dict[int, int]]:
    """Each readable mask's raw values -> pixel counts (unreadable masks are skipped later, not here)."""
    found = list(progress_bar(pmap(functools.partial(scan_mask, opts=opts), pairs), len(pairs), "scan masks", progress))
    found = [None if counts is None else dict(counts) for counts in found]
    _refuse_mixed_binary(pairs, found, opts.void, root)
    return [values for values in found if values is not None]


def _refuse_mixed_binary(pairs: list[Pair], found: list, void: int | None, root: Path) -> None:
    """0/255 masks next to masks with other values: anti-aliased or JPEG binary masks, not classes.

    Guessing either way would silently corrupt labels, so the user decides.
    """
    binary = [p for p, v in zip(pairs, found) if v and set(v) - {void} <= {0, 255, 65535} and len(set(v) - {void}) > 1]
    other = [(p, v) for p, v in zip(pairs, found) if v and set(v) - {void} - {0, 1, 255, 65535}]
    if binary and other:
        shown = "; ".join(f"{p.src_mask}: {list(v)[:6]}{' ...' if len(v) > 6 else ''}" for p, v in other[:3])
        raise UserError(f"{len(binary)} masks hold only 0/255 but {len(other)} hold other values ({shown}). "
                        "Anti-aliased or JPEG binary masks: pass --mask-threshold 127. Index masks: pass "
                        "--classes FILE (255 = void)")


def _import_in_background(module: str) -> None:
    """Start importing ``module`` in a thread. ``webdataset`` imports torch (~1.5 s): with worker
    processes busy decoding, the otherwise idle parent pays it meanwhile. A later ``import`` waits for it."""
    threading.Thread(target=importlib.import_module, args=(module,), daemon=True).start()


def _unknown_error(result: Result, labels: Labels, root: Path) -> UserError:
    shown = ", ".join(map(str, result.values[:12])) + (" ..." if len(result.values) > 12 else "")
    return UserError(f"mask {display_path(Path(result.path), root)} has values {shown} outside the "
                     f"{labels.num_classes} declared classes (0..{labels.num_classes - 1}, 255 = void). Fix: pass "
                     "--classes with every class name, --void V for a void value, or --unknown-values ignore "
                     "(store them as 255) or skip (drop such samples)")


def build_shards(src=None, out=None, *, progress: bool = True, **options) -> dict:
    """Build a shard folder at ``out`` from ``src`` (or ``images``/``masks``); return its manifest.

    ``options`` are the fields of :class:`BuildOptions`. Raises UserError for bad arguments, an
    unusable source, unknown mask values (default policy), ``on_error="fail"`` at the first
    problem file, or when no sample is usable.
    """
    if out is None or str(out) == "":
        raise UserError("--out DIR is required")
    o = BuildOptions(**options)
    out = Path(out)
    check_out_dir(out)  # a file in the way or no write access: one message now, not an OSError later
    early = remove_stale(out)  # now, not only under the lock: a build that fails early still gives the old shards back
    workers = default_workers() if not o.workers or o.workers < 1 else o.workers
    names, palette_table, palette_names = label_files(o.classes, o.palette)
    n_colours = len([1 for _, i in palette_table if i != IGNORE_INDEX])

    found = discover(src, images=o.images, masks=o.masks, mask_pattern=o.mask_pattern, image_col=o.image_col,
                     mask_col=o.mask_col, split_col=o.split_col)
    check_out(out, found, o.force)
    if o.on_error == "fail" and found.skipped:
        first = found.skipped[0]
        raise UserError(f"{first['path']}: {first['reason']} (--on-error fail stops at the first problem)")
    if not found.pairs:
        raise UserError(f"no image/mask pairs found in {src or o.images}" + _reasons_hint(found.skipped))
    pairs, split_info = assign_splits(found.pairs, o.val_fraction, o.split_seed)

    opts = Options(channels=o.channels, reencode=o.reencode, jpeg_quality=o.jpeg_quality, max_side=o.max_side or 0,
                   void=o.void, threshold=o.mask_threshold, palette=palette_table, unknown=o.unknown_values,
                   aspect_tolerance=o.aspect_tolerance)
    if workers > 1:
        _import_in_background("webdataset")
    with build_lock(out), parallel_map(workers, len(pairs)) as pmap:
        stale = early + remove_stale(out)
        needs_scan = names is None and not palette_table and o.mask_threshold is None
        values = _scan_values(pmap, pairs, opts, progress, found.root) if needs_scan else None
        labels = decide_labels(names, palette_names, n_colours, values, o.void, o.mask_threshold)
        opts = dataclasses.replace(opts, value_map=labels.value_map)
        with atomic_dir(out, then="run the build again") as tmp:
            shared_mode_dir(tmp)  # shards are usually shared
            manifest = _write_shards(tmp, pmap, pairs, opts, labels, found, o.samples_per_shard, o.shard_size_mb,
                                     o.on_error, progress)
            manifest.update(_manifest_header(src, found, o.record(), labels, split_info, o.channels, stale))
            colours = class_colours(pairs, labels, palette_table)
            if colours:
                manifest["palette"] = colours
            manifest = _ordered_manifest(manifest)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # the folder rename is the atomic step
    return manifest


def _write_shards(tmp: Path, pmap, pairs: list[Pair], opts: Options, labels: Labels, found: Discovery,
                  samples_per_shard: int, shard_size_mb: float | None, on_error: str, progress: bool) -> dict:
    """Process ``pairs`` in workers and write them, split by split in key order; return manifest parts."""
    ordered = sorted(pairs, key=lambda p: (split_rank(p.split), p.key))
    by_key = {p.key: p for p in pairs}
    maxsize = shard_size_mb * 1e6 if shard_size_mb else 3e9
    stats, skipped, sources = _Stats(), list(found.skipped), {}
    splits: dict[str, dict] = {}
    sink: ShardSink | None = None
    current = None
    results = pmap(functools.partial(process_pair, opts=opts), ordered)
    try:
        for result in progress_bar(results, len(ordered), "build shards", progress):
            if result.status == "unknown":
                raise _unknown_error(result, labels, found.root)
            if result.status == "skip":
                shown = display_path(Path(result.path), found.root) if result.path else by_key[result.key].src_image
                entry = {"path": shown, "reason": result.reason}
                if on_error == "fail":
                    raise UserError(f"{entry['path']}: {entry['reason']} (--on-error fail stops at the first problem)")
                skipped.append(entry)
                continue
            if result.split != current:
                if sink is not None:
                    splits[current]["shards"] = sink.close()
                current, sink = result.split, ShardSink(tmp, result.split, samples_per_shard, maxsize)
                splits[current] = {"samples": 0}
            shard = sink.write(result.key, result.image, result.image_ext, result.mask)
            splits[current]["samples"] += 1
            stats.add(result)
            pair = by_key[result.key]
            sources[result.key] = {"image": pair.src_image, "mask": pair.src_mask, "split": result.split,
                                   "shard": shard}
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    if sink is not None:
        splits[current]["shards"] = sink.close()
    if not sources:
        raise UserError("no usable samples: every pair was skipped" + _reasons_hint(skipped))
    return _stats_manifest(splits, stats, labels, skipped, found.ignored, sources)


def _reasons_hint(skipped: list[dict]) -> str:
    if not skipped:
        return ""
    reason, n = Counter(s["reason"].split(":")[0].split(" (")[0] for s in skipped).most_common(1)[0]
    return f" ({len(skipped)} skipped; most common reason: {reason} [{n}x])"


def _stats_manifest(splits: dict, stats: _Stats, labels: Labels, skipped: list, ignored: list,
                    sources: dict) -> dict:
    k = labels.num_classes
    total = np.zeros(256, np.int64)
    for split, counts in stats.class_pixels.items():
        splits[split]["class_pixels"] = [int(v) for v in counts[:k]]
        splits[split]["void_pixels"] = int(counts[IGNORE_INDEX])
        total += counts
    labelled = max(int(total[:k].sum()), 1)
    return {
        "splits": splits,
        "class_frequencies": [round(int(v) / labelled, 6) for v in total[:k]],
        "image_size": stats.size_summary(),
        "counts": {"samples": sum(s["samples"] for s in splits.values()),
                   "resized": stats.flags["resized"], "reencoded": stats.flags["reencoded"],
                   "oriented": stats.flags["oriented"], "downscaled": stats.flags["downscaled"],
                   "unknown_values_ignored": stats.flags["unknown-ignored"],
                   "skipped": len(skipped), "ignored": len(ignored)},
        "skipped": skipped,
        "ignored": ignored,
        "sources": sources,
    }


def _manifest_header(src, found: Discovery, builder: dict, labels: Labels, split_info: dict, channels: int,
                     stale: list[str]) -> dict:
    source = {"kind": found.kind, "path": str(Path(src).resolve()) if src else str(found.root), **found.extra}
    return {
        "format": FORMAT, "version": VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "segdist_version": segdist_version(), "task": labels.task, "num_classes": labels.num_classes,
        "class_names": labels.class_names, "ignore_index": IGNORE_INDEX, "channels": channels,
        "label_rule": labels.rule, "split": split_info, "source": source, "builder": builder,
        "stale_removed": stale,
    }


def class_colours(pairs: list[Pair], labels: Labels, table: tuple[tuple[int, int], ...]) -> list | None:
    """``[[r, g, b], ...]`` for each stored class of a multi-class build, so predictions can be written
    in the dataset's own colours: the ``--palette`` colours, else the palette of the first mask when
    it is a palette PNG (Pascal VOC, clothing-parsing). None for binary tasks, gray masks, or when a
    class has no colour."""
    if labels.task != "multiclass" or not pairs:
        return None
    to_class = dict(labels.value_map)
    if table:
        packed = {to_class.get(raw): colour for colour, raw in table}
        by_class = {c: [(v >> 16) & 255, (v >> 8) & 255, v & 255] for c, v in packed.items()}
    else:
        try:
            with Image.open(pairs[0].mask) as im:
                pal = im.getpalette() if im.mode == "P" else None
        except OSError:
            return None
        if not pal:
            return None
        by_class = {to_class.get(raw): pal[3 * raw:3 * raw + 3] for raw in range(len(pal) // 3)}
    colours = [by_class.get(c) for c in range(labels.num_classes)]
    return None if any(c is None or len(c) != 3 for c in colours) else [list(map(int, c)) for c in colours]


_KEY_ORDER = ("format", "version", "created", "segdist_version", "task", "num_classes", "class_names",
              "ignore_index", "channels", "label_rule", "splits", "split", "counts", "class_frequencies",
              "image_size", "source", "builder")


def _ordered_manifest(m: dict) -> dict:
    return {**{k: m[k] for k in _KEY_ORDER if k in m}, **{k: v for k, v in m.items() if k not in _KEY_ORDER}}
