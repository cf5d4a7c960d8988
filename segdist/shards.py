"""Build, verify and describe WebDataset shard folders (``segdist shards build|verify|info``).

A shard folder holds ``{split}-{index:06d}.tar`` files and ``manifest.json`` (see docs/shards.md).
Each sample is ``{key}.image.jpg`` (the source JPEG's bytes when nothing had to change) or
``{key}.image.png``, plus ``{key}.mask.png``: an 8-bit one-channel PNG of class indices
(binary: {0, 1}; void: 255).

The build reads user data as it comes -- a folder with ``images/`` + ``masks/``, pre-split
``train/`` + ``val/`` folders, a CSV or JSON-lines manifest -- and repairs what can be repaired
without guessing (mask stored at another scale of the same frame, palette masks, 0/255 masks,
EXIF orientation, 16-bit or CMYK images). Everything else is skipped or ignored with a reason that
ends up in the manifest. Stages, in order:

    discover (pairs + skipped/ignored) -> keys -> splits -> label scheme (may pre-scan masks)
    -> decode/check/encode in worker processes -> parent writes tars in key order -> manifest

The output appears atomically: it is written to ``.<out>.tmp-*`` and renamed at the end.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from . import IGNORE_INDEX, __version__
from .atomic import atomic_dir
from .errors import UserError

FORMAT = "segdist-shards"
VERSION = 1
MANIFEST = "manifest.json"

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
STRAY_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "__macosx"})
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
SPLIT_ORDER = ("train", "val", "test")
MAX_KEY_LEN = 64  # USTAR tar names are limited to 100 bytes: key + ".image.jpg" must fit

_IMAGE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                          "I;16", "I;16L", "I;16B", "I;16N", "I"})
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that exchange width and height


# ============================================================================= data types
@dataclass(frozen=True)
class Pair:
    """One image/mask candidate. ``image``/``mask`` are absolute paths, ``src_*`` as shown to users."""

    key: str
    image: str
    mask: str
    split: str | None
    src_image: str
    src_mask: str


@dataclass
class Discovery:
    """What a source holds: usable pairs, plus the files skipped (problem) or ignored (not data)."""

    kind: str
    root: Path
    pairs: list[Pair]
    skipped: list[dict] = field(default_factory=list)
    ignored: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    """Per-sample processing settings, sent to worker processes (small and picklable).

    ``value_map`` maps raw mask values to stored values (class index or 255); raw values missing
    from it are "unknown". ``palette`` maps packed ``0xRRGGBB`` colours of RGB masks to raw values.
    """

    channels: int = 3
    reencode: str = "png"
    jpeg_quality: int = 95
    max_side: int = 0
    void: int | None = None
    threshold: int | None = None
    palette: tuple[tuple[int, int], ...] = ()
    value_map: tuple[tuple[int, int], ...] = ()
    unknown: str = "error"
    aspect_tolerance: float = 0.02


@dataclass
class Result:
    """Outcome of processing one pair in a worker. ``status``: ok | skip | unknown."""

    key: str
    split: str
    status: str
    reason: str = ""
    path: str = ""
    image: bytes = b""
    image_ext: str = ""
    mask: bytes = b""
    width: int = 0
    height: int = 0
    flags: tuple[str, ...] = ()
    hist: np.ndarray | None = None  # (256,) int64 stored-mask value counts
    values: tuple[int, ...] = ()


class _Skip(Exception):
    """A sample-level problem: the pair is skipped with this reason (``path`` names the file)."""

    def __init__(self, reason: str, path: str = ""):
        super().__init__(reason)
        self.path = path


# ============================================================================= discovery
def _is_stray(name: str) -> bool:
    return name.startswith(".") or name.lower() in STRAY_NAMES


def _display(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _walk_files(folder: Path, root: Path, ignored: list[dict]) -> dict[str, Path]:
    """Image files under ``folder`` (recursive, sorted) keyed by posix path relative to it.

    Hidden files/folders and OS metadata go to ``ignored``; files with other extensions too.
    """
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for d in sorted(dirnames):
            if _is_stray(d):
                ignored.append({"path": _display(here / d, root) + "/", "reason": "hidden or OS metadata folder"})
        dirnames[:] = sorted(d for d in dirnames if not _is_stray(d))
        for name in sorted(filenames):
            path = here / name
            if _is_stray(name):
                ignored.append({"path": _display(path, root), "reason": "stray file (hidden or OS metadata)"})
            elif path.suffix.lower() not in IMAGE_EXTS:
                ignored.append({"path": _display(path, root),
                                "reason": f"not an image file (extension '{path.suffix or 'none'}')"})
            else:
                found[path.relative_to(folder).as_posix()] = path
    return found


def _by_stem(files: dict[str, Path]) -> dict[str, list[str]]:
    stems: dict[str, list[str]] = {}
    for rel in files:
        stems.setdefault(rel.rsplit(".", 1)[0], []).append(rel)
    return stems


def _expected_mask(rel_image: str, pattern: str) -> str:
    parent, _, name = rel_image.rpartition("/")
    try:
        mask_name = pattern.format(stem=name.rsplit(".", 1)[0])
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"--mask-pattern {pattern!r} is invalid ({e}); use {{stem}}, e.g. '{{stem}}_mask.png'")
    return f"{parent}/{mask_name}" if parent else mask_name


def _discover_folders(images: Path, masks: Path, root: Path, pattern: str | None,
                      split: str | None = None, kind: str = "folders") -> Discovery:
    """Pair files of ``images`` and ``masks`` (nested folders allowed) by relative stem or pattern."""
    for what, folder in (("images", images), ("masks", masks)):
        if not folder.is_dir():
            raise UserError(f"{what} folder {folder} does not exist")
    same = images.resolve() == masks.resolve()
    if same and not pattern:
        raise UserError(f"--images and --masks are the same folder ({images}); pass --mask-pattern, "
                        "e.g. '{stem}_mask.png'")
    ignored: list[dict] = []
    image_files = _walk_files(images, root, ignored)
    mask_files = image_files if same else _walk_files(masks, root, ignored)
    match = _match_by_pattern if pattern else _match_by_stem
    matched, skipped = match(image_files, mask_files, pattern, masks, root)
    raw = [(stem, image_files[i], mask_files[m], split) for stem, i, m in matched]
    return Discovery(kind, root, _pairs_from_raw(raw, root), skipped, ignored,
                     {"images": str(images), "masks": str(masks)})


def _match_by_pattern(image_files: dict[str, Path], mask_files: dict[str, Path], pattern: str, masks: Path,
                      root: Path) -> tuple[list[tuple[str, str, str]], list[dict]]:
    """(stem, image, mask) by ``pattern.format(stem=...)`` in the image's sub-folder; plus skips."""
    expected = {rel: _expected_mask(rel, pattern) for rel in image_files}
    mask_names = set(expected.values())
    matched, skipped = [], []
    for rel, path in image_files.items():
        if rel in mask_names:
            continue  # a mask living beside its image (--images and --masks are one folder)
        if expected[rel] in mask_files:
            matched.append((rel.rsplit(".", 1)[0], rel, expected[rel]))
        else:
            wanted = _display(masks / expected[rel], root)
            skipped.append({"path": _display(path, root), "reason": f"no mask (expected {wanted})"})
    used = {m for _, _, m in matched}
    own_folder = mask_files is image_files  # there, only pattern-named files are masks at all
    skipped += [{"path": _display(mask_files[m], root), "reason": "mask without image"}
                for m in mask_files if m not in used and (not own_folder or m in mask_names)]
    return matched, skipped


def _match_by_stem(image_files: dict[str, Path], mask_files: dict[str, Path], pattern: None, masks: Path,
                   root: Path) -> tuple[list[tuple[str, str, str]], list[dict]]:
    """(stem, image, mask) for files with the same relative path up to the extension; plus skips."""
    mask_stems = _by_stem(mask_files)
    matched, skipped, used = [], [], set()
    for stem, rels in _by_stem(image_files).items():
        candidates = mask_stems.get(stem, [])
        used.update(candidates)
        if len(rels) > 1:
            reason = f"several images share the name {stem}.* ({', '.join(rels)})"
            skipped += [{"path": _display(image_files[rel], root), "reason": reason} for rel in rels]
        elif not candidates:
            wanted = _display(masks / stem, root)
            skipped.append({"path": _display(image_files[rels[0]], root),
                            "reason": f"no mask (expected {wanted}.png or another image extension)"})
        elif len(candidates) > 1:
            skipped.append({"path": _display(image_files[rels[0]], root),
                            "reason": f"several masks match: {', '.join(candidates)}"})
        else:
            matched.append((stem, rels[0], candidates[0]))
    skipped += [{"path": _display(mask_files[m], root), "reason": "mask without image"}
                for m in mask_files if m not in used]
    return matched, skipped


def _split_folders(src: Path) -> dict[str, Path]:
    """``train/``, ``val/``, ``test/`` (or aliases) folders of ``src`` that hold images/ + masks/."""
    found = {}
    for child in sorted(src.iterdir()):
        split = SPLIT_ALIASES.get(child.name.lower())
        if split and (child / "images").is_dir() and (child / "masks").is_dir():
            if split in found:
                raise UserError(f"{src} has two folders for split '{split}' ({found[split].name}, {child.name})")
            found[split] = child
    return found


def _discover_split_folders(src: Path, splits: dict[str, Path], pattern: str | None) -> Discovery:
    parts = [_discover_folders(folder / "images", folder / "masks", src, pattern, split=split)
             for split, folder in splits.items()]
    raw = [(f"{p.split}/{p.key}", Path(p.image), Path(p.mask), p.split) for d in parts for p in d.pairs]
    return Discovery("split-folders", src, _pairs_from_raw(raw, src),
                     [s for d in parts for s in d.skipped], [s for d in parts for s in d.ignored],
                     {"splits": {k: str(v) for k, v in splits.items()}})


def _nested_splits(discovery: Discovery) -> Discovery:
    """``images/train/..`` + ``masks/train/..``: the first folder level names the split."""
    tops = {_top_folder(p, discovery) for p in discovery.pairs}
    if not discovery.pairs or None in tops or not all(t in SPLIT_ALIASES for t in tops):
        return discovery
    pairs = [Pair(p.key, p.image, p.mask, SPLIT_ALIASES[_top_folder(p, discovery)], p.src_image, p.src_mask)
             for p in discovery.pairs]
    discovery.pairs = pairs
    discovery.kind += "+nested-splits"
    return discovery


def _top_folder(pair: Pair, discovery: Discovery) -> str | None:
    rel = Path(pair.image).relative_to(discovery.extra["images"]).parts
    return rel[0].lower() if len(rel) > 1 else None


# ----------------------------------------------------------------------------- manifests (CSV, JSONL)
_IMAGE_COLS = ("images", "image", "image_path", "img")
_MASK_COLS = ("masks", "mask", "mask_path", "label", "labels")


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read manifest {path}: {e}")
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {i} is not valid JSON ({e.msg})")
                if not isinstance(row, dict):
                    raise UserError(f"{path} line {i} is not a JSON object")
                rows.append(row)
        return rows
    if suffix in (".csv", ".tsv"):
        dialect = "excel-tab" if suffix == ".tsv" else "excel"
        reader = csv.DictReader(io.StringIO(text), dialect=dialect)
        if not reader.fieldnames:
            raise UserError(f"{path} has no header row")
        return [dict(r) for r in reader]
    raise UserError(f"unsupported manifest {path}: use .csv, .tsv, .jsonl or .ndjson")


def _pick_column(columns: list[str], wanted: str | None, defaults: tuple[str, ...], path: Path) -> str | None:
    """``wanted`` (case-insensitive), else the first default present, else None."""
    lower = {c.strip().lower(): c for c in columns}
    if wanted:
        if wanted.strip().lower() not in lower:
            raise UserError(f"{path} has no column '{wanted}' (columns: {', '.join(columns)})")
        return lower[wanted.strip().lower()]
    return next((lower[name] for name in defaults if name in lower), None)


def _required_column(columns, wanted, defaults, path: Path, what: str, flag: str) -> str:
    column = _pick_column(columns, wanted, defaults, path)
    if column is None:
        raise UserError(f"{path}: cannot tell which column holds the {what} paths (columns: {', '.join(columns)}); "
                        f"pass {flag} NAME")
    return column


def _discover_manifest(path: Path, image_col: str | None, mask_col: str | None,
                       split_col: str | None) -> Discovery:
    """Pairs listed in a CSV/TSV/JSONL file; paths relative to its folder or absolute."""
    rows = _read_rows(path)
    if not rows:
        raise UserError(f"{path} lists no samples")
    columns = list(rows[0].keys())
    icol = _required_column(columns, image_col, _IMAGE_COLS, path, "image", "--image-col")
    mcol = _required_column(columns, mask_col, _MASK_COLS, path, "mask", "--mask-col")
    scol = _pick_column(columns, split_col, ("split",), path)
    root = path.parent.resolve()
    first_row = 2 if path.suffix.lower() in (".csv", ".tsv") else 1  # CSV line 1 is the header
    skipped: list[dict] = []
    listed: dict[Path, tuple[int, Path, str | None]] = {}  # image -> (row, mask, split)
    for n, row in enumerate(rows, first_row):
        split = _split_name(row.get(scol), path, n) if scol else None
        image, mask, problem = _resolve_row(row.get(icol), row.get(mcol), root)
        where = f"{path.name} row {n}"
        if image in listed:
            problem = f"listed twice ({path.name} rows {listed[image][0]} and {n})"
        if problem:
            shown = _display(image, root) if image else f"{path.name}:{n}"
            skipped.append({"path": shown, "reason": f"{problem} ({where})"})
        else:
            listed[image] = (n, mask, split)
    # Keys relative to the images' common folder, so a CSV and its folders give the same keys.
    base = Path(os.path.commonpath([str(i.parent) for i in listed])) if listed else root
    raw = [(image.relative_to(base).with_suffix("").as_posix(), image, mask, split)
           for image, (_, mask, split) in listed.items()]
    ignored = _unlisted_files(path, root, set(listed) | {m for _, m, _ in listed.values()})
    return Discovery("manifest", root, _pairs_from_raw(raw, root), skipped, ignored,
                     {"manifest": str(path), "columns": {"image": icol, "mask": mcol, "split": scol}})


def _resolve_row(image_cell, mask_cell, root: Path) -> tuple[Path | None, Path | None, str]:
    """(image, mask, problem) for one manifest row; ``problem`` is "" when both files exist."""
    image_cell, mask_cell = str(image_cell or "").strip(), str(mask_cell or "").strip()
    if not image_cell:
        return None, None, "row has no image path"
    image = Path(os.path.normpath(root / image_cell))  # an absolute cell replaces root
    if not image.is_file():
        return image, None, "image file not found"
    if not mask_cell:
        return image, None, "no mask listed"
    mask = Path(os.path.normpath(root / mask_cell))
    if not mask.is_file():
        return image, mask, f"mask file not found: {_display(mask, root)}"
    return image, mask, ""


def _unlisted_files(manifest: Path, root: Path, listed: set[Path]) -> list[dict]:
    """Files beside the listed ones that the manifest does not mention (reported, never used)."""
    ignored = []
    for folder in sorted({p.parent for p in listed}):
        if folder == root:
            continue  # the manifest's own folder holds the manifest, READMEs...
        for child in sorted(folder.iterdir()):
            if child.is_dir() or child in listed:
                continue
            reason = ("stray file (hidden or OS metadata)" if _is_stray(child.name)
                      else f"not listed in {manifest.name}")
            ignored.append({"path": _display(child, root), "reason": reason})
    return ignored


def _split_name(value, path: Path, row: int) -> str:
    name = str(value or "").strip().lower()
    name = SPLIT_ALIASES.get(name, name)
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise UserError(f"{path} row {row}: split '{value}' is empty or not a simple name (train, val, test...)")
    return name


# ----------------------------------------------------------------------------- keys
def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: ASCII letters, digits, '_' and '-' only (no dots, no slashes)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_text).strip("_")
    if len(key) > MAX_KEY_LEN:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        key = f"{key[:MAX_KEY_LEN - 9].rstrip('_')}_{digest}"
    return key or "sample"


def _pairs_from_raw(raw: list[tuple[str, Path, Path, str | None]], root: Path) -> list[Pair]:
    """Give each (key base, image, mask, split) a unique sanitised key; collisions get ``_2``, ``_3``..."""
    used: set[str] = set()
    pairs = []
    for base, image, mask, split in sorted(raw, key=lambda r: r[0]):
        key = candidate = sanitize_key(base)
        n = 2
        while key in used:
            key = f"{candidate}_{n}"
            n += 1
        used.add(key)
        pairs.append(Pair(key, str(image), str(mask), split, _display(image, root), _display(mask, root)))
    return pairs


def discover(src=None, *, images=None, masks=None, mask_pattern=None, image_col=None, mask_col=None,
             split_col=None) -> Discovery:
    """Find the image/mask pairs of a source (see module docstring for the layouts)."""
    if images or masks:
        if not (images and masks):
            raise UserError("pass both --images DIR and --masks DIR (or a SRC folder / manifest instead)")
        images, masks = Path(images), Path(masks)
        root = Path(os.path.commonpath([images.resolve(), masks.resolve()]))
        return _nested_splits(_discover_folders(images.resolve(), masks.resolve(), root, mask_pattern,
                                                kind="images-masks"))
    if src is None:
        raise UserError("shards build needs SRC (a folder or a CSV/JSONL manifest) or --images and --masks")
    src = Path(src)
    if src.is_file():
        return _discover_manifest(src.resolve(), image_col, mask_col, split_col)
    if not src.is_dir():
        raise UserError(f"source {src} does not exist")
    src = src.resolve()
    if (src / "images").is_dir() and (src / "masks").is_dir():
        return _nested_splits(_discover_folders(src / "images", src / "masks", src, mask_pattern))
    splits = _split_folders(src)
    if splits:
        return _discover_split_folders(src, splits, mask_pattern)
    manifests = sorted(p for p in src.iterdir()
                       if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".ndjson") and not _is_stray(p.name))
    if len(manifests) == 1:
        return _discover_manifest(manifests[0], image_col, mask_col, split_col)
    raise UserError(f"{src} is not a dataset layout segdist knows: expected images/ + masks/ folders, "
                    "train/ + val/ folders each with images/ + masks/, or one CSV/JSONL manifest "
                    f"(found {len(manifests)}); or pass --images DIR --masks DIR")


# ============================================================================= splits
def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def split_order_key(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def assign_splits(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], dict]:
    """Keep given splits, else put the round(N * val_fraction) keys with the smallest hash in val.

    Ranking by ``sha256(seed:key)`` gives exact counts (232/58 for 290 samples) and is stable when
    files are added: a new file only moves the samples whose rank crosses the cut.
    """
    given = [p.split is not None for p in pairs]
    if any(given) and not all(given):
        raise UserError("some samples have a split and others do not: give every row a split or none")
    if pairs and all(given):
        return pairs, {"method": "given"}
    n_val = _round_half_up(len(pairs) * val_fraction)
    ranked = sorted(pairs, key=lambda p: split_order_key(seed, p.key))
    val = {p.key for p in ranked[:n_val]}
    out = [Pair(p.key, p.image, p.mask, "val" if p.key in val else "train", p.src_image, p.src_mask)
           for p in pairs]
    return out, {"method": "hash", "val_fraction": val_fraction, "seed": seed}


def _split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


# ============================================================================= labels
def read_class_names(path) -> list[str]:
    """Class names from a JSON list or ``{"classes": [...]}`` (like clothing-parsing/classes.json)."""
    data = _read_json(path, "--classes")
    names = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"--classes {path}: expected a list of >= 2 class names or {{\"classes\": [...]}}")
    if len(names) > 255:
        raise UserError(f"--classes {path}: {len(names)} classes; masks are 8-bit with 255 = void, so at most 255")
    return names


def read_palette(path) -> tuple[tuple[tuple[int, int], ...], list[str] | None]:
    """Colour table for RGB masks: ``[[r,g,b], ...]`` or ``{"colors": [...], "classes": [...], "void": [r,g,b]}``.

    Returns ((packed 0xRRGGBB, class index or 255), ...) and the class names if given.
    """
    data = _read_json(path, "--palette")
    colours = data.get("colors", data.get("colours")) if isinstance(data, dict) else data
    names = data.get("classes") if isinstance(data, dict) else None
    void = data.get("void") if isinstance(data, dict) else None
    voids = [] if void is None else (void if void and isinstance(void[0], list) else [void])

    def packed(c) -> int:
        if not (isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)):
            raise UserError(f"--palette {path}: colour {c!r} is not [r, g, b] with 0..255 values")
        return (c[0] << 16) | (c[1] << 8) | c[2]

    if not isinstance(colours, list) or len(colours) < 2:
        raise UserError(f"--palette {path}: expected a list of >= 2 [r, g, b] colours (class index order)")
    table = [(packed(c), i) for i, c in enumerate(colours)] + [(packed(c), IGNORE_INDEX) for c in voids]
    if len({c for c, _ in table}) != len(table):
        raise UserError(f"--palette {path}: a colour appears twice")
    if names is not None and (not isinstance(names, list) or len(names) != len(colours)):
        raise UserError(f"--palette {path}: 'classes' must list one name per colour")
    return tuple(table), names


def _read_json(path, flag: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot read ({e.strerror or e})")
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} {path}: not valid JSON ({e.msg} at line {e.lineno})")


@dataclass(frozen=True)
class Labels:
    task: str
    num_classes: int
    class_names: list
    value_map: tuple[tuple[int, int], ...]
    rule: str


_FULL_SCALE = (255, 65535)  # "all on" of 8- and 16-bit masks: foreground in binary masks, else void


def decide_labels(names: list[str] | None, palette_names: list[str] | None, palette_size: int,
                  scanned: list[tuple[int, ...]] | None, void: int | None, threshold: int | None) -> Labels:
    """Choose task, class count and the raw-value -> stored-value map.

    Binary when a class list has 2 names, with ``--mask-threshold``, or (no class list) when
    every mask holds only {0, 1} or only {0, 255} (16-bit: {0, 65535}): both read as 0/1. When
    some mask holds 0, 1 and 255 together, 255 is void (the VOC convention). Otherwise
    multiclass: values are class indices and 255 is void. ``scanned`` holds each mask's
    distinct raw values (None: not scanned because classes are declared).
    """
    names = names or palette_names
    if threshold is not None:
        mapping, task, k, rule = {0: 0, 1: 1}, "binary", 2, f"threshold: value > {threshold} -> 1"
    elif names is not None or palette_size:
        k = len(names) if names is not None else palette_size
        task = "binary" if k == 2 else "multiclass"
        mapping = {0: 0, 1: 1, 255: 1, 65535: 1} if k == 2 else {v: v for v in range(k)}
        rule = "class list: 0 -> 0; 1, 255, 65535 -> 1" if k == 2 else f"class list: values 0..{k - 1} are classes"
    else:
        masks = [set(v) - {void} for v in scanned or ()]
        union = set().union(*masks) if masks else set()
        if all(m <= {0, 1} or m <= {0, *_FULL_SCALE} for m in masks) and union <= {0, 1, *_FULL_SCALE}:
            mapping, task, k, rule = {0: 0, 1: 1, 255: 1, 65535: 1}, "binary", 2, \
                f"masks hold {sorted(union)}: non-zero -> 1"
        elif union <= {0, 1, *_FULL_SCALE}:
            mapping, task, k, rule = {0: 0, 1: 1}, "binary", 2, "masks hold 0, 1 and 255: 255 is void"
        else:
            k = max(v for v in union if v not in _FULL_SCALE) + 1
            mapping, task = {v: v for v in range(min(k, IGNORE_INDEX))}, "multiclass"
            rule = f"values are class indices 0..{k - 1}" + ("" if names else f" (named class_0..class_{k - 1})")
    for full in _FULL_SCALE:
        mapping.setdefault(full, IGNORE_INDEX)  # void unless it means foreground above
    if void is not None:
        mapping[void] = IGNORE_INDEX
    if names is None:
        names = ["background", "foreground"] if task == "binary" else [f"class_{i}" for i in range(k)]
    if k > IGNORE_INDEX:
        raise UserError(f"masks hold values up to {k - 1}; stored masks are 8-bit with 255 = void, so at most "
                        "255 classes: pass --classes FILE, --void V or --mask-threshold T")
    return Labels(task, k, list(names), tuple(sorted(mapping.items())), rule)


@functools.lru_cache(maxsize=8)
def _lookup(value_map: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """(stored value per raw 16-bit value, known flag per raw value); unknown values store 255."""
    lut = np.full(65536, IGNORE_INDEX, np.uint8)
    known = np.zeros(65536, bool)
    for raw, out in value_map:
        lut[raw] = out
        known[raw] = True
    return lut, known


# ============================================================================= per-sample work (workers)
def _read_bytes(path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise _Skip(f"cannot read file ({e.strerror or e})", path)
    if not data:
        raise _Skip("empty file (0 bytes)", path)
    return data


def _open_image(data: bytes, path: str, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            im.format  # noqa: B018 - touch to make PIL parse the header
        return im
    except UnidentifiedImageError:
        raise _Skip(f"not a readable {what} (unknown or corrupt file format)", path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _Skip(f"unreadable {what} ({e})", path)


def _load(im: Image.Image, path: str, what: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _Skip(f"unreadable {what}: {e}", path)


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - broken EXIF must not lose the sample; treat as upright
        return 1
    return value if 1 <= value <= 8 else 1


_ORIENT = {  # EXIF orientation -> array op that shows the image upright (same as PIL's exif_transpose)
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip ``(H, W[, C])`` ``array`` as EXIF ``orientation`` says (1 = unchanged)."""
    return np.ascontiguousarray(_ORIENT[orientation](array))


def _same_aspect(a: tuple[int, int], b: tuple[int, int], tolerance: float) -> bool:
    """Whether frames ``a`` and ``b`` (w, h) have the same aspect ratio, up to ``tolerance`` or 1 px."""
    (aw, ah), (bw, bh) = a, b
    cross = abs(aw * bh - ah * bw)
    return cross <= tolerance * max(ah * bw, aw * bh) or cross <= max(aw, ah, bw, bh)


def _png_is_plain_8bit(data: bytes, channels: int) -> bool:
    """PNG IHDR says 8-bit RGB (channels 3) or 8-bit gray (channels 1), no palette/alpha/16-bit."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 26:
        return False
    depth, colour_type = data[24], data[25]
    return depth == 8 and colour_type == (2 if channels == 3 else 0)


def _image_to_array(im: Image.Image, channels: int) -> np.ndarray:
    """Decoded image as 8-bit ``(H, W, 3)`` RGB or ``(H, W)`` gray; 16-bit scaled by 1/257."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return gray if channels == 1 else np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB" if channels == 3 else "L"))


def _encode_image(array: np.ndarray, opts: Options) -> tuple[bytes, str]:
    bgr = array[..., ::-1] if array.ndim == 3 else array
    if opts.reencode == "jpeg":
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(bgr), [cv2.IMWRITE_JPEG_QUALITY, opts.jpeg_quality])
        return buf.tobytes(), "jpg"
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr))
    return buf.tobytes(), "png"


def _mask_raw(im: Image.Image, opts: Options, path: str) -> np.ndarray:
    """Mask pixels as raw label values ``(H, W)`` uint8/uint16 (palette PNGs: indices, not colours)."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("L", "P"):
        return np.asarray(im)
    if mode in ("LA", "PA"):
        return np.asarray(im)[..., 0]
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        raw = np.asarray(im)
        if raw.min() < 0 or raw.max() > 65535:
            raise _Skip("mask values outside 0..65535", path)
        return raw.astype(np.uint16)
    if mode in ("RGB", "RGBA"):
        rgb = np.asarray(im.convert("RGB"))
        if opts.palette:
            return _colours_to_values(rgb, opts.palette, path)
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., 0].copy()  # a gray mask saved as RGB
        raise _Skip("RGB colour mask: pass --palette colors.json to map colours to classes", path)
    raise _Skip(f"unsupported mask mode {mode}", path)


def _colours_to_values(rgb: np.ndarray, palette: tuple[tuple[int, int], ...], path: str) -> np.ndarray:
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    table = dict(palette)
    missing = [int(c) for c in colours if int(c) not in table]
    if missing:
        shown = ", ".join(f"#{c:06x}" for c in missing[:8])
        raise _Skip(f"mask colours not in --palette: {shown}" + (" ..." if len(missing) > 8 else ""), path)
    values = np.array([table[int(c)] for c in colours], np.uint8)
    return values[inverse.reshape(packed.shape)]


def _present_values(raw: np.ndarray) -> np.ndarray:
    """Distinct values of a mask; a 256-bin count is ~10x faster than np.unique for 8-bit masks."""
    if raw.dtype == np.uint8:
        return np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
    return np.unique(raw)


def _mask_values(raw: np.ndarray, opts: Options) -> tuple[int, ...]:
    """Distinct raw values of a mask (void value excluded)."""
    return tuple(int(v) for v in _present_values(raw) if v != opts.void)


def _read_mask(pair: Pair, opts: Options) -> np.ndarray:
    data = _read_bytes(pair.mask)
    im = _open_image(data, pair.mask, "mask")
    if im.format == "JPEG" and opts.threshold is None:
        raise _Skip("JPEG mask: lossy compression changed the label values; use PNG masks "
                    "or --mask-threshold 127 for binary masks", pair.mask)
    _load(im, pair.mask, "mask")
    raw = _mask_raw(im, opts, pair.mask)
    if opts.threshold is not None:
        void = raw == opts.void if opts.void is not None else None
        raw = (raw > opts.threshold).astype(np.uint8)
        if void is not None:
            raw[void] = IGNORE_INDEX
    return raw


def scan_mask(pair: Pair, opts: Options) -> tuple[int, ...] | None:
    """Worker: the raw values of one mask, or None when it cannot be read (the build skips it later)."""
    try:
        return _mask_values(_read_mask(pair, opts), opts)
    except _Skip:
        return None


def _to_index(raw: np.ndarray, opts: Options) -> tuple[np.ndarray, tuple[int, ...]]:
    """Map raw values to stored ``(H, W) uint8`` values; also return the unknown raw values found."""
    if opts.threshold is not None:  # already 0/1/255
        return raw.astype(np.uint8), ()
    lut, known = _lookup(opts.value_map)
    unknown = tuple(int(v) for v in _present_values(raw) if not known[v])
    return lut[raw], unknown


def process_pair(pair: Pair, opts: Options) -> Result:
    """Worker: decode, check, repair and encode one pair. Never raises for bad input files."""
    try:
        flags: list[str] = []
        image = _read_image(pair, opts)
        index = _read_index_mask(pair, opts, image, flags)
        image_bytes, ext, index = _encode_sample(image, index, opts, flags)
    except _Skip as s:
        return Result(pair.key, pair.split, "skip", str(s), s.path)
    except _UnknownValues as u:
        return Result(pair.key, pair.split, "unknown", path=pair.mask, values=u.values)
    except MemoryError:
        return Result(pair.key, pair.split, "skip", "image too large to decode in memory", pair.image)
    # Level 1: masks are decoded every epoch; 3x faster to decode for ~20-30 % more bytes (bench data).
    ok, mask_png = cv2.imencode(".png", index, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return Result(pair.key, pair.split, "ok", image=image_bytes, image_ext=ext, mask=mask_png.tobytes(),
                  width=index.shape[1], height=index.shape[0], flags=tuple(flags),
                  hist=np.bincount(index.ravel(), minlength=256))


class _UnknownValues(Exception):
    def __init__(self, values: tuple[int, ...]):
        super().__init__(values)
        self.values = values


@dataclass
class _Image:
    """A decoded source image: ``size`` is upright (w, h), ``keep`` = store the file's own bytes."""

    im: Image.Image
    data: bytes
    orientation: int
    stored: tuple[int, int]
    size: tuple[int, int]
    scale: float
    keep: bool


def _read_image(pair: Pair, opts: Options) -> _Image:
    data = _read_bytes(pair.image)
    im = _open_image(data, pair.image, "image")
    if im.mode not in _IMAGE_MODES:
        raise _Skip(f"unsupported image mode {im.mode}; convert it to 8- or 16-bit RGB or gray", pair.image)
    orientation = _orientation(im)
    stored = im.size
    size = stored[::-1] if orientation in _SWAPS_AXES else stored
    scale = opts.max_side / max(size) if opts.max_side and max(size) > opts.max_side else 1.0
    want_mode = "RGB" if opts.channels == 3 else "L"
    plain = (im.format == "JPEG" and im.mode == want_mode) or (
        im.format == "PNG" and _png_is_plain_8bit(data, opts.channels))
    keep = plain and orientation == 1 and scale == 1.0
    if keep and im.format == "JPEG":
        # Only validity matters for kept bytes: a 1/8-scale decode still reads every byte (catches truncation).
        im.draft(im.mode, (max(stored[0] // 8, 1), max(stored[1] // 8, 1)))
    _load(im, pair.image, "image")
    return _Image(im, data, orientation, stored, size, scale, keep)


def _read_index_mask(pair: Pair, opts: Options, image: _Image, flags: list[str]) -> np.ndarray:
    """The mask as stored values ``(H, W) uint8``, turned like the image and resized to its upright size."""
    raw = _read_mask(pair, opts)
    if image.orientation != 1:
        flags.append("oriented")
        frame = raw.shape[::-1]
        drawn_upright = image.orientation in _SWAPS_AXES and _same_aspect(frame, image.size, opts.aspect_tolerance) \
            and not _same_aspect(frame, image.stored, opts.aspect_tolerance)
        if not drawn_upright:  # the mask follows the stored pixels, like the image before turning
            raw = apply_orientation(raw, image.orientation)
    index, unknown = _to_index(raw, opts)
    if unknown and opts.unknown == "error":
        raise _UnknownValues(unknown)
    if unknown and opts.unknown == "skip":
        raise _Skip(f"mask values {list(unknown)[:10]} are not declared classes", pair.mask)
    if unknown:
        flags.append("unknown-ignored")  # the lookup table already stores them as 255
    (w, h), (mh, mw) = image.size, index.shape
    if (mw, mh) != (w, h):
        if not _same_aspect((mw, mh), (w, h), opts.aspect_tolerance):
            raise _Skip(f"mask is {mw}x{mh} but image is {w}x{h}: different aspect ratio", pair.mask)
        index = cv2.resize(index, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
        flags.append("resized")
    return index


def _encode_sample(image: _Image, index: np.ndarray, opts: Options,
                   flags: list[str]) -> tuple[bytes, str, np.ndarray]:
    """(image bytes, "jpg"|"png", mask): the source bytes when unchanged, else turned/scaled and encoded."""
    if image.keep:
        return image.data, ("jpg" if image.im.format == "JPEG" else "png"), index
    array = apply_orientation(_image_to_array(image.im, opts.channels), image.orientation)
    if image.scale != 1.0:
        w, h = image.size
        size = (max(round(w * image.scale), 1), max(round(h * image.scale), 1))
        array = cv2.resize(array, size, interpolation=cv2.INTER_AREA)
        index = cv2.resize(index, size, interpolation=cv2.INTER_NEAREST_EXACT)
        flags.append("downscaled")
    flags.append("reencoded")
    return *_encode_image(array, opts), index


# ============================================================================= parallel map
def default_workers() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - not Linux
        return max(os.cpu_count() or 1, 1)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one sample per process at a time; OpenCV's own pool would oversubscribe


@contextlib.contextmanager
def _mapper(workers: int, n_items: int):
    """Yield ``map(f, items)``: in-process for 1 worker, else an ordered process pool.

    forkserver, not fork: workers start from a clean process, so they inherit neither the
    build lock's file descriptor nor threads of a caller that already imported torch.
    """
    if workers <= 1 or n_items <= 1:
        yield map
        return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["segdist.shards"])
    chunk = max(1, min(8, n_items // (workers * 8)))
    with ctx.Pool(min(workers, n_items), initializer=_init_worker) as pool:
        yield lambda f, items: pool.imap(f, items, chunksize=chunk)


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True,
                disable=None if enabled else True, leave=False)


# ============================================================================= writing
class _ShardSink:
    """Writes one split through ``webdataset.ShardWriter``; records name/samples/bytes/sha256 per shard."""

    def __init__(self, folder: Path, split: str, maxcount: int, maxsize: float):
        import webdataset as wds

        self.folder = folder
        self.records: list[dict] = []
        self._files: dict[str, object] = {}
        self._counts: Counter = Counter()
        # encoder=False: values are already encoded bytes; mtime=0 makes rebuilds byte-identical.
        # A bare-name pattern + opener: a '%' in the output path cannot break `pattern % index`, and
        # webdataset's URL handling (gopen, WDS_SECURE) stays out of local writes.
        self._writer = wds.ShardWriter(f"{split}-%06d.tar", maxcount=maxcount, maxsize=maxsize,
                                       post=self._finished, opener=self._open, verbose=0,
                                       encoder=False, mtime=0)

    def _open(self, name: str):
        f = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _finished
        self._files[name] = f
        return f

    def _finished(self, name: str) -> None:
        f = self._files.pop(name)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        path = self.folder / name
        self.records.append({"name": name, "samples": self._counts[name], "bytes": path.stat().st_size,
                             "sha256": _sha256_file(path)})

    def write(self, key: str, image: bytes, image_ext: str, mask: bytes) -> str:
        self._writer.write({"__key__": key, f"image.{image_ext}": image, "mask.png": mask})
        name = self._writer.fname
        self._counts[name] += 1
        return name

    def close(self) -> list[dict]:
        self._writer.close()
        return self.records

    def abort(self) -> None:
        """Close open files without finishing the tar (the temp folder is about to be removed)."""
        for f in self._files.values():
            f.close()
        self._files.clear()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
_LOCK_WAIT_S = 15.0


@contextlib.contextmanager
def _build_lock(out: Path):
    """Hold ``.<out>.lock`` beside ``out``: one build per output at a time (released even on kill -9).

    The file is removed on exit; a waiter that locked the removed file notices (inode changed) and
    retries, so two builds never both hold "the" lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, builds must not overlap
        yield
        return
    lock_path = out.parent / f".{out.name}.lock"
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, lock_path):
                break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise UserError(f"another 'segdist shards build' is writing {out} (lock {lock_path}); "
                                "wait for it to finish")
        os.close(fd)
        time.sleep(0.1)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _remove_stale(out: Path) -> list[str]:
    """Remove temp/old folders that a killed build left beside ``out`` (caller holds the lock)."""
    removed = []
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for stale in out.parent.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale.name)
    return removed


def _check_out(out: Path, discovery: Discovery, force: bool) -> None:
    sources = [discovery.root] + [Path(v) for k, v in discovery.extra.items() if k in ("images", "masks", "manifest")]
    resolved = out.resolve()
    for s in sources:
        s = s.resolve()
        if s == resolved or resolved in s.parents:
            raise UserError(f"--out {out} would replace the source data at {s}; choose another output folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_shard_folder(out) and not force:
        raise UserError(f"--out {out} is a non-empty folder that is not a shard folder; "
                        "pass --force to replace it, or choose another path")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_shard_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _scan_values(pmap, pairs: list[Pair], opts: Options, progress: bool, root: Path) -> list[tuple[int, ...]]:
    """Each readable mask's distinct raw values (unreadable masks are skipped later, not here)."""
    found = list(_progress(pmap(functools.partial(scan_mask, opts=opts), pairs), len(pairs), "scan masks", progress))
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
    import importlib
    import threading

    threading.Thread(target=importlib.import_module, args=(module,), daemon=True).start()


def _unknown_error(result: Result, labels: Labels, root: Path) -> UserError:
    shown = ", ".join(map(str, result.values[:12])) + (" ..." if len(result.values) > 12 else "")
    return UserError(f"mask {_display(Path(result.path), root)} has values {shown} outside the {labels.num_classes} "
                     f"declared classes (0..{labels.num_classes - 1}, 255 = void). Fix: pass --classes with every "
                     "class name, --void V for a void value, or --unknown-values ignore (store them as 255) "
                     "or skip (drop such samples)")


def build_shards(src=None, out=None, *, images=None, masks=None, mask_pattern=None, image_col=None,
                 mask_col=None, split_col=None, val_fraction: float = 0.2, split_seed: int = 42,
                 palette=None, classes=None, void: int | None = None, unknown_values: str = "error",
                 mask_threshold: int | None = None, channels: int = 3, reencode: str = "png",
                 jpeg_quality: int = 95, max_side: int = 0, samples_per_shard: int = 64,
                 shard_size_mb: float | None = None, on_error: str = "skip", workers: int | None = None,
                 force: bool = False, aspect_tolerance: float = 0.02, progress: bool = True) -> dict:
    """Build a shard folder at ``out`` from ``src`` (or ``images``/``masks``); return its manifest.

    Raises UserError for bad arguments, an unusable source, unknown mask values (default policy),
    ``on_error="fail"`` at the first problem file, or when no sample is usable.
    """
    builder = {k: v for k, v in locals().items() if k not in ("src", "out", "progress")}
    builder = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in builder.items()}
    _check_build_args(out, val_fraction, unknown_values, channels, reencode, jpeg_quality, max_side,
                      samples_per_shard, shard_size_mb, on_error, void, mask_threshold, aspect_tolerance)
    out = Path(out)
    workers = default_workers() if not workers or workers < 1 else workers
    names, palette_table, palette_names = _label_files(classes, palette)
    n_colours = len([1 for _, i in palette_table if i != IGNORE_INDEX])

    found = discover(src, images=images, masks=masks, mask_pattern=mask_pattern, image_col=image_col,
                     mask_col=mask_col, split_col=split_col)
    _check_out(out, found, force)
    if on_error == "fail" and found.skipped:
        first = found.skipped[0]
        raise UserError(f"{first['path']}: {first['reason']} (--on-error fail stops at the first problem)")
    if not found.pairs:
        raise UserError(f"no image/mask pairs found in {src or images}" + _reasons_hint(found.skipped))
    pairs, split_info = assign_splits(found.pairs, val_fraction, split_seed)

    opts = Options(channels=channels, reencode=reencode, jpeg_quality=jpeg_quality, max_side=max_side or 0,
                   void=void, threshold=mask_threshold, palette=palette_table, unknown=unknown_values,
                   aspect_tolerance=aspect_tolerance)
    if workers > 1:
        _import_in_background("webdataset")
    with _build_lock(out), _mapper(workers, len(pairs)) as pmap:
        stale = _remove_stale(out)
        needs_scan = names is None and not palette_table and mask_threshold is None
        values = _scan_values(pmap, pairs, opts, progress, found.root) if needs_scan else None
        labels = decide_labels(names, palette_names, n_colours, values, void, mask_threshold)
        opts = dataclasses.replace(opts, value_map=labels.value_map)
        with atomic_dir(out) as tmp:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; shards are usually shared
            manifest = _write_shards(tmp, pmap, pairs, opts, labels, found, samples_per_shard, shard_size_mb,
                                     on_error, progress)
            manifest.update(_manifest_header(src, found, builder, labels, split_info, channels, stale))
            manifest = _ordered_manifest(manifest)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # the folder rename is the atomic step
    return manifest


def _label_files(classes, palette) -> tuple[list[str] | None, tuple, list[str] | None]:
    """(class names, palette table, palette class names) from the --classes / --palette files."""
    names = read_class_names(classes) if classes else None
    table, palette_names = read_palette(palette) if palette else ((), None)
    if names and palette_names and names != palette_names:
        raise UserError("--classes and --palette name the classes differently; pass one of them")
    n_colours = len([1 for _, i in table if i != IGNORE_INDEX])
    if table and names and len(names) != n_colours:
        raise UserError(f"--palette has {n_colours} class colours but --classes has {len(names)} names")
    return names, table, palette_names


def _write_shards(tmp: Path, pmap, pairs: list[Pair], opts: Options, labels: Labels, found: Discovery,
                  samples_per_shard: int, shard_size_mb: float | None, on_error: str, progress: bool) -> dict:
    """Process ``pairs`` in workers and write them, split by split in key order; return manifest parts."""
    ordered = sorted(pairs, key=lambda p: (_split_rank(p.split), p.key))
    by_key = {p.key: p for p in pairs}
    maxsize = shard_size_mb * 1e6 if shard_size_mb else 3e9
    stats, skipped, sources = _Stats(), list(found.skipped), {}
    splits: dict[str, dict] = {}
    sink: _ShardSink | None = None
    current = None
    results = pmap(functools.partial(process_pair, opts=opts), ordered)
    try:
        for result in _progress(results, len(ordered), "build shards", progress):
            if result.status == "unknown":
                raise _unknown_error(result, labels, found.root)
            if result.status == "skip":
                shown = _display(Path(result.path), found.root) if result.path else by_key[result.key].src_image
                entry = {"path": shown, "reason": result.reason}
                if on_error == "fail":
                    raise UserError(f"{entry['path']}: {entry['reason']} (--on-error fail stops at the first problem)")
                skipped.append(entry)
                continue
            if result.split != current:
                if sink is not None:
                    splits[current]["shards"] = sink.close()
                current, sink = result.split, _ShardSink(tmp, result.split, samples_per_shard, maxsize)
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
        "segdist_version": __version__, "task": labels.task, "num_classes": labels.num_classes,
        "class_names": labels.class_names, "ignore_index": IGNORE_INDEX, "channels": channels,
        "label_rule": labels.rule, "split": split_info, "source": source, "builder": builder,
        "stale_removed": stale,
    }


_KEY_ORDER = ("format", "version", "created", "segdist_version", "task", "num_classes", "class_names",
              "ignore_index", "channels", "label_rule", "splits", "split", "counts", "class_frequencies",
              "image_size", "source", "builder")


def _ordered_manifest(m: dict) -> dict:
    return {**{k: m[k] for k in _KEY_ORDER if k in m}, **{k: v for k, v in m.items() if k not in _KEY_ORDER}}


def _check_build_args(out, val_fraction, unknown_values, channels, reencode, jpeg_quality, max_side,
                      samples_per_shard, shard_size_mb, on_error, void, mask_threshold, aspect_tolerance) -> None:
    checks = [
        (out is not None and str(out) != "", "--out DIR is required"),
        (0.0 <= val_fraction < 1.0, f"--val-fraction must be in [0, 1) (got {val_fraction})"),
        (unknown_values in ("error", "ignore", "skip"), "--unknown-values must be error, ignore or skip"),
        (channels in (1, 3), f"--channels must be 1 or 3 (got {channels})"),
        (reencode in ("png", "jpeg"), f"--reencode must be png or jpeg (got {reencode})"),
        (1 <= jpeg_quality <= 100, f"--jpeg-quality must be 1..100 (got {jpeg_quality})"),
        (not max_side or max_side >= 16, f"--max-side must be >= 16 pixels (got {max_side})"),
        (samples_per_shard >= 1, f"--samples-per-shard must be >= 1 (got {samples_per_shard})"),
        (shard_size_mb is None or shard_size_mb > 0, f"--shard-size-mb must be > 0 (got {shard_size_mb})"),
        (on_error in ("skip", "fail"), "--on-error must be skip or fail"),
        (void is None or 0 <= void <= 65535, f"--void must be a mask value 0..65535 (got {void})"),
        (mask_threshold is None or 0 <= mask_threshold < 65535, "--mask-threshold must be 0..65534"),
        (0.0 <= aspect_tolerance < 0.5, "--aspect-tolerance must be in [0, 0.5)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


# ============================================================================= reading manifests
def _is_url(base: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", base))


def _local(base) -> Path:
    base = str(base)
    if base.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(base).path))
    return Path(base)


def _folder_of(base) -> str | Path:
    """Shard folder (Path) or URL prefix (str, no trailing slash) for a folder/URL/manifest path."""
    base = str(base)
    if _is_url(base) and not base.startswith("file://"):
        base = base.rstrip("/")
        return base.rsplit("/", 1)[0] if base.endswith("/" + MANIFEST) else base
    path = _local(base)
    return path.parent if path.name == MANIFEST and path.is_file() else path


def read_manifest(base) -> dict:
    """Load and check ``manifest.json`` of a shard folder, a manifest path or an http(s) URL prefix."""
    folder = _folder_of(base)
    if isinstance(folder, str):
        if not folder.startswith(("http://", "https://")):
            raise UserError(f"unsupported shard URL {base}: use a local folder or an http(s):// URL")
        url = f"{folder}/{MANIFEST}"
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                text = r.read().decode("utf-8")
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise UserError(f"cannot fetch {url}: {getattr(e, 'reason', e)}")
    else:
        path = folder / MANIFEST
        if not path.is_file():
            raise UserError(f"{folder} has no {MANIFEST}: build it with `segdist shards build SRC --out {folder}`")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read {path}: {e}")
    return _check_manifest(text, base)


def _check_manifest(text: str, base) -> dict:
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{base}: {MANIFEST} is not valid JSON ({e.msg})")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{base}: {MANIFEST} is not a segdist shard manifest (format != {FORMAT!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise UserError(f"{base}: shard format version {version} is newer than this segdist reads ({VERSION}); "
                        "upgrade segdist or rebuild the shards")
    if not isinstance(manifest.get("splits"), dict):
        raise UserError(f"{base}: {MANIFEST} has no 'splits'")
    return manifest


def _split_shards(base, split: str, manifest: dict | None) -> list[dict]:
    manifest = manifest or read_manifest(base)
    if split not in manifest["splits"]:
        raise UserError(f"split '{split}' is not in {base} (it has: {', '.join(manifest['splits']) or 'none'})")
    return manifest["splits"][split].get("shards", [])


def shard_urls(base, split: str, manifest: dict | None = None) -> list[str]:
    """Paths (local base) or URLs (http(s) base) of ``split``'s shards, in manifest order."""
    folder = _folder_of(base)
    shards = _split_shards(base, split, manifest)
    if isinstance(folder, str):
        return [f"{folder}/{s['name']}" for s in shards]
    return [str(folder / s["name"]) for s in shards]


def shard_sizes(base, split: str, manifest: dict | None = None) -> list[int]:
    """Number of samples in each of ``split``'s shards, in the same order as :func:`shard_urls`."""
    return [int(s["samples"]) for s in _split_shards(base, split, manifest)]


# ============================================================================= verify
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
        samples = _tar_samples(data)
        for key, files in samples:
            keys.append(key)
            problems += [f"{name}: sample {key}: {p}" for p in _check_sample(files, num_classes, channels, hist)]
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        problems.append(f"{name}: unreadable tar after {len(keys)} samples ({e})")
    if len(keys) != record.get("samples"):
        problems.append(f"{name}: {len(keys)} samples, manifest says {record.get('samples')}")
    return problems, keys, hist


def _tar_samples(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """Group tar members into samples like WebDataset: key = name up to the first dot."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            f = tf.extractfile(member)
            payload = f.read() if f else b""
            if len(payload) != member.size:
                raise tarfile.ReadError(f"member {member.name} is truncated")
            if samples and samples[-1][0] == key:
                samples[-1][1][ext] = payload
            else:
                samples.append((key, {ext: payload}))
    return samples


def _check_sample(files: dict[str, bytes], num_classes: int, channels: int, hist: np.ndarray) -> list[str]:
    image_exts = [e for e in files if e in ("image.jpg", "image.png")]
    if len(image_exts) != 1 or "mask.png" not in files or len(files) != 2:
        return [f"expected image.jpg|image.png + mask.png, found {sorted(files)}"]
    try:
        image = Image.open(io.BytesIO(files[image_exts[0]]))
        image.load()
        mask = Image.open(io.BytesIO(files["mask.png"]))
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
    if _is_url(str(folder)) and not str(folder).startswith("file://"):
        raise UserError(f"verify needs a local shard folder, not {folder}: download it first")
    folder = _local(folder)
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
    with _mapper(workers, len(tasks)) as pmap:
        for task, (found, keys, hist) in zip(tasks, _progress(pmap(_verify_shard, tasks), len(tasks),
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


# ============================================================================= info / summaries
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


def _problem_lines(entries: list[dict], title: str, limit: int = 20) -> list[str]:
    if not entries:
        return []
    by_reason = Counter(e["reason"].split(" (")[0].split(":")[0] for e in entries)
    lines = [f"{title} {len(entries)}: " + "; ".join(f"{r} x{n}" for r, n in by_reason.most_common())]
    lines += [f"  {e['path']}: {e['reason']}" for e in entries[:limit]]
    if len(entries) > limit:
        lines.append(f"  ... {len(entries) - limit} more in {MANIFEST}")
    return lines


# ============================================================================= CLI
def add_cli(sub) -> None:
    """Register ``segdist shards build|verify|info`` on an argparse sub-parsers object."""
    p = sub.add_parser("shards", help="build, verify and describe WebDataset shard folders")
    ssub = p.add_subparsers(dest="shards_command", required=True)
    _build_parser(ssub)
    v = ssub.add_parser("verify", help="re-hash and decode every shard; exit 1 on any problem")
    v.add_argument("dir", help="shard folder (holds manifest.json)")
    v.add_argument("--workers", metavar="N", type=int, default=0, help="processes (default: CPU count)")
    v.set_defaults(func=_cmd_verify)
    i = ssub.add_parser("info", help="print a shard folder's manifest summary")
    i.add_argument("dir", help="shard folder or http(s) URL prefix")
    i.add_argument("--json", action="store_true", help="print the whole manifest.json")
    i.set_defaults(func=_cmd_info)


def _build_parser(ssub) -> None:
    b = ssub.add_parser("build", help="build shards from image/mask folders or a CSV/JSONL manifest",
                        description="Build {split}-NNNNNN.tar shards + manifest.json (see docs/shards.md).")
    b.add_argument("src", nargs="?", help="folder (images/+masks/, train/+val/, or one CSV) or a CSV/JSONL file")
    b.add_argument("--out", metavar="DIR", required=True, help="output shard folder (replaced atomically if it is one)")
    g = b.add_argument_group("source")
    g.add_argument("--images", metavar="DIR", help="images folder (with --masks, instead of SRC)")
    g.add_argument("--masks", metavar="DIR", help="masks folder")
    g.add_argument("--mask-pattern", metavar="PATTERN", help="mask file name for an image stem, e.g. '{stem}_mask.png'")
    g.add_argument("--image-col", metavar="NAME", help="manifest column of image paths (default: images/image)")
    g.add_argument("--mask-col", metavar="NAME", help="manifest column of mask paths (default: masks/mask)")
    g.add_argument("--split-col", metavar="NAME", help="manifest column of split names (default: 'split' if present)")
    g = b.add_argument_group("split")
    g.add_argument("--val-fraction", metavar="F", type=float, default=0.2, help="share of samples in val (default 0.2)")
    g.add_argument("--split-seed", metavar="N", type=int, default=42, help="seed of the hash split (default 42)")
    g = b.add_argument_group("labels")
    g.add_argument("--classes", metavar="FILE", help="JSON class names: a list or {\"classes\": [...]}")
    g.add_argument("--palette", metavar="FILE",
                   help="JSON colour table for RGB masks: [[r,g,b], ...] or {\"colors\": ...}")
    g.add_argument("--void", metavar="V", type=int, help="mask value to store as 255 (ignored by losses/metrics)")
    g.add_argument("--mask-threshold", metavar="T", type=int,
                   help="binarise masks: value > T -> 1 (e.g. 127 for JPEG masks)")
    g.add_argument("--unknown-values", choices=("error", "ignore", "skip"), default="error",
                   help="mask values outside the classes: stop (default), store as 255, or skip the sample")
    g = b.add_argument_group("images")
    g.add_argument("--channels", type=int, choices=(1, 3), default=3, help="3 = RGB (default), 1 = gray")
    g.add_argument("--max-side", metavar="N", type=int, default=0, help="downscale so the longer side is <= N pixels")
    g.add_argument("--reencode", choices=("png", "jpeg"), default="png",
                   help="format for images that must change (default png, lossless)")
    g.add_argument("--jpeg-quality", metavar="Q", type=int, default=95, help="quality for --reencode jpeg (default 95)")
    g.add_argument("--aspect-tolerance", metavar="F", type=float, default=0.02,
                   help="masks within this aspect-ratio difference are resized to the image (default 0.02)")
    g = b.add_argument_group("output")
    g.add_argument("--samples-per-shard", metavar="N", type=int, default=64, help="max samples per shard (default 64)")
    g.add_argument("--shard-size-mb", metavar="MB", type=float, help="also start a new shard past this size (MB)")
    g.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="bad files: skip and list them (default) or stop at the first")
    g.add_argument("--workers", metavar="N", type=int, default=0, help="processes (default: CPU count)")
    g.add_argument("--force", action="store_true", help="replace --out even if it is not a shard folder")
    b.set_defaults(func=_cmd_build)


def _cmd_build(args) -> int:
    t0 = time.perf_counter()
    manifest = build_shards(
        args.src, args.out, images=args.images, masks=args.masks, mask_pattern=args.mask_pattern,
        image_col=args.image_col, mask_col=args.mask_col, split_col=args.split_col,
        val_fraction=args.val_fraction, split_seed=args.split_seed, palette=args.palette, classes=args.classes,
        void=args.void, unknown_values=args.unknown_values, mask_threshold=args.mask_threshold,
        channels=args.channels, reencode=args.reencode, jpeg_quality=args.jpeg_quality, max_side=args.max_side,
        samples_per_shard=args.samples_per_shard, shard_size_mb=args.shard_size_mb, on_error=args.on_error,
        workers=args.workers, force=args.force, aspect_tolerance=args.aspect_tolerance)
    seconds = time.perf_counter() - t0
    n = manifest["counts"]["samples"]
    splits = ", ".join(f"{s} {i['samples']} ({len(i['shards'])} shards)" for s, i in manifest["splits"].items())
    print(f"built {n} samples -> {args.out}: {splits}; {manifest['task']}, {manifest['num_classes']} classes; "
          f"{seconds:.1f} s, {n / max(seconds, 1e-9):.1f} samples/s")
    c = manifest["counts"]
    print(f"resized masks {c['resized']}, re-encoded images {c['reencoded']}, skipped {c['skipped']}, "
          f"ignored {c['ignored']}")
    for line in _problem_lines(manifest["skipped"], "skipped") + _problem_lines(manifest["ignored"], "ignored"):
        print(line)
    return 0


def _cmd_verify(args) -> int:
    problems = verify_shards(args.dir, workers=args.workers)
    manifest = read_manifest(args.dir)
    n = sum(s["samples"] for s in manifest["splits"].values())
    if problems:
        print(f"verify FAILED for {args.dir}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  {p}")
        return 1
    shards = sum(len(s.get("shards", [])) for s in manifest["splits"].values())
    print(f"verify OK: {args.dir}: {shards} shards, {n} samples, hashes, sizes and mask values match")
    return 0


def _cmd_info(args) -> int:
    manifest = read_manifest(args.dir)
    if args.json:
        print(json.dumps(manifest, indent=1))
    else:
        print(f"{args.dir} (built {manifest.get('created', '?')} by segdist {manifest.get('segdist_version', '?')})")
        print(summarize(manifest))
    return 0
