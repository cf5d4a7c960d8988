"""Find the image/mask pairs of a source, give them keys and splits.

Layouts: a folder with ``images/`` + ``masks/`` (sub-folders allowed; ``images/train/..`` names the
split), pre-split ``train/`` + ``val/`` (+ ``test/``) folders each with ``images/`` + ``masks/`` or,
as SegNet's CamVid, beside a mask folder ``trainannot/`` (``train_labels/``, ``trainanno/``...), or a
CSV/TSV/JSON-lines manifest. Files that are not data (hidden, OS metadata, other extensions) are
``ignored``; problems (no mask, several matches) are ``skipped``, both with a reason.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
STRAY_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "__macosx"})
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
SPLIT_ORDER = ("train", "val", "test")
MAX_KEY_LEN = 64  # USTAR tar names are limited to 100 bytes: key + ".image.jpg" must fit


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


# ----------------------------------------------------------------------------- folders
def _is_stray(name: str) -> bool:
    return name.startswith(".") or name.lower() in STRAY_NAMES


def display_path(path: Path, root: Path) -> str:
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
                ignored.append({"path": display_path(here / d, root) + "/", "reason": "hidden or OS metadata folder"})
        dirnames[:] = sorted(d for d in dirnames if not _is_stray(d))
        for name in sorted(filenames):
            path = here / name
            if _is_stray(name):
                ignored.append({"path": display_path(path, root), "reason": "stray file (hidden or OS metadata)"})
            elif path.suffix.lower() not in IMAGE_EXTS:
                ignored.append({"path": display_path(path, root),
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
            wanted = display_path(masks / expected[rel], root)
            skipped.append({"path": display_path(path, root), "reason": f"no mask (expected {wanted})"})
    used = {m for _, _, m in matched}
    own_folder = mask_files is image_files  # there, only pattern-named files are masks at all
    skipped += [{"path": display_path(mask_files[m], root), "reason": "mask without image"}
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
            skipped += [{"path": display_path(image_files[rel], root), "reason": reason} for rel in rels]
        elif not candidates:
            wanted = display_path(masks / stem, root)
            skipped.append({"path": display_path(image_files[rels[0]], root),
                            "reason": f"no mask (expected {wanted}.png or another image extension)"})
        elif len(candidates) > 1:
            skipped.append({"path": display_path(image_files[rels[0]], root),
                            "reason": f"several masks match: {', '.join(candidates)}"})
        else:
            matched.append((stem, rels[0], candidates[0]))
    skipped += [{"path": display_path(mask_files[m], root), "reason": "mask without image"}
                for m in mask_files if m not in used]
    return matched, skipped


MASK_FOLDER_SUFFIXES = ("annot", "anno", "labels", "label", "masks", "mask", "gt")
"""Mask folder beside a split's image folder: ``train`` + ``trainannot`` (SegNet's CamVid), ``train_labels``..."""


def _split_folders(src: Path) -> dict[str, tuple[Path, Path]]:
    """``split -> (images, masks)`` for the ``train/``, ``val/``, ``test/`` (or alias) folders of ``src``:
    each holding ``images/`` + ``masks/``, or holding the images beside a mask folder such as ``trainannot/``."""
    children = {c.name.lower(): c for c in sorted(src.iterdir()) if c.is_dir()}
    found: dict[str, tuple[Path, Path]] = {}
    for child in children.values():
        split = SPLIT_ALIASES.get(child.name.lower())
        if not split:
            continue
        if (child / "images").is_dir() and (child / "masks").is_dir():
            folders = (child / "images", child / "masks")
        else:
            beside = [children[name] for suffix in MASK_FOLDER_SUFFIXES for sep in ("", "_", "-")
                      if (name := f"{child.name.lower()}{sep}{suffix}") in children]
            if len(beside) > 1:
                raise UserError(f"{src}: several mask folders for '{child.name}' "
                                f"({', '.join(b.name for b in beside)}); pass --images DIR --masks DIR")
            if not beside:
                continue
            folders = (child, beside[0])
        if split in found:
            raise UserError(f"{src} has two folders for split '{split}' ({found[split][0]}, {folders[0]})")
        found[split] = folders
    return found


def _discover_split_folders(src: Path, splits: dict[str, tuple[Path, Path]], pattern: str | None) -> Discovery:
    parts = [_discover_folders(images, masks, src, pattern, split=split)
             for split, (images, masks) in splits.items()]
    raw = [(f"{p.split}/{p.key}", Path(p.image), Path(p.mask), p.split) for d in parts for p in d.pairs]
    return Discovery("split-folders", src, _pairs_from_raw(raw, src),
                     [s for d in parts for s in d.skipped], [s for d in parts for s in d.ignored],
                     {"splits": {k: {"images": str(i), "masks": str(m)} for k, (i, m) in splits.items()}})


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
            shown = display_path(image, root) if image else f"{path.name}:{n}"
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
        return image, mask, f"mask file not found: {display_path(mask, root)}"
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
            ignored.append({"path": display_path(child, root), "reason": reason})
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
        pairs.append(Pair(key, str(image), str(mask), split, display_path(image, root), display_path(mask, root)))
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
                    "train/ + val/ folders each with images/ + masks/ (or beside trainannot/, valannot/), "
                    "or one CSV/JSONL manifest "
                    f"(found {len(manifests)}); or pass --images DIR --masks DIR")


# ----------------------------------------------------------------------------- splits
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


def split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)
