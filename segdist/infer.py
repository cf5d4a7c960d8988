"""Inference: masks at each input's original size, plus overlay PNGs.

``predict_paths(ckpt, inputs, out)`` reads each file's bytes, makes the network input with the
same :func:`~segdist.decode.decode_image` the training stream uses (EXIF orientation applied, as
the shard builder does), runs the model, resizes the *logits* back to the original size
(bilinear) and takes the class per pixel there, so borders stay smooth. A file that cannot be
read or decoded is skipped with its reason; the summary always counts them.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_write_bytes
from .augment import normalize
from .checkpoint import read_meta
from .decode import decode_image
from .errors import UserError
from .metrics import logits_to_pred
from .models import load_model
from .shards import IMAGE_EXTS
from .track import overlay


def list_images(inputs: str | Path) -> list[Path]:
    path = Path(inputs)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
        if files:
            return files
        raise UserError(f"folder '{path}' holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    raise UserError(f"input '{path}' does not exist; pass an image file or a folder of images")


def output_names(files: list[Path], inputs: Path) -> list[str]:
    """``sub/x.png`` for ``inputs/sub/x.jpg``; ``x_jpg.png`` when ``x.jpg`` and ``x.png`` both exist."""
    base = inputs if inputs.is_dir() else inputs.parent
    rel = [f.relative_to(base) for f in files]
    stems = [str(r.with_suffix("")) for r in rel]
    return [f"{s}_{r.suffix[1:]}.png" if stems.count(s) > 1 else f"{s}.png" for s, r in zip(stems, rel)]


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def network_input(data: bytes, meta: dict) -> torch.Tensor:
    """Encoded image bytes -> uint8 (3, S, S) RGB: exactly the pixels the training stream makes."""
    reduced = meta.get("config", {}).get("data", {}).get("reduced_decode", True)
    return torch.from_numpy(decode_image(data, meta["image_size"], reduced, orient=True)).permute(2, 0, 1)


def read_image(path: Path) -> tuple[bytes, np.ndarray]:
    """A file's bytes and its full-size RGB uint8 (H, W, 3), EXIF orientation applied.

    Raises ``ValueError`` with the reason when OpenCV cannot (or refuses to) decode it.
    """
    data = path.read_bytes()
    try:  # OpenCV raises (not returns None) for e.g. a header claiming 60000 x 60000 pixels
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as e:
        too_big = "CV_IO_MAX_IMAGE_PIXELS" in str(e)
        raise ValueError("larger than OpenCV's decode limit (CV_IO_MAX_IMAGE_PIXELS)" if too_big
                         else f"OpenCV cannot decode it: {str(e).strip().splitlines()[-1]}") from None
    if bgr is None:
        raise ValueError("not a readable image")
    return data, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@torch.no_grad()
def predict_image(model, data: bytes, size: tuple[int, int], meta: dict, device: torch.device) -> np.ndarray:
    """Encoded image bytes -> class ids uint8 (H, W) at ``size`` = (H, W), the original size."""
    x = normalize(network_input(data, meta)[None].to(device), meta["mean"], meta["std"])
    logits = F.interpolate(model(x).float(), size=size, mode="bilinear", align_corners=False)
    return logits_to_pred(logits)[0].to(torch.uint8).cpu().numpy()


def predict_paths(ckpt: str | Path, inputs: str | Path, out: str | Path, device: str = "auto") -> str:
    """Write ``out/masks/<stem>.png`` (binary: 0/255; multi-class: class ids) and
    ``out/overlays/<stem>.png``. Unreadable inputs are skipped and counted with their reason."""
    meta = read_meta(ckpt)
    dev = pick_device(device)
    model = load_model(ckpt).to(dev).eval()
    files = list_images(inputs)
    out = Path(out)
    done, skipped = 0, []
    for f, name in zip(files, output_names(files, Path(inputs))):
        try:
            data, rgb = read_image(f)
            pred = predict_image(model, data, rgb.shape[:2], meta, dev)
        except (ValueError, OSError, UserError) as e:
            skipped.append(f"{f.name} ({e})")
            continue
        mask_png = pred * 255 if meta["binary"] else pred
        atomic_write_bytes(out / "masks" / name, cv2.imencode(".png", mask_png)[1].tobytes())
        ov = cv2.cvtColor(overlay(rgb, pred, meta["num_classes"]), cv2.COLOR_RGB2BGR)
        atomic_write_bytes(out / "overlays" / name, cv2.imencode(".png", ov)[1].tobytes())
        done += 1
    msg = f"predicted {done} image(s) into {out}/masks and {out}/overlays"
    if skipped:
        msg += f"; skipped {len(skipped)} unreadable: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"
    return msg
