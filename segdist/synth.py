"""A deterministic synthetic segmentation dataset written as real image/mask files.

``make_synthetic(out)`` writes ``out/images/{i:04d}.jpg`` (RGB JPEG, quality 92) and
``out/masks/{i:04d}.png`` (8-bit single-channel PNG of class indices), the same layout a user's
own data has, so the demo runs the real ``segdist shards build`` path on it.

What a model has to learn: 1-4 shapes (ellipses, polygons) cover ~15-40 % of each image. Their
colours come from the same distribution as the background's, so no colour threshold separates
them; what does is texture -- objects carry stripes, checks or fine grain, the background is a
smooth gradient with soft blobs -- plus the shapes' edges. Every image also gets sensor-like noise
and one object in four has a weak texture, so the task is not trivial. With ``classes=K > 1``
each shape gets a class 1..K-1 that sets its texture family and frequency, so classes are
learnable from appearance too.

Each image is drawn from its own generator seeded by ``(seed, i)``: the first k images are the
same for any ``n``, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from .atomic import atomic_dir, check_out_dir, shared_mode_dir
from .errors import UserError

JPEG_QUALITY = 92
_MAX_CLASSES = 255  # 8-bit index masks, 255 is the void value


def make_synthetic(out: str | os.PathLike, n: int = 240, size: int = 256, classes: int = 1,
                   seed: int = 0) -> None:
    """Write ``n`` image/mask pairs of ``size`` x ``size`` pixels to ``out`` (atomically).

    ``classes=1``: binary masks with values {0, 1}. ``classes=K > 1``: index masks with values
    0..K-1 (0 = background, K counts the background). An existing ``out`` is replaced only when it
    is an earlier synthetic dataset (it holds ``synth.json``) or an empty folder.
    """
    _check_args(out, n, size, classes, seed)
    out = Path(out)
    with atomic_dir(out) as tmp:
        shared_mode_dir(tmp)  # a dataset is meant to be shared
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for i in range(n):
            image, mask = make_sample(i, size=size, classes=classes, seed=seed)
            _write_png_or_jpeg(tmp / "images" / f"{i:04d}.jpg", image[:, :, ::-1])  # RGB -> BGR for cv2
            _write_png_or_jpeg(tmp / "masks" / f"{i:04d}.png", mask)
        meta = {"generator": "segdist.synth", "n": n, "size": size, "classes": classes, "seed": seed}
        (tmp / "synth.json").write_text(json.dumps(meta, indent=1) + "\n")


def make_sample(i: int, size: int = 256, classes: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw sample ``i``: image ``(size, size, 3) uint8`` RGB and mask ``(size, size) uint8``.

    Mask values are {0, 1} for ``classes=1`` and 0..classes-1 otherwise.
    """
    rng = np.random.default_rng([seed, i])
    image = _background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    target_area = rng.uniform(0.15, 0.40) * size * size
    n_shapes = int(rng.integers(1, 5))
    areas = rng.dirichlet(np.full(n_shapes, 2.0)) * target_area
    for area in areas:
        label = 1 if classes <= 2 else int(rng.integers(1, classes))
        shape = _shape_mask(rng, size, max(area, 0.02 * size * size))
        image = _paint_object(rng, image, shape, label)
        mask[shape] = label
    noise = rng.normal(0.0, rng.uniform(3.0, 9.0), image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image, mask


# ----------------------------------------------------------------------------- drawing
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth two-colour gradient plus soft low-frequency blobs, ``(size, size, 3) float32``."""
    c0, c1 = _colour(rng), _colour(rng)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    image = (1 - t) * c0 + t * c1
    # Blobs: coarse noise upsampled smoothly, so the background has structure but no fine texture.
    coarse = rng.normal(0.0, 1.0, (6, 6, 3)).astype(np.float32)
    blobs = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return image + blobs * rng.uniform(10.0, 30.0)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(30.0, 225.0, 3).astype(np.float32)


def _shape_mask(rng: np.random.Generator, size: int, area: float) -> np.ndarray:
    """A filled ellipse or polygon of about ``area`` pixels, as a ``(size, size) bool`` array."""
    aspect = rng.uniform(0.5, 2.0)
    a = np.sqrt(area / np.pi * aspect)  # semi-axes with pi*a*b == area
    b = area / (np.pi * a)
    centre = rng.uniform(0.2, 0.8, 2) * size
    angle = rng.uniform(0, 180)
    k = 0 if rng.random() < 0.5 else int(rng.integers(3, 9))  # 0 = ellipse
    # Polygon corners evenly spaced with jitter: no slivers, area close to the ellipse's.
    theta = (np.arange(max(k, 1)) + rng.uniform(-0.3, 0.3, max(k, 1))) * 2 * np.pi / max(k, 1)
    radius = rng.uniform(0.85, 1.15, max(k, 1))
    shape = _draw_shape(size, centre, a, b, angle, k, theta, radius)
    drawn = max(int(shape.sum()), 1)
    if drawn < 0.8 * area:  # polygons cover less than their ellipse: grow once to the target
        scale = min(np.sqrt(area / drawn), 2.0)
        shape = _draw_shape(size, centre, a * scale, b * scale, angle, k, theta, radius)
    return shape


def _draw_shape(size, centre, a, b, angle, k, theta, radius) -> np.ndarray:
    canvas = np.zeros((size, size), np.uint8)
    cx, cy = centre
    if k == 0:
        cv2.ellipse(canvas, (int(cx), int(cy)), (max(int(a), 2), max(int(b), 2)), angle, 0, 360, 1, -1)
    else:
        rot = np.deg2rad(angle)
        px, py = a * radius * np.cos(theta), b * radius * np.sin(theta)
        pts = np.stack([cx + px * np.cos(rot) - py * np.sin(rot),
                        cy + px * np.sin(rot) + py * np.cos(rot)], axis=1)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)
    return canvas.astype(bool)


def _paint_object(rng: np.random.Generator, image: np.ndarray, shape: np.ndarray, label: int) -> np.ndarray:
    """Fill ``shape`` with a base colour modulated by the texture family of ``label``."""
    size = image.shape[0]
    texture = _TEXTURES[(label - 1) % len(_TEXTURES)]
    # Periods of 5-11 px at 256 px survive a 2x downscale (the demo trains at 128 px) without aliasing.
    period = rng.uniform(5.0, 11.0) * (1.0 + 0.5 * (((label - 1) // len(_TEXTURES)) % 3))
    pattern = texture(rng, size, period)  # (size, size) float32 in [-1, 1]
    strength = rng.uniform(12.0, 25.0) if rng.random() < 0.25 else rng.uniform(30.0, 60.0)
    fill = _colour(rng) + pattern[..., None] * strength * rng.uniform(0.6, 1.0, 3).astype(np.float32)
    out = image.copy()
    out[shape] = fill[shape]
    return out


def _stripes(rng: np.random.Generator, size: int, period: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    return np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period).astype(np.float32)


def _checks(rng: np.random.Generator, size: int, period: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return (np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period) * 1.6).clip(-1, 1)


def _grain(rng: np.random.Generator, size: int, period: float) -> np.ndarray:
    cells = max(int(size / period * 2), 2)
    noise = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return cv2.resize(noise, (size, size), interpolation=cv2.INTER_NEAREST)


_TEXTURES = (_stripes, _checks, _grain)


# ----------------------------------------------------------------------------- io + args
def _write_png_or_jpeg(path: Path, array: np.ndarray) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if path.suffix == ".jpg" else []
    ok, buf = cv2.imencode(path.suffix, np.ascontiguousarray(array), params)
    if not ok:  # pragma: no cover - cv2 only fails here on a broken build
        raise RuntimeError(f"cv2 could not encode {path.name}")
    path.write_bytes(buf.tobytes())


def _check_args(out, n: int, size: int, classes: int, seed: int = 0) -> None:
    if seed < 0:
        raise UserError(f"synth: --seed must be >= 0 (got {seed})")
    if n < 1:
        raise UserError(f"synth: --n must be >= 1 (got {n})")
    if size < 32:
        raise UserError(f"synth: --size must be >= 32 pixels (got {size})")
    if not 1 <= classes <= _MAX_CLASSES:
        raise UserError(f"synth: --classes must be 1 (binary) or 2..{_MAX_CLASSES} (got {classes})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"synth: {out} exists and is not a folder; pass another output path")
    if out.is_dir() and any(out.iterdir()) and not (out / "synth.json").is_file():
        raise UserError(f"synth: {out} is a non-empty folder that is not a synthetic dataset; "
                        "pass an empty or new folder (it would be replaced)")
    check_out_dir(out, "synth: the output")
