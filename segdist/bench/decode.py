"""``segdist bench decode``: JPEG decoders on the same shard bytes, one thread, speed and difference."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import numpy as np
import torch

from ..decode import decode_image
from ..resize import resize_to
from ..errors import UserError
from ..shards import read_samples
from .common import cpu_model




# ----------------------------------------------------------------------------- decoders
def _cv2_full(data: bytes, size: int) -> np.ndarray:
    return decode_image(data, size, reduced=False)


def _cv2_reduced(data: bytes, size: int) -> np.ndarray:
    return decode_image(data, size, reduced=True)


def _pil_draft(data: bytes, size: int) -> np.ndarray:
    from PIL import Image  # lazy, like each decoder below: one import per measured decoder, not for all

    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (size, size))  # libjpeg DCT scaling, keeps both sides >= size
    return resize_to(np.asarray(im.convert("RGB")), (size, size))


def _torchvision(data: bytes, size: int) -> np.ndarray:
    from torchvision.io import ImageReadMode, decode_jpeg  # lazy, as each decoder here

    img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return resize_to(img.permute(1, 2, 0).numpy(), (size, size))


def _simplejpeg(data: bytes, size: int) -> np.ndarray:
    import simplejpeg  # lazy: a dev dependency, only this bench row needs it

    return resize_to(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size, min_width=size), (size, size))


DECODERS: dict[str, Callable[[bytes, int], np.ndarray]] = {
    "cv2": _cv2_full, "cv2-reduced (stream)": _cv2_reduced, "pil-draft": _pil_draft,
    "torchvision-cpu": _torchvision, "simplejpeg": _simplejpeg,
}
"""JPEG bytes -> uint8 (S, S, 3) RGB; all resize the same way, so they differ only in decoding."""


def run_decode_bench(urls: list[str], size: int, min_seconds: float = 2.0) -> dict:
    """Single-thread img/s of each JPEG decoder (+ the same resize) over the shards' JPEG images.

    ``mean_abs_diff`` is against full-size OpenCV decoding: reduced (DCT-scaled) decoders trade
    a little detail for speed, and a wrong decoder (channel order, orientation) shows here.
    """
    jpegs = [s["image.jpg"] for u in urls for s in read_samples(u) if "image.jpg" in s]
    if not jpegs:
        raise UserError("the shards hold no JPEG images to decode; build them with --reencode jpeg or --max-side")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = [_cv2_full(d, size).astype(np.int16) for d in jpegs]
        out = {}
        for name, fn in DECODERS.items():
            try:
                fn(jpegs[0], size)
            except ImportError:
                out[name] = None  # not installed
                continue
            diff = float(np.mean([np.abs(fn(d, size).astype(np.int16) - r).mean() for d, r in zip(jpegs, ref)]))
            n, t0 = 0, time.perf_counter()
            while n == 0 or time.perf_counter() - t0 < min_seconds:  # whole passes, at least one
                for d in jpegs:
                    fn(d, size)
                n += len(jpegs)
            out[name] = {"img_s": round(n / (time.perf_counter() - t0), 1), "mean_abs_diff": round(diff, 2)}
    finally:
        torch.set_num_threads(torch_threads)
    return {"decoders": out, "images": len(jpegs), "size": size, "threads": 1, "cpu": cpu_model()}


def format_decode_table(r: dict) -> str:
    lines = [f"segdist bench decode: {r['images']} JPEGs -> {r['size']} px RGB, 1 thread, {r['cpu']}",
             f"{'decoder':<22} {'img/s':>8} {'mean |diff| vs cv2 full':>24}"]
    for name, v in r["decoders"].items():
        lines.append(f"{name:<22} {'not installed':>8}" if v is None else
                     f"{name:<22} {v['img_s']:>8.1f} {v['mean_abs_diff']:>24.2f}")
    return "\n".join(lines)
