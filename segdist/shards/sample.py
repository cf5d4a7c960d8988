"""Per-sample work, run in worker processes: read, decode, check, repair and encode one image/mask pair.

Repairs that need no guessing: a mask stored at another scale of the same frame (resized, nearest),
palette masks (read as indices), 0/255 and 16-bit masks, EXIF orientation, 16-bit, gray or CMYK
images (8-bit RGB). A problem file makes a ``skip`` :class:`Result` with a reason, never an exception.
Each sample is stored as ``image.jpg`` (the source JPEG's bytes when nothing had to change) or
``image.png``, plus ``mask.png``: an 8-bit one-channel PNG of class indices (void: 255).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from .reader import IGNORE_INDEX
from .discover import Pair
from .labels import value_lookup

_IMAGE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                          "I;16", "I;16L", "I;16B", "I;16N", "I"})
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that exchange width and height


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
        raise _Skip(_unidentified(data, what), path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _Skip(f"unreadable {what} ({e})", path)


def _unidentified(data: bytes, what: str) -> str:
    """Why PIL cannot open a file, in words: what it is when OpenCV reads it unchanged (PIL has no float RGB
    TIFF), else an unknown or corrupt format."""
    try:
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        raw = None
    if raw is None or raw.dtype in (np.uint8, np.uint16):
        return f"not a readable {what} (unknown or corrupt file format)"
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    return (f"a {raw.dtype} {what} with {channels} channel(s): segdist stores 8- and 16-bit {what}s; convert it "
            f"(how its values map to 0..255 is the data's to choose)")


def _single_frame(im: Image.Image, path: str, what: str) -> None:
    """An animated (WebP, GIF, PNG) or multi-page (TIFF) file is refused: which frame is meant is the user's
    call, and reading frame 1 silently could pair it with a mask drawn on another."""
    frames = getattr(im, "n_frames", 1)
    if frames > 1 and im.format != "MPO":  # MPO: a camera JPEG with extra images; the first is the photo
        raise _Skip(f"{frames} frames (an animated or multi-page {im.format}); segdist stores single {what}s: "
                    f"extract the frame you mean", path)


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


def _mask_counts(raw: np.ndarray, opts: Options) -> tuple[tuple[int, int], ...]:
    """(raw value, pixels) for each value of a mask (void value excluded)."""
    if raw.dtype == np.uint8:
        counts = np.bincount(raw.ravel(), minlength=256)
        values = np.flatnonzero(counts)
        counts = counts[values]
    else:
        values, counts = np.unique(raw, return_counts=True)
    return tuple((int(v), int(c)) for v, c in zip(values, counts) if v != opts.void)


def _read_mask(pair: Pair, opts: Options) -> np.ndarray:
    data = _read_bytes(pair.mask)
    im = _open_image(data, pair.mask, "mask")
    _single_frame(im, pair.mask, "mask")
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


def scan_mask(pair: Pair, opts: Options) -> tuple[tuple[int, int], ...] | None:
    """Worker: the raw values of one mask with their pixel counts, or None when it cannot be read (the build
    skips it later). The counts let the label decision weigh values, not only list them."""
    try:
        return _mask_counts(_read_mask(pair, opts), opts)
    except _Skip:
        return None


def _to_index(raw: np.ndarray, opts: Options) -> tuple[np.ndarray, tuple[int, ...]]:
    """Map raw values to stored ``(H, W) uint8`` values; also return the unknown raw values found."""
    if opts.threshold is not None:  # already 0/1/255
        return raw.astype(np.uint8), ()
    lut, known = value_lookup(opts.value_map)
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
    _single_frame(im, pair.image, "image")
    if im.mode == "F":
        raise _Skip(f"a 32-bit float {im.format or 'image'}: segdist stores 8- and 16-bit images; convert it "
                    f"(how its values map to 0..255 is the data's to choose)", pair.image)
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
