"""The label scheme of a build: class names and palettes from files, task and raw-value -> stored-value map.

Stored masks are 8-bit class indices with 255 = void (:data:`segdist.IGNORE_INDEX`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .reader import IGNORE_INDEX
from ..errors import UserError


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
    if void is not None and not isinstance(void, list):
        raise UserError(f"--palette {path}: 'void' is {json.dumps(void)}; it must be an [r, g, b] colour or a list of "
                        f"them (the void class index itself is always 255)")
    voids = [] if void is None else (void if void and isinstance(void[0], list) else [void])

    def packed(c) -> int:
        if not (isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)):
            raise UserError(f"--palette {path}: colour {json.dumps(c)} is not [r, g, b] with 0..255 values")
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


def label_files(classes, palette) -> tuple[list[str] | None, tuple, list[str] | None]:
    """(class names, palette table, palette class names) from the --classes / --palette files."""
    names = read_class_names(classes) if classes else None
    table, palette_names = read_palette(palette) if palette else ((), None)
    if names and palette_names and names != palette_names:
        raise UserError("--classes and --palette name the classes differently; pass one of them")
    n_colours = len([1 for _, i in table if i != IGNORE_INDEX])
    if table and names and len(names) != n_colours:
        raise UserError(f"--palette has {n_colours} class colours but --classes has {len(names)} names")
    return names, table, palette_names


@dataclass(frozen=True)
class Labels:
    task: str
    num_classes: int
    class_names: list
    value_map: tuple[tuple[int, int], ...]
    rule: str


_FULL_SCALE = (255, 65535)  # "all on" of 8- and 16-bit masks: foreground in binary masks, else void


def decide_labels(names: list[str] | None, palette_names: list[str] | None, palette_size: int,
                  scanned: list[dict[int, int]] | None, void: int | None, threshold: int | None) -> Labels:
    """Choose task, class count and the raw-value -> stored-value map.

    Binary when a class list has 2 names, with ``--mask-threshold``, or (no class list) when
    every mask holds only {0, 1} or only {0, 255} (16-bit: {0, 65535}): both read as 0/1. When
    some mask holds 0, 1 and 255 together, 255 is void (the VOC convention). Otherwise
    multiclass: values are class indices and 255 is void. ``scanned`` holds each mask's raw
    values with their pixel counts (None: not scanned because classes are declared). An inferred
    multiclass scheme the pixels contradict is refused (:func:`check_inferred`).
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
            check_inferred(scanned or [], k)  # (a --void value is not in the counts)
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


MAX_INFERRED_CLASSES = 64
"""Without a class list, masks whose values imply more classes than this are refused: so many classes are
named with ``--classes``, and more often the values are not class ids at all (anti-aliasing, scaling)."""


def check_inferred(scanned: list[dict[int, int]], k: int) -> None:
    """Refuse reading the masks as ``k`` class ids (255 = void) when their pixels say otherwise; one line naming
    the evidence and the fix. In order: 0/255 masks with anti-aliased edges (0 and the full-scale value hold
    >= 75 % of the pixels, the rest lie in between and read as > 64 classes), the void value covering most
    non-zero pixels, and more than :data:`MAX_INFERRED_CLASSES` classes."""
    counts: dict[int, int] = {}
    for mask in scanned:
        for v, n in mask.items():
            counts[v] = counts.get(v, 0) + n
    total = max(sum(counts.values()), 1)
    top = max((v for v in counts if v in _FULL_SCALE), default=None)  # 255 (or 65535 in 16-bit masks)
    full = counts.get(top, 0)
    between = [v for v in counts if v not in (0, top)]
    edge = sum(counts[v] for v in between)
    nonzero = max(total - counts.get(0, 0), 1)
    fix = "pass --mask-threshold 127 (binary: foreground where the value > 127) or --classes FILE if they are class ids"
    if full and counts.get(0) and (total - edge) / total >= 0.75 and k > MAX_INFERRED_CLASSES:
        raise UserError(f"the masks look like binary masks with anti-aliased edges: 0 and {top} hold "
                        f"{100 * (total - edge) / total:.1f} % of the pixels and {len(between)} values in between "
                        f"({min(between)}..{max(between)}) the other {100 * edge / total:.1f} %; read as class ids "
                        f"they would make a {k}-class set whose objects ({top}) are void; {fix}")
    if full > nonzero / 2:
        raise UserError(f"{top} would be void (multi-class masks, the VOC convention) but it covers "
                        f"{100 * full / nonzero:.0f} % of the non-zero pixels, so the objects would be ignored; if "
                        f"{top} marks the object, {fix}; if it is void, pass --void {top}")
    if k > MAX_INFERRED_CLASSES:
        raise UserError(f"the mask values go up to {k - 1}, which reads as {k} classes though only {len(counts)} "
                        f"distinct values occur; pass --classes FILE naming the classes (values are class ids), "
                        f"--void V for a void value, or --mask-threshold T for binary masks")


@functools.lru_cache(maxsize=8)
def value_lookup(value_map: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """(stored value per raw 16-bit value, known flag per raw value); unknown values store 255."""
    lut = np.full(65536, IGNORE_INDEX, np.uint8)
    known = np.zeros(65536, bool)
    for raw, out in value_map:
        lut[raw] = out
        known[raw] = True
    return lut, known
