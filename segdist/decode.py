"""Bytes to pixels: the one decode-and-resize rule that training, evaluation and prediction share.

* :func:`decode_image`: JPEG/PNG bytes -> uint8 RGB (S, S, 3). libjpeg decodes large JPEGs at
  1/2, 1/4 or 1/8 scale when that still covers ``S`` (fewer pixels, same output quality), then
  :func:`segdist.resize.resize_to` resizes by the one rule (area from 2x down, else bilinear).
* :func:`decode_mask`: index PNG bytes -> uint8 (S, S), nearest (class ids stay ids).
* :func:`to_device`: a loader batch onto the accelerator; rows that travelled as JPEG bytes
  (``data.decode=device``) are decoded there (nvJPEG on CUDA), all of a batch in one batched nvJPEG
  call and one batched resize. Masks always decode on the CPU: they are index PNGs, which nvJPEG
  does not read, and at a tenth of a millisecond each the loader workers never wait on them.
* :func:`device_batches`: the training loop's batches on the device; on CUDA a thread copies
  (and device-decodes) the next batches on a side stream while the GPU trains.
"""

from __future__ import annotations

import io
import queue
import struct
import threading
import weakref
from collections.abc import Iterable, Iterator

import cv2
import numpy as np
import torch

from .errors import UserError
from .resize import as_hw, resize_batch, resize_to, scaled_size

__all__ = ["DecodeError", "jpeg_size", "decode_image", "decode_rgb", "decode_mask", "device_batches", "frame_count",
           "image_format", "place", "to_device", "unreadable_reason"]

cv2.setNumThreads(1)  # one decode per worker process; OpenCV's own pool only oversubscribes


# OpenCV >= 4.10 decodes straight to RGB (no BGR->RGB pass); the reduced-size flags carry the
# colour bit, so it is swapped for the RGB one.
_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header (SOFn), or None if there is none.

    A few dozen bytes of marker walking: ~10x cheaper than opening the image with PIL,
    which was ~5 % of the whole per-sample decode cost.
    """
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT/JPG/DAC)
            h, w = struct.unpack_from(">HH", data, i + 5)
            return w, h
        elif marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        else:
            i += 2 + struct.unpack_from(">H", data, i + 2)[0]
    return None


class DecodeError(UserError):
    """Bytes OpenCV cannot (or refuses to) decode as an image; ``reason`` says why, in words."""

    def __init__(self, reason: str):
        super().__init__(f"cannot decode an image in the shards ({reason}); run `segdist shards verify`")
        self.reason = reason


def _imdecode(data: bytes, min_hw: tuple[int, int] | None, reduced: bool, orient: bool) -> np.ndarray:
    """Bytes -> uint8 (h, w, 3), RGB when OpenCV can decode straight to it (else BGR: see callers).

    With ``reduced`` and ``min_hw``, libjpeg decodes a JPEG at 1/2, 1/4 or 1/8 scale while that
    still covers ``min_hw``: fewer pixels decoded, the same output after an area resize.
    """
    flag = cv2.IMREAD_COLOR
    if reduced and min_hw is not None and data[:2] == b"\xff\xd8":
        wh = jpeg_size(data)  # None: a malformed header; full decode then fails with a clear error
        if wh is not None:
            flag = next((f for factor, f in _REDUCED if wh[0] // factor >= min_hw[1] and wh[1] // factor >= min_hw[0]),
                        flag)
    if _RGB is not None:
        flag = (flag & ~cv2.IMREAD_COLOR) | _RGB
    if not orient:
        flag |= cv2.IMREAD_IGNORE_ORIENTATION
    try:  # OpenCV raises (not returns None) for empty bytes or a header claiming 60000 x 60000 pixels
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error as e:
        too_big = "CV_IO_MAX_IMAGE_PIXELS" in str(e)
        raise DecodeError("larger than OpenCV's decode limit (CV_IO_MAX_IMAGE_PIXELS)" if too_big
                          else f"OpenCV cannot decode it: {str(e).strip().splitlines()[-1]}") from None
    if img is None:
        raise DecodeError(unreadable_reason(data))
    return img


_MAGIC = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"GIF8", "GIF"), (b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"),
          (b"BM", "BMP"))


def image_format(data: bytes) -> str:
    """The container format from the first bytes ("TIFF", "WebP", ...), or "" when unknown."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), "")


def unreadable_reason(data: bytes) -> str:
    """Why the 8-bit colour decode gave nothing, in words: what the image really is when OpenCV can read it
    unchanged (a float32 TIFF is a float32 TIFF, not "not an image"), else that it is not a readable image."""
    try:
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        raw = None
    if raw is None:
        return "not a readable image"
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    return (f"a {raw.dtype} {image_format(data) or 'image'} with {channels} channel(s): segdist reads 8- and "
            f"16-bit images; convert it to 8-bit (how its values map to 0..255 is the data's to choose)")


def frame_count(data: bytes) -> int:
    """Frames in an image file: more than 1 for an animated WebP, GIF or PNG or a multi-page TIFF (OpenCV would
    silently read frame 1 alone); 1 for everything else, JPEGs unopened (their extra images are camera extras)."""
    if image_format(data) not in ("TIFF", "GIF", "PNG", "WebP"):
        return 1
    from PIL import Image  # here: only predict's user files of these formats pay for PIL

    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(getattr(im, "n_frames", 1))
    except Exception:  # noqa: BLE001 -- unreadable: the decoder says why
        return 1


def decode_image(data: bytes, size, reduced: bool = True, out: np.ndarray | None = None,
                 orient: bool = False) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 (H, W, 3) RGB squashed to ``size`` (S or (H, W)), into ``out`` when given.

    ``orient`` applies EXIF orientation: shards have it applied at build time, user files
    (``segdist predict``) do not.
    """
    hw = as_hw(size)
    img = _imdecode(data, hw, reduced, orient)
    if _RGB is None:  # OpenCV < 4.10: swap channels after the resize, on fewer pixels
        img = cv2.cvtColor(resize_to(img, hw), cv2.COLOR_BGR2RGB)
        if out is None:
            return img
        out[...] = img
        return out
    return resize_to(img, hw, out)


def decode_rgb(data: bytes, min_hw: tuple[int, int] | None = None, reduced: bool = True,
               orient: bool = False) -> np.ndarray:
    """Encoded image bytes -> uint8 (h, w, 3) RGB at native size, or reduced (1/2, 1/4, 1/8) while it
    still covers ``min_hw``; the caller resizes to the exact size it needs with :func:`resize_to`.

    The one full-image decoder (training, ``segdist predict``, eval, export). ``orient`` applies EXIF
    orientation: shards have it applied at build time, user files do not. Raises
    :class:`DecodeError` (a UserError; ``.reason`` in words) for bytes that are not a readable image.
    """
    img = _imdecode(data, min_hw, reduced, orient)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if _RGB is None else img


def decode_mask(data: bytes, size=None) -> np.ndarray:
    """8-bit index PNG bytes -> uint8 (H, W) class ids, nearest-resized to ``size`` (S or (H, W);
    None: native size)."""
    try:
        m = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # empty bytes, or a header OpenCV refuses
        m = None
    if m is None or m.ndim != 2:
        raise UserError("a mask in the shards is not a 1-channel index PNG; rebuild with `segdist shards build`")
    return m if size is None else resize_to(m, as_hw(size), nearest=True)


def place(image: bytes, mask: bytes, mode: str, hw: tuple[int, int], out_image: np.ndarray,
          out_mask: np.ndarray, *, short_side: int = 0, scale: tuple[float, float] = (1.0, 1.0),
          rng: np.random.Generator | None = None, reduced: bool = True, ignore: int = 255) -> None:
    """Decode one sample into batch rows ``out_image`` uint8 (H, W, 3) and ``out_mask`` (H, W)
    in a crop/pad resize mode (``short_side`` or ``none``).

    With ``rng`` (training): a random resize factor in ``scale``, then a random crop. Without
    (validation): factor 1, a centred crop. A sample smaller than (H, W) is padded at the
    bottom and right with 0 (image) and ``ignore`` (mask), as MMSegmentation pads.
    """
    m = decode_mask(mask)
    h, w = m.shape  # the native size (the image may be decoded reduced)
    f = float(rng.uniform(*scale)) if rng is not None else 1.0
    th, tw = scaled_size(mode, h, w, hw, short_side, f)
    img = resize_to(decode_rgb(image, (th, tw), reduced), (th, tw))
    m = resize_to(m, (th, tw), nearest=True)
    H, W = hw
    y0 = int(rng.integers(0, th - H + 1)) if rng is not None and th > H else max(0, (th - H) // 2)
    x0 = int(rng.integers(0, tw - W + 1)) if rng is not None and tw > W else max(0, (tw - W) // 2)
    img, m = img[y0:y0 + H, x0:x0 + W], m[y0:y0 + H, x0:x0 + W]
    if img.shape[:2] != (H, W):
        out_image[...] = 0
        out_mask[...] = ignore
    out_image[:img.shape[0], :img.shape[1]] = img
    out_mask[:m.shape[0], :m.shape[1]] = m


_DECODE_STREAMS: dict = {}  # device -> the side stream nvJPEG output is allocated on


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision ``decode_jpeg`` on ``device``, safe against memory still in use on CUDA.

    torchvision allocates the outputs on the caller's current stream and decodes on a stream of
    its own without waiting for it, so a block just freed on the current stream but still read
    by queued kernels (a backward, an optimiser step) could be overwritten (torchvision PR
    #9606: 199 of 200 iterations corrupted on an H100). Allocating on a side stream whose
    blocks are only reused once their readers on the main stream are done
    (``record_stream``) closes that gap without a host sync.
    """
    from torchvision.io import ImageReadMode, decode_jpeg  # lazy: only data.decode=device uses it

    if device.type != "cuda":
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    main = torch.cuda.current_stream(device)
    side = _DECODE_STREAMS.setdefault(device, torch.cuda.Stream(device))
    side.wait_stream(main)
    with torch.cuda.stream(side):
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    main.wait_stream(side)
    for t in decoded:
        t.record_stream(main)  # read on the main stream: not reused by the side stream before that is done
    return decoded


def _decode_rows(jpegs: list[bytes], device: torch.device, stats: dict | None) -> list[torch.Tensor]:
    """JPEG bytes -> uint8 (3, H, W) tensors on ``device``; a JPEG the device decoder rejects is
    decoded by OpenCV instead and counted in ``stats["decode_fallbacks"]`` (one bad image must
    not raise on one rank while the others wait in the next collective)."""
    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    try:
        return list(_decode_jpegs(data, device))
    except RuntimeError:
        pass
    out = []
    for raw, d in zip(jpegs, data):
        try:
            out.append(_decode_jpegs([d], device)[0])
        except RuntimeError:
            out.append(torch.from_numpy(decode_rgb(raw, reduced=False)).permute(2, 0, 1).to(device))
            if stats is not None:
                stats["decode_fallbacks"] = stats.get("decode_fallbacks", 0) + 1
    return out


def to_device(batch: dict, device: torch.device | str, stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to ``device``: image uint8 (B, 3, S, S), mask uint8 (B, S, S).

    uint8 crosses the bus (4x less than float32); conversion happens on the device. Rows that
    arrive as JPEG bytes (``data.decode=device``) are decoded there with torchvision (nvJPEG
    on CUDA) and resized by the one rule in one batched step (:func:`segdist.resize.resize_batch`);
    ``stats`` counts the ones that needed the CPU.
    """
    device = torch.device(device)
    image = batch["image"].to(device, non_blocking=True)
    mask = batch["mask"].to(device, non_blocking=True)
    rows = [i for i, j in enumerate(batch.get("jpeg") or []) if j is not None]
    if rows:
        decoded = resize_batch(_decode_rows([batch["jpeg"][i] for i in rows], device, stats), image.shape[-2:])
        if len(rows) == len(image):
            return decoded, mask
        for k, r in enumerate(rows):  # row by row: image[rows] = ... would copy the index list in a host sync
            image[r] = decoded[k]
    return image, mask


def device_batches(batches: Iterable[dict], device, stats: dict | None = None, ahead: int = 2) -> Iterator:
    """``(image, mask)`` on ``device`` for each loader batch (:func:`to_device`).

    On CUDA a thread does the copies (pinned memory -> device, and the device decode) on a side
    stream, up to ``ahead`` batches before the training step asks: the step's stream waits for an
    event on the device, the host never waits for a copy. Elsewhere the batches move as they are asked for.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return (to_device(b, device, stats) for b in batches)
    return _Prefetch(batches, device, stats, ahead)


class _Prefetch:
    """The CUDA side of :func:`device_batches`: a daemon thread fills a bounded queue."""

    def __init__(self, batches: Iterable[dict], device: torch.device, stats: dict | None, ahead: int):
        self.main = torch.cuda.current_stream(device)
        self.queue: queue.Queue = queue.Queue(maxsize=max(ahead, 1))
        self.stop = threading.Event()
        weakref.finalize(self, self.stop.set)  # the loop left early (pause, error): the thread ends too
        threading.Thread(target=_copy_ahead, args=(iter(batches), device, stats, self.queue, self.stop),
                         daemon=True, name="segdist-prefetch").start()

    def __iter__(self) -> _Prefetch:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.queue.get()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        image, mask, ready = item
        self.main.wait_event(ready)  # the training stream waits on the device, not the host
        for t in (image, mask):  # allocated on the side stream: not reused before the step is done with it
            t.record_stream(self.main)
        return image, mask


def _copy_ahead(it: Iterator[dict], device: torch.device, stats: dict | None, out: queue.Queue,
                stop: threading.Event) -> None:
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    side = torch.cuda.Stream(device)
    try:
        with torch.cuda.device(device), torch.cuda.stream(side):  # the current stream is per thread
            for batch in it:
                image, mask = to_device(batch, device, stats)
                ready = torch.cuda.Event()
                ready.record(side)
                if not put((image, mask, ready)):
                    return
    except BaseException as e:  # noqa: BLE001 -- raised in the training thread, at its next batch
        put(e)
        return
    put(None)
