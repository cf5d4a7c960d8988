"""``segdist predict``: files, folders, globs and shard folders in; masks, overlays and probabilities out.

Every output is at each image's original size; an input that cannot be read is skipped with its
reason and the summary counts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..atomic import atomic_write_bytes, check_out_dir
from ..track import overlay
from .inputs import Job, find_inputs
from .options import BATCH_SIZE, PROB_FORMATS, Options, check_choice, describe_options
from ..decode import DecodeError, decode_rgb, frame_count, image_format
from .predictor import Predictor, Source
from .writers import check_class_list, mask_png, model_palette, png, prob_files


def predict_paths(ckpt: str | Path, inputs, out: str | Path, device: str = "auto", mode: str = Options.mode,
                  split: str = "val", overlap: float = Options.overlap, blend: str = Options.blend, tta: str = "",
                  threshold: float = Options.threshold, probs: str | None = None, overlays: bool = True,
                  palette: str | Path | None = None, batch_size: int = BATCH_SIZE,
                  classes: str | Path | None = None) -> str:
    """``segdist predict``: ``out/masks/<name>.png`` (binary: 0/255; multi-class: class ids, palette
    PNG when the model has colours), ``out/overlays/<name>.png`` and with ``probs``
    ``out/probs/...``, all at each image's original size. ``inputs``: a path or a list of files,
    folders, globs and shard folders. Unreadable inputs are skipped and counted with their reason.
    ``classes`` (a ``--classes`` JSON list) and shard folders must name the model's class table: masks of
    one class table read as another are wrong without a sign."""
    if probs is not None:
        check_choice("--probs", probs, PROB_FORMATS)
    check_out_dir(out)  # before the model loads, not at the first mask
    predictor = Predictor.load(ckpt, device, mode, batch_size=batch_size, overlap=overlap, blend=blend, tta=tta,
                               threshold=threshold)
    meta = predictor.meta
    check_class_list(meta.class_table, classes)
    pal = None if meta.binary else model_palette(meta, palette)
    total, jobs = find_inputs([inputs] if isinstance(inputs, (str, Path)) else inputs, split, meta.class_table)
    out = Path(out)
    done, skipped = 0, []
    with tqdm(total=total, unit="image", desc="predict", disable=None) as bar, \
            tqdm(total=0, unit="window", desc="windows", disable=None if mode == "sliding" else True, position=1,
                 leave=False) as windows:
        predictor.windows = windows  # one image of sliding windows can take long: its windows move on

        def readable() -> Iterator[tuple[Source, tuple[Job, np.ndarray]]]:
            for job in jobs:
                try:
                    data = job.read()
                    frames = frame_count(data)
                    if frames > 1:  # OpenCV would read frame 1 alone, and the mask would say nothing of it
                        raise DecodeError(f"{frames} frames (animated or multi-page {image_format(data)}); segdist "
                                          f"predicts single images: extract the frame you mean")
                    rgb = decode_rgb(data, reduced=False, orient=job.orient)
                except (DecodeError, OSError) as e:
                    skipped.append(f"{job.label} ({getattr(e, 'reason', e)})")
                    bar.update()
                    continue
                yield Source(data, rgb.shape[:2], job.orient), (job, rgb)

        for (job, rgb), p in predictor.run(readable()):
            pred = predictor.labels(p).cpu().numpy()
            atomic_write_bytes(out / "masks" / job.name, mask_png(pred, meta.binary, pal))
            if overlays:
                ov = cv2.cvtColor(overlay(rgb, pred, meta.num_classes), cv2.COLOR_RGB2BGR)
                atomic_write_bytes(out / "overlays" / job.name, png(ov))
            if probs:
                for rel, data in prob_files(job.name, p.cpu().numpy(), probs).items():
                    atomic_write_bytes(out / "probs" / rel, data)
            done += 1
            bar.update()
    wrote = [f"{out}/{d}" for d, on in (("masks", True), ("overlays", overlays), ("probs", probs)) if on]
    msg = f"predicted {done} image(s) into {' and '.join(wrote)} ({describe_options(predictor.opts)})"
    if skipped:
        msg += f"; skipped {len(skipped)} unreadable: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"
    return msg
