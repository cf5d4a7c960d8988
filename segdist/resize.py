"""The one resize rule of images, on the CPU and on the device, and the geometry of ``data.resize``.

The rule (:func:`interpolation`): an image at least twice the target size on both axes is
area-averaged (each output pixel is the mean of the source pixels it covers, partial pixels
weighted by their overlap: OpenCV's ``INTER_AREA``); anything else is bilinear with half-pixel
centres and edge pixels repeated (OpenCV's ``INTER_LINEAR``, PyTorch's ``align_corners=False``).
Area only where aliasing would show; below 2x bilinear is 3x cheaper and what the classic loader
uses too. Masks are resized nearest (class ids stay ids).

* :func:`resize_to`: uint8 (h, w[, C]) numpy -> (H, W[, C]) with OpenCV: training, validation,
  ``segdist predict``/``eval``, export checks.
* :func:`resize_batch`: uint8 (3, h, w) tensors of any sizes on any device -> one uint8
  (B, 3, H, W) batch, by two batched matrix products whose weights are the rule's own
  (:func:`resize_weights`): the device decode path (``data.decode=device``). Equal to
  :func:`resize_to` within :data:`DEVICE_TOLERANCE` (OpenCV rounds its fixed-point bilinear
  weights; ``tests/test_resize.py`` checks it on real photos).
* :data:`RULE_TEXT`: the rule in words, for the model card.
"""

from __future__ import annotations

import contextlib
import functools
import math

import cv2
import numpy as np
import torch

__all__ = ["DEVICE_TOLERANCE", "RULE_TEXT", "as_hw", "interpolation", "resize_batch", "resize_to", "resize_weights",
           "scaled_size"]

DEVICE_TOLERANCE = 1
"""Largest |difference| (uint8 levels) between :func:`resize_batch` and :func:`resize_to` on the same pixels."""

RULE_TEXT = ("if the image is at least twice the target size on both axes, area averaging (OpenCV "
             "`cv2.INTER_AREA`); otherwise bilinear with half-pixel centres (`cv2.INTER_LINEAR`)")


def as_hw(size) -> tuple[int, int]:
    """``data.image_size`` (S or [H, W]) as (H, W)."""
    if isinstance(size, (list, tuple)):
        h, w = size
        return int(h), int(w)
    return int(size), int(size)


def interpolation(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> str:
    """``"area"`` when ``src_hw`` is at least twice ``dst_hw`` on both axes, else ``"linear"``: the rule."""
    return "area" if src_hw[0] >= 2 * dst_hw[0] and src_hw[1] >= 2 * dst_hw[1] else "linear"


_CV2 = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


def resize_to(img: np.ndarray, hw: tuple[int, int], out: np.ndarray | None = None,
              nearest: bool = False) -> np.ndarray:
    """uint8 (h, w[, C]) -> (H, W[, C]) by the rule, written straight into ``out`` (a batch row) when given.

    ``nearest`` for masks: class ids stay ids.
    """
    h, w = hw
    if img.shape[:2] == (h, w) and out is None:
        return img
    interp = _CV2["nearest" if nearest else interpolation(img.shape[:2], hw)]
    r = cv2.resize(img, (w, h), dst=out, interpolation=interp)
    if out is not None and r.ctypes.data != out.ctypes.data:  # OpenCV allocated instead (``out`` not contiguous)
        out[...] = r
        return out
    return r


@functools.lru_cache(maxsize=256)
def resize_weights(n_in: int, n_out: int, kind: str) -> torch.Tensor:
    """float32 (n_out, n_in): row i holds the weights of the source pixels that make output pixel i along one
    axis, as OpenCV computes them (``kind`` ``"area"``: overlap / cell width; ``"linear"``: the two
    neighbours of the half-pixel-centred source position, clamped at the edges)."""
    w = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        if kind == "area":  # OpenCV's computeResizeAreaTab
            f1, f2 = i * scale, (i + 1) * scale
            cell = min(scale, n_in - f1)
            s2 = min(math.floor(f2), n_in - 1)
            s1 = min(math.ceil(f1), s2)
            if s1 - f1 > 1e-3:
                w[i, s1 - 1] += (s1 - f1) / cell
            w[i, s1:s2] += 1.0 / cell
            if f2 - s2 > 1e-3:
                w[i, s2] += min(f2 - s2, 1.0, cell) / cell
        else:
            src = max((i + 0.5) * scale - 0.5, 0.0)
            x0 = min(int(src), n_in - 1)
            x1 = min(x0 + 1, n_in - 1)
            frac = src - x0 if x0 < n_in - 1 else 0.0
            w[i, x0] += 1.0 - frac
            w[i, x1] += frac
    return torch.from_numpy(w.astype(np.float32))


def resize_batch(images: list[torch.Tensor], hw: tuple[int, int]) -> torch.Tensor:
    """uint8 (C, h_i, w_i) images (any sizes, one device) -> uint8 (B, C, H, W) by the rule, in one batch.

    Each image gets its own row and column weight matrices (:func:`resize_weights`, zero over the
    padding that brings every image to the largest size), so the whole batch is two batched matrix
    products on the device, whatever the mix of sizes: ``out_b = Wy_b @ x_b @ Wx_b^T``.
    """
    (H, W), device = hw, images[0].device
    hmax, wmax = max(t.shape[1] for t in images), max(t.shape[2] for t in images)
    x = images[0].new_zeros((len(images), images[0].shape[0], hmax, wmax), dtype=torch.float32)
    wy = torch.zeros(len(images), H, hmax)
    wx = torch.zeros(len(images), W, wmax)
    for b, t in enumerate(images):
        h, w = t.shape[1:]
        x[b, :, :h, :w] = t
        kind = interpolation((h, w), hw)
        wy[b, :, :h], wx[b, :, :w] = resize_weights(h, H, kind), resize_weights(w, W, kind)
    wy, wx = wy.to(device, non_blocking=True), wx.to(device, non_blocking=True)
    with _full_precision():  # TF32 would round the pixels and weights to 10 bits
        out = wy[:, None] @ (x @ wx.transpose(1, 2)[:, None])
    return out.round_().clamp_(0, 255).to(torch.uint8)


@contextlib.contextmanager
def _full_precision():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def scaled_size(mode: str, h: int, w: int, image_hw: tuple[int, int], short_side: int = 0,
                scale: float = 1.0) -> tuple[int, int]:
    """The (H', W') an (h, w) image is resized to before any crop or pad, in ``data.resize`` ``mode``.

    ``squash``: ``image_hw``. ``short_side``: the short side becomes ``short_side`` (0: the short
    side of ``image_hw``) times ``scale``. ``none``: native times ``scale``. ``scale`` is the
    random resize of training (1 in validation and inference).
    """
    if mode == "squash":
        return image_hw
    f = scale * ((short_side or min(image_hw)) / min(h, w) if mode == "short_side" else 1.0)
    return max(1, round(h * f)), max(1, round(w * f))
