"""The :class:`Predictor`: images in, probabilities and masks at each image's original size out.

Each view's (see :mod:`.geometry`) pixels are decoded once and resized as training resizes
(reduced JPEG decode included), padded with black and cut into windows; the windows of a chunk
of images are batched on the device by shape. A view's window logits are blended (weights
normalised to sum to 1 at every pixel; a single window is used as it is, so sliding over an
image of one window's size *is* plain inference). Each view's logits are resized to the
original size (bilinear) and become probabilities there (sigmoid of a binary model's one
channel, else softmax); test-time augmentation averages the views' probabilities. The class is
the argmax, or for a binary model probability > ``threshold``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..augment import normalize
from ..checkpoint import read_meta
from ..decode import DecodeError, decode_rgb
from ..resize import resize_to
from ..errors import UserError
from ..models import load_model
from .geometry import View, blend_weights, plan_views
from .options import BATCH_SIZE, Options, options_for


@dataclass(frozen=True)
class Source:
    """One image to predict: encoded bytes (decoded as training decodes: reduced JPEG decode) or an
    RGB uint8 array (H, W, 3); its original (H, W); whether EXIF orientation applies to the bytes
    (user files: yes; shards: it was applied when they were built)."""

    data: bytes | np.ndarray
    hw: tuple[int, int]
    orient: bool = True


def view_pixels(src: Source, views: list[View], reduced: bool) -> dict[tuple[int, int], np.ndarray]:
    """uint8 (h, w, 3) RGB per view size, from one decode (reduced while it still covers the largest)."""
    sizes = {v.size for v in views}
    img = src.data
    if not isinstance(img, np.ndarray):
        img = decode_rgb(img, (max(h for h, _ in sizes), max(w for _, w in sizes)), reduced, src.orient)
    return {s: resize_to(img, s) for s in sizes}


def view_tiles(pixels: np.ndarray, view: View) -> list[torch.Tensor]:
    """A view's network inputs: uint8 (3, wh, ww) windows of the (flipped) image padded with black."""
    img = pixels[:, ::-1] if view.flip else pixels
    if view.padded != view.size:
        canvas = np.zeros((*view.padded, 3), np.uint8)
        canvas[:view.size[0], :view.size[1]] = img
        img = canvas
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    h, w = view.window
    return [t[:, y:y + h, x:x + w] for y, x in view.origins]


def read_image(path: Path) -> tuple[bytes, np.ndarray]:
    """A file's bytes and its full-size RGB uint8 (H, W, 3), EXIF orientation applied (DecodeError: why not)."""
    data = path.read_bytes()
    return data, decode_rgb(data, reduced=False, orient=True)


def network_input(data: bytes, meta: dict) -> torch.Tensor:
    """Encoded image bytes -> uint8 (3, h, w): the network input of ``resize`` mode; for a squash
    model exactly the pixels the training stream makes."""
    opts = options_for(meta)
    hw = opts.image_hw if opts.resize == "squash" else decode_rgb(data, reduced=False).shape[:2]  # squash: no need
    (view,) = plan_views(opts, hw)
    return view_tiles(view_pixels(Source(data, hw), [view], opts.reduced)[view.size], view)[0]


def as_source(image) -> Source:
    """A path, encoded bytes or a uint8 RGB array (H, W, 3) (gray (H, W) too) as a :class:`Source`."""
    if isinstance(image, (str, Path)):
        try:
            data, rgb = read_image(Path(image))
        except (OSError, DecodeError) as e:
            raise UserError(f"cannot read image '{image}': {getattr(e, 'reason', e)}") from None
        return Source(data, rgb.shape[:2])
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        try:
            return Source(data, decode_rgb(data, reduced=False, orient=True).shape[:2])
        except DecodeError as e:
            raise UserError(f"cannot decode the image bytes: {e.reason}") from None
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise UserError(f"expected a uint8 RGB array (H, W, 3); got {image.dtype} {image.shape}")
        return Source(np.ascontiguousarray(image), image.shape[:2])  # OpenCV refuses negative strides
    raise UserError(f"expected a path, encoded image bytes or a uint8 RGB array; got {type(image).__name__}")


class _Blend:
    """One view's logits, float32 (C, *padded), filled window by window as their batches come back."""

    def __init__(self, view: View, kind: str, device: torch.device):
        self.view, self.acc = view, None
        if len(view.origins) > 1:
            self.weights = blend_weights(view.window, kind).to(device)
            self.total = torch.zeros(view.padded, device=device)  # per pixel: the sum of its windows' weights
            for k in range(len(view.origins)):
                self.total[self.box(k)] += self.weights

    def box(self, k: int) -> tuple[slice, slice]:
        (y, x), (h, w) = self.view.origins[k], self.view.window
        return slice(y, y + h), slice(x, x + w)

    def add(self, k: int, logits: torch.Tensor) -> None:
        """Window ``k``'s logits (C, wh, ww)."""
        if len(self.view.origins) == 1:
            self.acc = logits  # one window is the prediction itself: no arithmetic, so exactly plain inference
            return
        if self.acc is None:
            self.acc = logits.new_zeros((logits.shape[0], *self.view.padded))
        box = self.box(k)
        self.acc[(slice(None), *box)] += logits * (self.weights / self.total[box])

    def logits(self) -> torch.Tensor:
        """float32 (C, h, w) over the view's image: padding cut off, flip undone."""
        out = self.acc[:, :self.view.size[0], :self.view.size[1]]
        return out.flip(-1) if self.view.flip else out


class Predictor:
    """A model and how to predict with it: images in; probabilities and masks at their original size out.

    ``predict(image)`` -> uint8 (H, W) class ids (binary: 0/1); ``predict_proba(image)`` -> float32
    (C, H, W) probabilities (C = 1 for a binary model: the foreground's). ``image``: a file path,
    encoded bytes or a uint8 RGB array (H, W, 3). :meth:`run` streams many images, batched.
    """

    def __init__(self, model: torch.nn.Module, meta: dict, opts: Options, device: torch.device | str = "cpu",
                 batch_size: int = BATCH_SIZE, autocast: Callable = contextlib.nullcontext):
        self.model, self.meta, self.opts = model.eval(), meta, opts
        self.device, self.batch_size, self.autocast = torch.device(device), max(1, int(batch_size)), autocast
        self.windows = None  # a progress bar (tqdm) counting windows planned (its total) and done, when set

    @classmethod
    def load(cls, ckpt: str | Path, device: str = "auto", mode: str | None = None, batch_size: int = BATCH_SIZE,
             **options) -> Predictor:
        """``options``: ``overlap``, ``blend``, ``tta`` (e.g. ``"flip,0.75,1.0,1.25"``), ``threshold``."""
        meta = read_meta(ckpt)
        opts = options_for(meta, mode or "resize", **options)
        dev = pick_device(device)
        return cls(load_model(ckpt).to(dev), meta, opts, dev, batch_size)

    @torch.no_grad()
    def run(self, items: Iterable[tuple[Source, Any]], per_image: bool = False) -> Iterator[tuple[Any, torch.Tensor]]:
        """``(source, payload)`` pairs -> ``(payload, probabilities float32 (C, H, W) on the device)``, in order.

        Windows of consecutive images are batched together until a batch is full; ``per_image``
        batches each image's windows alone, so an image's result never depends on its neighbours
        (evaluation: the same numbers on 1 and N processes).
        """
        chunk, n = [], 0
        for src, payload in items:
            views = plan_views(self.opts, src.hw)
            pixels = view_pixels(src, views, self.opts.reduced)
            chunk.append((payload, src.hw, views, [view_tiles(pixels[v.size], v) for v in views]))
            n += sum(len(v.origins) for v in views)
            if self.windows is not None:
                self.windows.total += sum(len(v.origins) for v in views)
                self.windows.refresh()
            if per_image or n >= self.batch_size:
                yield from self._run_chunk(chunk)
                chunk, n = [], 0
        yield from self._run_chunk(chunk)

    def _run_chunk(self, chunk: list) -> Iterator[tuple[Any, torch.Tensor]]:
        blends = [[_Blend(v, self.opts.blend, self.device) for v in views] for _, _, views, _ in chunk]
        by_shape: dict[tuple, list] = {}  # one batch holds one input shape
        for i, (*_, tiles) in enumerate(chunk):
            for j, view_tiles_ in enumerate(tiles):
                for k, t in enumerate(view_tiles_):
                    by_shape.setdefault(tuple(t.shape), []).append((blends[i][j], k, t))
        for group in by_shape.values():
            for b in range(0, len(group), self.batch_size):
                part = group[b:b + self.batch_size]
                for (blend, k, _), logits in zip(part, self.forward(torch.stack([t for *_, t in part]))):
                    blend.add(k, logits)
                if self.windows is not None:
                    self.windows.update(len(part))
        for (payload, hw, _, _), bl in zip(chunk, blends):
            yield payload, self.probabilities(bl, hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, h, w) on the host -> float32 logits (B, C, h, w) on the device."""
        x = normalize(x.to(self.device, non_blocking=True), self.meta.mean, self.meta.std)
        with self.autocast():
            return self.model(x).float()

    @staticmethod
    def probabilities(blends: list[_Blend], hw: tuple[int, int]) -> torch.Tensor:
        """Each view's logits resized (bilinear) to ``hw``, made probabilities there, averaged over views."""
        total = None
        for blend in blends:
            logits = blend.logits()
            if tuple(logits.shape[-2:]) != tuple(hw):
                logits = F.interpolate(logits[None], size=tuple(hw), mode="bilinear", align_corners=False)[0]
            p = torch.sigmoid(logits) if logits.shape[0] == 1 else logits.softmax(0)
            total = p if total is None else total + p
        return total / len(blends) if len(blends) > 1 else total

    def labels(self, probs: torch.Tensor) -> torch.Tensor:
        """Probabilities (C, H, W) -> uint8 class ids (H, W): binary ``p > threshold``, else argmax."""
        if probs.shape[0] == 1:
            return (probs[0] > self.opts.threshold).to(torch.uint8)
        return probs.argmax(0).to(torch.uint8)

    def predict_proba(self, image) -> np.ndarray:
        """float32 (C, H, W) probabilities at the image's size."""
        ((_, probs),) = self.run([(as_source(image), None)])
        return probs.cpu().numpy()

    def predict(self, image) -> np.ndarray:
        """uint8 (H, W) class ids at the image's size (binary: 0/1)."""
        ((_, probs),) = self.run([(as_source(image), None)])
        return self.labels(probs).cpu().numpy()


def pick_device(device: str) -> torch.device:
    """``auto`` (a GPU if there is one), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; anything else, or a GPU
    this machine lacks, is a UserError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"device '{device}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device '{device}': segdist predicts on auto, cpu, cuda, cuda:N or mps")
    if (dev.type == "cuda" and not torch.cuda.is_available()) or (dev.type == "mps" and not has_mps):
        raise UserError(f"device {device}: this machine has no such GPU; use cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev
