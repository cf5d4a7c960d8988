"""Where the network looks: the passes (views) over an image and their windows. Pure: no model, no pixels.

``resize`` mode: one window per view, the resized image padded (bottom/right) to a multiple of
:data:`segdist.config.STRIDE`. ``sliding`` mode: windows of the training size, stride = window x (1 -
overlap) (MMSegmentation's convention), the last window aligned to the far edge, an image
smaller than a window padded; :func:`blend_weights` weighs the overlapping windows' logits. A window
count that would compute each pixel more than :data:`MAX_COVERAGE` times is refused before it is planned.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from ..config import STRIDE
from ..errors import UserError
from ..resize import scaled_size
from .options import Options


@dataclass(frozen=True)
class View:
    """One pass over an image: the (h, w) it is resized to, flipped or not, and the windows the
    network sees (top-left corners in the image padded bottom/right to ``padded``)."""

    size: tuple[int, int]
    flip: bool
    padded: tuple[int, int]
    window: tuple[int, int]
    origins: tuple[tuple[int, int], ...]


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Window offsets along one axis (``length >= window``): stride ``window * (1 - overlap)``,
    the last window aligned to the end (no window hangs over the image)."""
    stride = max(1, round(window * (1 - overlap)))
    n = -(-(length - window) // stride) + 1
    return [min(i * stride, length - window) for i in range(n)]


MAX_COVERAGE = 64
"""Sliding windows may compute each pixel of an image at most this many times on average (overlap 0.875 at the
most): at --overlap 0.99 a 10000x200 image would need 1.4 million windows at stride 1 and run for hours."""


def check_coverage(hw: tuple[int, int], padded: tuple[int, int], window: tuple[int, int], n: int,
                   overlap: float) -> None:
    """UserError when ``n`` windows over an image padded to ``padded`` exceed :data:`MAX_COVERAGE`."""
    coverage = n * window[0] * window[1] / (padded[0] * padded[1])
    if n > 1 and coverage > MAX_COVERAGE:
        stride = max(1, round(window[0] * (1 - overlap)))
        at_half = len(window_starts(padded[0], window[0], 0.5)) * len(window_starts(padded[1], window[1], 0.5))
        raise UserError(f"sliding windows over a {hw[0]}x{hw[1]} image at --overlap {overlap:g} (stride {stride} px) "
                        f"would be {n} windows of {window[0]}x{window[1]}, computing each pixel {coverage:.0f} times "
                        f"(at most {MAX_COVERAGE}); lower --overlap (0.5: {at_half} windows) or use --mode resize")


def view_size(opts: Options, hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """The (h, w) an image of original size ``hw`` is resized to in a pass at ``scale``."""
    if opts.resize == "squash":
        base = opts.image_hw if opts.mode == "resize" else hw  # sliding windows the native image
        return scaled_size("none", *base, opts.image_hw, scale=scale)
    return scaled_size(opts.resize, *hw, opts.image_hw, opts.short_side, scale)


def plan_views(opts: Options, hw: tuple[int, int]) -> list[View]:
    """The passes over an image of size ``hw``: one per TTA scale, and each also flipped with TTA flip."""
    views = []
    for scale in opts.scales:
        size = view_size(opts, hw, scale)
        if opts.mode == "resize":
            padded = (-(-size[0] // STRIDE) * STRIDE, -(-size[1] // STRIDE) * STRIDE)
            window, origins = padded, ((0, 0),)
        else:
            window = opts.image_hw
            padded = (max(size[0], window[0]), max(size[1], window[1]))
            rows = window_starts(padded[0], window[0], opts.overlap)
            cols = window_starts(padded[1], window[1], opts.overlap)
            check_coverage(hw, padded, window, len(rows) * len(cols), opts.overlap)  # before the windows exist
            origins = tuple(itertools.product(rows, cols))
        views += [View(size, flip, padded, window, origins) for flip in ((False, True) if opts.flip else (False,))]
    return views


@functools.lru_cache(maxsize=16)
def blend_weights(window: tuple[int, int], kind: str) -> torch.Tensor:
    """float32 (h, w) weights of one window's pixels, all > 0 (so every pixel's sum is too):
    ``gaussian`` (sigma = 1/8 of the window, nnU-Net's choice), ``linear`` (a tent falling off
    towards the edges) or ``mean`` (uniform: MMSegmentation's average)."""
    def axis(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float64)
        if kind == "gaussian":
            return torch.exp(-0.5 * ((i + 0.5 - n / 2) / (n / 8)) ** 2)
        if kind == "linear":
            return torch.minimum(i + 1, n - i)
        return torch.ones(n, dtype=torch.float64)

    w = torch.outer(axis(window[0]), axis(window[1]))
    return (w / w.max()).clamp_min(1e-6).float()
