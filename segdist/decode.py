"""Bytes to pixels: the one decode-and-resize rule that training, evaluation and prediction share.

* :func:`decode_image`: JPEG/PNG bytes -> uint8 RGB (S, S, 3). libjpeg decodes large JPEGs at
  1/2, 1/4 or 1/8 scale when that still covers ``S`` (fewer pixels, same output quality), then
  :func:`resize_square` resizes with the one interpolation rule (area from 2x down, else bilinear).
* :func:`decode_mask`: index PNG bytes -> uint8 (S, S), nearest (class ids stay ids).
* :func:`to_device`: a loader batch onto the accelerator; rows that travelled as JPEG bytes
  (``data.decode=device``) are decoded there (nvJPEG on CUDA).
"""

from __future__ import annotations

import struct

import cv2
import numpy as np
import torch

from .errors import UserError

__all__ = ["jpeg_size", "decode_image", "resize_square", "decode_mask", "to_device"]

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


def decode_image(data: bytes, size: int, reduced: bool = True, out: np.ndarray | None = None,
                 orient: bool = False) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 (size, size, 3) RGB (written into ``out`` when given).

    With ``reduced``, libjpeg decodes JPEGs at 1/2, 1/4 or 1/8 scale when the result is still at
    least ``size`` on its short side: fewer pixels decoded, same area-resized output quality.
    ``orient`` applies EXIF orientation: shards have it applied at build time, user files
    (``segdist predict``) do not.
    """
    flag = cv2.IMREAD_COLOR
    if reduced and data[:2] == b"\xff\xd8":
        wh = jpeg_size(data)  # None: a malformed header; full decode then fails with a clear error
        if wh is not None:
            flag = next((f for factor, f in _REDUCED if min(wh) // factor >= size), flag)
    if _RGB is not None:
        flag = (flag & ~cv2.IMREAD_COLOR) | _RGB
    if not orient:
        flag |= cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if img is None:
        raise UserError("cannot decode an image in the shards; run `segdist shards verify`")
    if _RGB is None:  # OpenCV < 4.10: swap channels after the resize, on fewer pixels
        img = cv2.cvtColor(resize_square(img, size), cv2.COLOR_BGR2RGB)
        if out is None:
            return img
        out[...] = img
        return out
    return resize_square(img, size, out)


def resize_square(img: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W, C) -> (size, size, C), written straight into ``out`` (a batch row) when given.

    Area averaging only where aliasing would show (>= 2x down); below that bilinear is 3x cheaper
    and what the classic loader uses too.
    """
    interp = cv2.INTER_AREA if min(img.shape[:2]) >= 2 * size else cv2.INTER_LINEAR
    r = cv2.resize(img, (size, size), dst=out, interpolation=interp)
    if out is not None and r.ctypes.data != out.ctypes.data:  # OpenCV allocated instead (``out`` not contiguous)
        out[...] = r
        return out
    return r


def decode_mask(data: bytes, size: int) -> np.ndarray:
    """8-bit index PNG bytes -> uint8 (size, size), nearest resize (class ids stay ids)."""
    m = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if m is None or m.ndim != 2:
        raise UserError("a mask in the shards is not a 1-channel index PNG; rebuild with `segdist shards build`")
    return cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST)


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
    from torchvision.io import ImageReadMode, decode_jpeg

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
            img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
            if img is None:
                raise UserError("cannot decode an image in the shards; run `segdist shards verify`") from None
            out.append(torch.from_numpy(cv2.cvtColor(img, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).to(device))
            if stats is not None:
                stats["decode_fallbacks"] = stats.get("decode_fallbacks", 0) + 1
    return out


def to_device(batch: dict, device: torch.device | str, stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to ``device``: image uint8 (B, 3, S, S), mask uint8 (B, S, S).

    uint8 crosses the bus (4x less than float32); conversion happens on the device. Rows that
    arrive as JPEG bytes (``data.decode=device``) are decoded there with torchvision (nvJPEG
    on CUDA) and resized with antialiasing; ``stats`` counts the ones that needed the CPU.
    """
    device = torch.device(device)
    image = batch["image"].to(device, non_blocking=True)
    mask = batch["mask"].to(device, non_blocking=True)
    rows = [i for i, j in enumerate(batch.get("jpeg") or []) if j is not None]
    if rows:
        size = image.shape[-2:]
        for i, img in zip(rows, _decode_rows([batch["jpeg"][i] for i in rows], device, stats)):
            img = torch.nn.functional.interpolate(img[None].float(), size=size, mode="bilinear",
                                                  antialias=True, align_corners=False)
            image[i] = img[0].round_().clamp_(0, 255).to(torch.uint8)
    return image, mask
