"""What ``segdist predict`` writes: mask PNGs (binary 0/255, class ids, palette PNGs) and probability files."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..checkpoint import ModelMeta
from ..shards import read_class_names, read_palette
from ..shards.classes import ClassTable, same_classes


def palette_table(colours, void=None) -> np.ndarray:
    """Class colours ``[[r, g, b], ...]`` (and a void colour) -> uint8 (256, 3), index 255 = void."""
    pal = np.zeros((256, 3), np.uint8)
    for i, c in enumerate(colours[:255]):
        pal[i] = c
    if void is not None:
        pal[255] = void
    return pal


def check_class_list(model: ClassTable, classes: str | Path | None) -> None:
    """``predict --classes FILE`` must name the model's classes, in its order: the masks are written as the
    model's class ids, so a list of other classes means the user expects other masks than they will get."""
    if classes:
        names = tuple(read_class_names(classes))
        same_classes(model, ClassTable(model.task, names, model.ignore_index), "the model", f"--classes {classes}",
                     "pass the list of the model's classes, or leave --classes out")


def model_palette(meta: ModelMeta, palette_file: str | Path | None = None) -> np.ndarray | None:
    """The PNG palette of a multi-class model's masks: ``--palette FILE`` (the ``segdist shards
    build --palette`` format), else ``meta.palette`` (``[[r, g, b], ...]`` in class order or
    ``{"colors": [...], "void": [r, g, b]}``); None: plain 8-bit index PNGs."""
    if palette_file:
        table, _ = read_palette(palette_file)
        pal = np.zeros((256, 3), np.uint8)
        for packed, i in table:
            pal[i] = ((packed >> 16) & 255, (packed >> 8) & 255, packed & 255)
        return pal
    spec = meta.palette
    if not spec:
        return None
    if isinstance(spec, dict):
        return palette_table(spec.get("colors", spec.get("colours", [])), spec.get("void"))
    return palette_table(spec)


def png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def mask_png(pred: np.ndarray, binary: bool, palette: np.ndarray | None) -> bytes:
    """uint8 (H, W) class ids -> PNG bytes: binary 0/255; multi-class ids, as a palette PNG with ``palette``."""
    if binary:
        return png(pred * 255)
    if palette is None:
        return png(pred)
    im = Image.fromarray(pred)
    im.putpalette(palette.tobytes())  # an "L" image with a palette becomes "P": the pixels stay class ids
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def prob_files(name: str, probs: np.ndarray, fmt: str) -> dict[str, bytes]:
    """float32 (C, H, W) probabilities -> {relative path: bytes}: ``npy``: ``<stem>.npy`` float16
    (C, H, W); ``png16``: 16-bit PNGs (p x 65535): ``<stem>.png`` (binary: the foreground) or
    ``<stem>/<class>.png`` per class."""
    stem = name[:-len(".png")]
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, probs.astype(np.float16))
        return {f"{stem}.npy": buf.getvalue()}
    q = np.round(probs * 65535).astype(np.uint16)
    if len(q) == 1:
        return {f"{stem}.png": png(q[0])}
    width = len(str(len(q) - 1))
    return {f"{stem}/{k:0{width}d}.png": png(c) for k, c in enumerate(q)}
