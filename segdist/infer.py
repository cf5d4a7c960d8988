"""Inference: masks at each input's original size, plus overlay PNGs.

``predict_paths(ckpt, inputs, out)`` reads images with OpenCV (EXIF orientation applied, as the
shard builder does), resizes to the training size, runs the model, resizes the *logits* back
to the original size (bilinear) and takes the class per pixel there, so borders stay smooth.
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
from .errors import UserError
from .metrics import logits_to_pred
from .models import load_model
from .track import overlay

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


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


@torch.no_grad()
def predict_image(model, image: np.ndarray, meta: dict, device: torch.device) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> class ids uint8 (H, W) at the same size."""
    h, w = image.shape[:2]
    s = meta["image_size"]
    small = cv2.resize(image, (s, s), interpolation=cv2.INTER_AREA if min(h, w) >= s else cv2.INTER_LINEAR)
    x = normalize(torch.from_numpy(small).permute(2, 0, 1)[None].to(device), meta["mean"], meta["std"])
    logits = F.interpolate(model(x).float(), size=(h, w), mode="bilinear", align_corners=False)
    return logits_to_pred(logits)[0].to(torch.uint8).cpu().numpy()


def predict_paths(ckpt: str | Path, inputs: str | Path, out: str | Path, device: str = "auto") -> str:
    """Write ``out/masks/<stem>.png`` (binary: 0/255; multi-class: class ids) and
    ``out/overlays/<stem>.png``. Unreadable inputs are skipped and counted."""
    meta = read_meta(ckpt)
    dev = pick_device(device)
    model = load_model(ckpt).to(dev).eval()
    files = list_images(inputs)
    out = Path(out)
    done, skipped = 0, []
    for f, name in zip(files, output_names(files, Path(inputs))):
        bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if bgr is None:
            skipped.append(f.name)
            continue
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        pred = predict_image(model, rgb, meta, dev)
        mask_png = pred * 255 if meta["binary"] else pred
        atomic_write_bytes(out / "masks" / name, cv2.imencode(".png", mask_png)[1].tobytes())
        ov = cv2.cvtColor(overlay(rgb, pred, meta["num_classes"]), cv2.COLOR_RGB2BGR)
        atomic_write_bytes(out / "overlays" / name, cv2.imencode(".png", ov)[1].tobytes())
        done += 1
    msg = f"predicted {done} image(s) into {out}/masks and {out}/overlays"
    if skipped:
        msg += f"; skipped {len(skipped)} unreadable: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"
    return msg
