"""Inference: class masks and probabilities at each input's original size.

A :class:`Predictor` (``segdist.load(ckpt)``) turns an image into probabilities at its size:

* ``resize`` mode (default): the model's training rule (``data.resize``), deterministically.
  ``squash``: the image squashed to ``data.image_size``, exactly the training stream's pixels
  (reduced JPEG decode included); ``short_side``: the short side resized to ``data.short_side``,
  aspect kept; ``none``: native size. Inputs are padded (bottom/right, black, as the
  augmentation's warp pads) to a multiple of 32 and the padding is cut off the logits again.
* ``sliding`` mode: windows of the training size over the image after that mode's deterministic
  rescale (``short_side``: scaled; ``squash`` and ``none``: native). Stride = window x (1 -
  overlap) (MMSegmentation's convention), the last window aligned to the far edge, an image
  smaller than a window padded. Window logits are blended with Gaussian, linear (tent) or mean
  weights normalised to sum to 1 at every pixel; a single window is used as it is, so sliding
  over an image of one window's size *is* plain inference.

Each view's logits are resized to the original size (bilinear) and become probabilities there
(sigmoid of a binary model's one channel, else softmax); test-time augmentation averages the
probabilities of the horizontal flip and of other scales. The class is the argmax, or for a
binary model probability > ``threshold``. The windows of a chunk of images are batched on the
device by shape.

``predict_paths`` (``segdist predict``) reads files, folders, globs and shard folders and writes
index PNG masks (binary 0/255; palette PNGs when the model has class colours), overlays and
optionally probabilities; an input that cannot be read is skipped with its reason and the
summary counts it. :mod:`segdist.evaluate` (``segdist eval --mode resize|sliding``, ``--full-res``)
scores the same predictions against each val sample's native-size mask, exactly across ranks.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_write_bytes, check_out_dir
from .augment import normalize
from .checkpoint import read_meta
from .config import RESIZE_MODES
from .decode import decode_rgb
from .resize import as_hw, resize_to, scaled_size
from .errors import UserError
from .models import load_model
from .shards import IMAGE_EXTS, open_shards
from .stream import read_samples
from .track import overlay

MODES = ("resize", "sliding")
BLENDS = ("gaussian", "linear", "mean")
PROB_FORMATS = ("npy", "png16")
PAD_MULTIPLE = 32
"""``resize`` mode pads network inputs to a multiple of this: SMP encoders downsample 5 times."""


# ----------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Options:
    """How a :class:`Predictor` predicts: the model's resize rule (from its meta) and the user's choices."""

    image_hw: tuple[int, int]  # data.image_size: the squash size and the sliding window
    resize: str = "squash"  # data.resize
    short_side: int = 0  # data.short_side (0: the short side of image_hw)
    reduced: bool = True  # data.reduced_decode
    mode: str = "resize"
    overlap: float = 0.5
    blend: str = "gaussian"
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    threshold: float = 0.5


def parse_tta(spec: str | None) -> tuple[bool, tuple[float, ...]]:
    """``--tta``: ``flip``, ``flip,0.75,1.0,1.25``, ``0.5,1`` or ``''``/``none`` -> (flip, scales)."""
    flip, scales = False, []
    for tok in (t.strip().lower() for t in str(spec or "").split(",")):
        if tok in ("", "none"):
            continue
        if tok == "flip":
            flip = True
            continue
        try:
            scale = float(tok)
        except ValueError:
            raise UserError(f"--tta: '{tok}' is neither 'flip' nor a scale (e.g. --tta flip,0.75,1.0,1.25)") from None
        if not 0.05 <= scale <= 8:
            raise UserError(f"--tta: scale {tok} is outside 0.05..8")
        scales.append(scale)
    return flip, tuple(scales) or (1.0,)


def _choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UserError(f"{what} '{value}' is not one of {', '.join(choices)}")
    return value


def options_for(meta: dict, mode: str = "resize", overlap: float = 0.5, blend: str = "gaussian",
                tta: str | None = "", threshold: float = 0.5) -> Options:
    """Options from a checkpoint's meta (checkpoints from before ``data.resize`` squashed) and the user's choices."""
    data = meta.get("config", {}).get("data", {})
    if not 0 <= overlap < 1:
        raise UserError(f"--overlap {overlap}: must be in [0, 1) (stride = window x (1 - overlap))")
    if not 0 <= threshold <= 1:
        raise UserError(f"--threshold {threshold}: a probability, in [0, 1]")
    flip, scales = parse_tta(tta)
    return Options(as_hw(meta["image_size"]), _choice("the checkpoint's data.resize", data.get("resize", "squash"),
                                                      RESIZE_MODES),
                   int(data.get("short_side", 0)), bool(data.get("reduced_decode", True)),
                   _choice("--mode", mode, MODES), float(overlap), _choice("--blend", blend, BLENDS), flip, scales,
                   float(threshold))


def describe(opts: Options) -> str:
    """One line: what the predictions are made from, e.g. ``sliding 64x64 windows (overlap 0.5, gaussian), TTA flip``."""
    h, w = opts.image_hw
    if opts.mode == "sliding":
        what = f"sliding {h}x{w} windows (overlap {opts.overlap:g}, {opts.blend})"
        if opts.resize == "short_side":
            what += f" over the image with short side {opts.short_side or min(h, w)}"
    elif opts.resize == "squash":
        what = f"resize: squashed to {h}x{w}"
    elif opts.resize == "short_side":
        what = f"resize: short side to {opts.short_side or min(h, w)}"
    else:
        what = "resize: native size"
    tta = (["flip"] if opts.flip else []) + ([f"scales {','.join(f'{s:g}' for s in opts.scales)}"]
                                              if opts.scales != (1.0,) else [])
    return what + (f", TTA {' + '.join(tta)}" if tta else "")


# ----------------------------------------------------------------------------- geometry (pure)
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
            padded = (-(-size[0] // PAD_MULTIPLE) * PAD_MULTIPLE, -(-size[1] // PAD_MULTIPLE) * PAD_MULTIPLE)
            window, origins = padded, ((0, 0),)
        else:
            window = opts.image_hw
            padded = (max(size[0], window[0]), max(size[1], window[1]))
            origins = tuple(itertools.product(window_starts(padded[0], window[0], opts.overlap),
                                              window_starts(padded[1], window[1], opts.overlap)))
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


# ----------------------------------------------------------------------------- pixels
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


def decode_full(data: bytes, orient: bool = True) -> np.ndarray:
    """Encoded bytes -> RGB uint8 (H, W, 3) at full size (EXIF orientation applied with ``orient``).

    Raises ``ValueError`` with the reason when OpenCV cannot (or refuses to) decode it.
    """
    flag = cv2.IMREAD_COLOR | (0 if orient else cv2.IMREAD_IGNORE_ORIENTATION)
    try:  # OpenCV raises (not returns None) for e.g. a header claiming 60000 x 60000 pixels
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error as e:
        too_big = "CV_IO_MAX_IMAGE_PIXELS" in str(e)
        raise ValueError("larger than OpenCV's decode limit (CV_IO_MAX_IMAGE_PIXELS)" if too_big
                         else f"OpenCV cannot decode it: {str(e).strip().splitlines()[-1]}") from None
    if bgr is None:
        raise ValueError("not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_image(path: Path) -> tuple[bytes, np.ndarray]:
    """A file's bytes and its full-size RGB uint8 (H, W, 3), EXIF orientation applied (ValueError: why not)."""
    data = path.read_bytes()
    return data, decode_full(data)


def network_input(data: bytes, meta: dict) -> torch.Tensor:
    """Encoded image bytes -> uint8 (3, h, w): the network input of ``resize`` mode; for a squash
    model exactly the pixels the training stream makes."""
    opts = options_for(meta)
    hw = opts.image_hw if opts.resize == "squash" else decode_full(data).shape[:2]  # squash ignores the size
    (view,) = plan_views(opts, hw)
    return view_tiles(view_pixels(Source(data, hw), [view], opts.reduced)[view.size], view)[0]


def as_source(image) -> Source:
    """A path, encoded bytes or a uint8 RGB array (H, W, 3) (gray (H, W) too) as a :class:`Source`."""
    if isinstance(image, (str, Path)):
        try:
            data, rgb = read_image(Path(image))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read image '{image}': {e}") from None
        return Source(data, rgb.shape[:2])
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        try:
            return Source(data, decode_full(data).shape[:2])
        except ValueError as e:
            raise UserError(f"cannot decode the image bytes: {e}") from None
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise UserError(f"expected a uint8 RGB array (H, W, 3); got {image.dtype} {image.shape}")
        return Source(np.ascontiguousarray(image), image.shape[:2])  # OpenCV refuses negative strides
    raise UserError(f"expected a path, encoded image bytes or a uint8 RGB array; got {type(image).__name__}")


# ----------------------------------------------------------------------------- the predictor
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
                 batch_size: int = 8, autocast: Callable = contextlib.nullcontext):
        self.model, self.meta, self.opts = model.eval(), meta, opts
        self.device, self.batch_size, self.autocast = torch.device(device), max(1, int(batch_size)), autocast

    @classmethod
    def load(cls, ckpt: str | Path, device: str = "auto", mode: str | None = None, batch_size: int = 8,
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
        for (payload, hw, _, _), bl in zip(chunk, blends):
            yield payload, self.probabilities(bl, hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, h, w) on the host -> float32 logits (B, C, h, w) on the device."""
        x = normalize(x.to(self.device, non_blocking=True), self.meta["mean"], self.meta["std"])
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


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Job:
    """One input of ``segdist predict``: how the summary names it, its output name (``sub/x.png``),
    how to get its bytes, and whether EXIF orientation applies (files) or was applied (shards)."""

    label: str
    name: str
    read: Callable[[], bytes]
    orient: bool = True


def list_images(spec: str | Path) -> tuple[list[Path], Path]:
    """An image file, a folder of images (recursive) or a glob -> (files, the folder names are relative to)."""
    path = Path(spec)
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
        if files:
            return files, path
        raise UserError(f"folder '{path}' holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    if glob.has_magic(str(spec)):
        files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True)
                       if Path(p).suffix.lower() in IMAGE_EXTS and Path(p).is_file())
        if not files:
            raise UserError(f"pattern '{spec}' matches no images ({', '.join(sorted(IMAGE_EXTS))})")
        base = Path(*itertools.takewhile(lambda part: not glob.has_magic(part), path.parts))
        return files, base
    raise UserError(f"input '{path}' does not exist; pass image files, folders, globs or a shard folder")


def output_names(files: list[Path], base: Path) -> list[str]:
    """``sub/x.png`` for ``base/sub/x.jpg``; ``x_jpg.png`` when ``x.jpg`` and ``x.png`` both exist."""
    rel = [f.relative_to(base) for f in files]
    stems = [str(r.with_suffix("")) for r in rel]
    return [f"{s}_{r.suffix[1:]}.png" if stems.count(s) > 1 else f"{s}.png" for s, r in zip(stems, rel)]


def shard_jobs(urls: list[str], sizes: list[int]) -> Iterator[Job]:
    """The samples of shards (read one tar at a time): named by their keys, orientation already applied."""
    for url, n in zip(urls, sizes):
        for s in read_samples(url, n):
            data = s["image.jpg"] if "image.jpg" in s else s["image.png"]
            yield Job(s["__key__"], f"{s['__key__']}.png", lambda data=data: data, orient=False)


def find_inputs(inputs: Iterable[str | Path], split: str = "val") -> tuple[int, Iterator[Job]]:
    """Files, folders, globs and shard folders (a folder holding manifest.json: its ``split``) ->
    (how many images, the jobs). A file named twice is predicted once; output names that would
    collide (the same name under two inputs) get ``_2``, ``_3``..."""
    files: dict[Path, Job] = {}
    shards = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir() and (path / "manifest.json").is_file():
            shards.append(open_shards(str(path)).split(split))
            continue
        found, base = list_images(spec)
        for f, name in zip(found, output_names(found, base)):
            files.setdefault(f.resolve(), Job(str(f.relative_to(base)), name, f.read_bytes))
    jobs = itertools.chain(files.values(), *(shard_jobs(*s) for s in shards))
    return len(files) + sum(sum(sizes) for _, sizes in shards), unique_names(jobs)


def unique_names(jobs: Iterable[Job]) -> Iterator[Job]:
    seen: set[str] = set()
    for job in jobs:
        name, n = job.name, 1
        while name in seen:
            n += 1
            name = f"{job.name[:-4]}_{n}.png"
        seen.add(name)
        yield job if name == job.name else Job(job.label, name, job.read, job.orient)


# ----------------------------------------------------------------------------- outputs
def palette_table(colours, void=None) -> np.ndarray:
    """Class colours ``[[r, g, b], ...]`` (and a void colour) -> uint8 (256, 3), index 255 = void."""
    pal = np.zeros((256, 3), np.uint8)
    for i, c in enumerate(colours[:255]):
        pal[i] = c
    if void is not None:
        pal[255] = void
    return pal


def model_palette(meta: dict, palette_file: str | Path | None = None) -> np.ndarray | None:
    """The PNG palette of a multi-class model's masks: ``--palette FILE`` (the ``segdist shards
    build --palette`` format), else ``meta["palette"]`` (``[[r, g, b], ...]`` in class order or
    ``{"colors": [...], "void": [r, g, b]}``); None: plain 8-bit index PNGs."""
    if palette_file:
        from .shards import read_palette

        table, _ = read_palette(palette_file)
        pal = np.zeros((256, 3), np.uint8)
        for packed, i in table:
            pal[i] = ((packed >> 16) & 255, (packed >> 8) & 255, packed & 255)
        return pal
    spec = meta.get("palette")
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
    from PIL import Image

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


def predict_paths(ckpt: str | Path, inputs, out: str | Path, device: str = "auto", mode: str = "resize",
                  split: str = "val", overlap: float = 0.5, blend: str = "gaussian", tta: str = "",
                  threshold: float = 0.5, probs: str | None = None, overlays: bool = True,
                  palette: str | Path | None = None, batch_size: int = 8) -> str:
    """``segdist predict``: ``out/masks/<name>.png`` (binary: 0/255; multi-class: class ids, palette
    PNG when the model has colours), ``out/overlays/<name>.png`` and with ``probs``
    ``out/probs/...``, all at each image's original size. ``inputs``: a path or a list of files,
    folders, globs and shard folders. Unreadable inputs are skipped and counted with their reason."""
    from tqdm import tqdm

    if probs is not None:
        _choice("--probs", probs, PROB_FORMATS)
    check_out_dir(out)  # before the model loads, not at the first mask
    predictor = Predictor.load(ckpt, device, mode, batch_size=batch_size, overlap=overlap, blend=blend, tta=tta,
                               threshold=threshold)
    meta = predictor.meta
    pal = None if meta["binary"] else model_palette(meta, palette)
    total, jobs = find_inputs([inputs] if isinstance(inputs, (str, Path)) else inputs, split)
    out = Path(out)
    done, skipped = 0, []
    with tqdm(total=total, unit="image", desc="predict", disable=None) as bar:
        def readable() -> Iterator[tuple[Source, tuple[Job, np.ndarray]]]:
            for job in jobs:
                try:
                    data = job.read()
                    rgb = decode_full(data, job.orient)
                except (ValueError, OSError) as e:
                    skipped.append(f"{job.label} ({e})")
                    bar.update()
                    continue
                yield Source(data, rgb.shape[:2], job.orient), (job, rgb)

        for (job, rgb), p in predictor.run(readable()):
            pred = predictor.labels(p).cpu().numpy()
            atomic_write_bytes(out / "masks" / job.name, mask_png(pred, meta["binary"], pal))
            if overlays:
                ov = cv2.cvtColor(overlay(rgb, pred, meta["num_classes"]), cv2.COLOR_RGB2BGR)
                atomic_write_bytes(out / "overlays" / job.name, png(ov))
            if probs:
                for rel, data in prob_files(job.name, p.cpu().numpy(), probs).items():
                    atomic_write_bytes(out / "probs" / rel, data)
            done += 1
            bar.update()
    wrote = [f"{out}/{d}" for d, on in (("masks", True), ("overlays", overlays), ("probs", probs)) if on]
    msg = f"predicted {done} image(s) into {' and '.join(wrote)} ({describe(predictor.opts)})"
    if skipped:
        msg += f"; skipped {len(skipped)} unreadable: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"
    return msg
