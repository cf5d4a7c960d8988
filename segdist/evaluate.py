"""Exact evaluation over a shard split: per-epoch validation and ``segdist eval``.

Every sample of the split is read exactly once across all ranks (see :mod:`segdist.stream`);
each rank adds integer TP/FP/FN/TN counts, one all-reduce sums them, and only then are scores
computed, so 1 and N processes give identical numbers.

:func:`evaluate_checkpoint` (``segdist eval``, default ``--mode stream``) scores the batched
network inputs (``data.image_size``); :func:`evaluate_native` (``--mode resize|sliding``) and
:func:`evaluate_full_res` (``--full-res``, and ``train.eval_full_res`` each epoch through
:func:`native_metrics`) score at each sample's native resolution, predicting exactly as
``segdist predict`` does (:class:`segdist.infer.Predictor`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .atomic import atomic_write_text
from . import storage
from .augment import DeviceAugment
from .checkpoint import read_meta
from .config import Config, config_from_dict
from .decode import decode_mask, to_device
from .distributed import make_accelerator
from .infer import Options, Predictor, Source, describe_options, options_for
from .loader import OneEpoch
from .losses import create_loss
from .metrics import SegCounts, logits_to_pred
from .models import load_model
from .resize import as_hw
from .shards import ShardSet, image_bytes, mask_bytes, open_shards, read_samples
from .shards.classes import same_classes
from .shards.fingerprint import class_table
from .stream import ShardStream, iter_units
from .track import plot_confusion

__all__ = ["eval_session", "evaluate", "evaluate_checkpoint", "evaluate_full_res", "evaluate_native",
           "native_metrics", "report", "stream_metrics", "val_loader", "val_samples", "write_outputs"]


@torch.no_grad()
def evaluate(model, loader, accelerator, aug, loss_fn, num_classes: int, binary: bool,
             class_names: list[str], overlays: int = 0) -> tuple[dict, dict]:
    """Exact metrics over the whole split: counts summed per rank, one reduce, then scores.

    Returns (metrics, samples) where samples holds up to ``overlays`` (image, gt, pred) from the
    first batches of the main process, for the overlay grid.
    """
    model.eval()
    counts = SegCounts(num_classes, binary, device=accelerator.device)
    loss_sum = torch.zeros((), device=accelerator.device)  # float32: MPS has no float64
    n = 0  # samples, counted on the host: no device sync per batch
    shown = {"images": [], "gts": [], "preds": []}
    for batch in loader:
        image, mask = to_device(batch, accelerator.device)
        x, y = aug(image, mask)
        with accelerator.autocast():
            logits = model(x)
        loss_sum += loss_fn(logits.float(), y) * len(y)
        n += len(y)
        pred = logits_to_pred(logits)
        counts.update(pred, y)
        if accelerator.is_main_process and len(shown["images"]) < overlays:
            k = overlays - len(shown["images"])
            shown["images"] += list(image[:k].permute(0, 2, 3, 1).cpu().numpy())  # decoded (data.decode=device too)
            shown["gts"] += list(y[:k].cpu().numpy().astype(np.uint8))
            shown["preds"] += list(pred[:k].cpu().numpy().astype(np.uint8))
    counts.reduce(accelerator)  # the one collective of evaluation: integer counts only
    totals = torch.stack([loss_sum, torch.tensor(float(n), device=accelerator.device)])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    result = counts.compute(class_names)
    result["loss"] = float(totals[0] / totals[1].clamp_min(1))
    return result, shown


def exact_kernels() -> None:
    """Kernels whose results do not depend on batch shape: `segdist eval` must give the same
    counts on 1 and N processes, and cuDNN autotuning or TF32 could flip a few pixels."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def val_loader(cfg: Config, shards: ShardSet, split: str, accelerator, batch_size: int = 0, num_workers: int = -1):
    """This rank's share of ``split``, every sample once across ranks (last batch may be short)."""
    stream = ShardStream.from_config(*shards.split(split), cfg.data, train=False, rank=accelerator.process_index,
                                     world_size=accelerator.num_processes, ids=shards.identity(split),
                                     batch_size=batch_size or cfg.data.eval_batch_size, num_workers=num_workers)
    return OneEpoch(stream, 0, 0, prefetch=cfg.data.prefetch)


def val_samples(cfg: Config, shards: ShardSet, split: str, accelerator, num_workers: int = -1) -> tuple[int, Iterator]:
    """This rank's raw samples of ``split`` (dicts of ``__key__``, ``image.jpg|png``, ``mask.png``
    bytes) and how many: the val plan of :class:`ShardStream`, every sample exactly once across
    ranks, its slots read one after another in this process."""
    urls, sizes = shards.split(split)
    ids = shards.identity(split)
    stream = ShardStream.from_config(urls, sizes, cfg.data, train=False, rank=accelerator.process_index,
                                     world_size=accelerator.num_processes, num_workers=num_workers, ids=ids)
    units = [u for plan in stream.plans(0) for u in plan.units]
    read = lambda shard: read_samples(urls[shard], ids[shard], cfg.data.read_timeout, stream.max_member)
    return sum(u.size for u in units), iter_units(read, tuple(units))


@dataclass
class EvalSession:
    """What evaluating a checkpoint needs, from :func:`eval_session`."""

    meta: dict
    cfg: Config
    accelerator: object
    shards: ShardSet
    model: torch.nn.Module


@contextlib.contextmanager
def eval_session(ckpt: str, shards: str) -> Iterator[EvalSession]:
    """A saved model on this process's device, its meta and config, the shard set and the
    accelerator (exact kernels: counts must not depend on batch shapes); the process group is
    destroyed on the way out (NCCL warns otherwise)."""
    meta = read_meta(ckpt)
    cfg = config_from_dict(meta.config.to_dict())  # a copy: data.shards is set to the shards evaluated on
    cfg.data.shards = shards
    exact_kernels()
    accelerator = make_accelerator(mixed_precision=cfg.train.mixed_precision)
    try:
        storage.configure_from(cfg.data)  # the training run's s3 endpoint, retries and cache
        shard_set = open_shards(shards)
        if shard_set.task is not None:  # a pattern without a manifest states no classes
            same_classes(meta.class_table, class_table(shard_set), f"model '{ckpt}'", f"shards '{shards}'",
                         "evaluate it on shards built with its classes (segdist shards build --classes)")
        yield EvalSession(meta, cfg, accelerator, shard_set, load_model(ckpt).to(accelerator.device))
    finally:
        accelerator.end_training()


def format_metrics(split: str, metrics: dict) -> str:
    at = f" at {metrics['resolution']}" if "resolution" in metrics else ""
    acc = f"  pixel acc {metrics['pixel_acc']:.4f}" if "pixel_acc" in metrics else ""
    lines = [(f"{split}{at}: IoU {metrics['iou']:.4f}  Dice {metrics['dice']:.4f}{acc}  "
              f"({metrics['num_samples']} samples)")]
    for c in metrics["per_class"]:
        iou = "absent" if c["iou"] is None else f"{c['iou']:.4f}"
        lines.append(f"  {c['name']:>20}: IoU {iou}  tp {c['tp']} fp {c['fp']} fn {c['fn']}")
    return "\n".join(lines)


def report(split: str, metrics: dict, accelerator, as_json: bool = False) -> None:
    """Print the scores once (main process): a table, or one JSON object."""
    if not accelerator.is_main_process:
        return
    keys = ("iou", "dice", "iou_present", "pixel_acc", "micro_iou", "micro_dice", "per_class", "num_samples", "loss",
            "resolution", "input_res")
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}) if as_json else format_metrics(split, metrics))


def write_outputs(metrics: dict, out: str | Path, title: str = "") -> None:
    """``segdist eval --out DIR``: ``metrics.json`` (everything printed, with the per-class table and the
    normalised confusion matrix) and ``confusion.png``; each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    plot_confusion(metrics["confusion"], [c["name"] for c in metrics["per_class"]], out / "confusion.png", title)


def evaluate_checkpoint(ckpt: str, shards: str, split: str = "val", batch_size: int = 0,
                        num_workers: int = -1, as_json: bool = False) -> dict:
    """``segdist eval``: exact metrics of a saved model on a shard split (1 or N processes), at the
    network input size: the squashed (or cropped) batches validation sees."""
    with eval_session(ckpt, shards) as s:
        metrics = stream_metrics(s, split, batch_size, num_workers)
        report(split, metrics, s.accelerator, as_json)
    return metrics


def stream_metrics(s: EvalSession, split: str = "val", batch_size: int = 0, num_workers: int = -1) -> dict:
    """Exact metrics of the session's model on ``split`` as validation sees it (``data.image_size``)."""
    loss_fn = create_loss(s.cfg.loss, 1 if s.meta.binary else s.meta.num_classes)
    metrics, _ = evaluate(s.model, val_loader(s.cfg, s.shards, split, s.accelerator, batch_size, num_workers),
                          s.accelerator, DeviceAugment(s.cfg.augment, train=False), loss_fn,
                          s.meta.num_classes, s.meta.binary, s.meta.class_names)
    h, w = as_hw(s.cfg.data.image_size)
    metrics["resolution"] = f"the network input {h}x{w} (data.resize {s.cfg.data.resize})"
    return metrics


# ------------------------------------------------------------------------------ native resolution
def evaluate_native(ckpt: str | Path, shards: str, split: str = "val", mode: str = "sliding", batch_size: int = 0,
                    num_workers: int = -1, as_json: bool = False, **options) -> dict:
    """``segdist eval --mode resize|sliding`` (``--full-res`` = ``--mode resize``): exact metrics at each
    sample's native resolution, see :func:`native_metrics`. ``options``: ``overlap``, ``blend``, ``tta``,
    ``threshold``. ``batch_size``: windows per batch (0: the checkpoint's validation batch size).
    """
    with eval_session(ckpt, shards) as s:
        opts = options_for(s.meta, mode, **options)
        metrics = native_metrics(s.model, s.meta, opts, s.cfg, s.shards, s.accelerator, split,
                                 batch_size or s.cfg.data.eval_batch_size, num_workers)
        report(split, metrics, s.accelerator, as_json)
    return metrics


def evaluate_full_res(ckpt: str | Path, shards: str, split: str = "val", batch_size: int = 0, num_workers: int = -1,
                      as_json: bool = False, **options) -> dict:
    """``segdist eval --full-res``: both resolutions from one session; the headline is full resolution
    (``--mode resize``: logits resized to each stored mask), the network-input scores ride along
    under ``"input_res"`` (training's ``train.eval_full_res`` keeps the same, its loss at the top level)."""
    with eval_session(ckpt, shards) as s:
        at_input = stream_metrics(s, split, batch_size, num_workers)
        opts = options_for(s.meta, "resize", **options)
        metrics = native_metrics(s.model, s.meta, opts, s.cfg, s.shards, s.accelerator, split,
                                 batch_size or s.cfg.data.eval_batch_size, num_workers)
        metrics = with_input_res(metrics, at_input, "loss")
        if s.accelerator.is_main_process and not as_json:
            print(format_metrics(split, at_input))
        report(split, metrics, s.accelerator, as_json)
        if s.accelerator.is_main_process and not as_json:
            print(f"headline (full resolution): IoU {metrics['iou']:.4f} (network input: {at_input['iou']:.4f})")
    return metrics


INPUT_RES_KEYS = ("iou", "dice", "iou_present", "pixel_acc", "per_class", "resolution")
"""The network-input scores kept beside a full-resolution headline (``--full-res``, ``train.eval_full_res``)."""


def with_input_res(full: dict, at_input: dict, *extra: str) -> dict:
    """``full`` (the headline) with ``at_input``'s :data:`INPUT_RES_KEYS` (+ ``extra``) under ``"input_res"``."""
    return {**full, "input_res": {k: at_input[k] for k in (*INPUT_RES_KEYS, *extra) if k in at_input}}


def native_metrics(model, meta: dict, opts: Options, cfg, shards, accelerator, split: str = "val",
                   batch_size: int = 8, num_workers: int = -1, progress: bool = True) -> dict:
    """Exact metrics of ``model`` on ``split`` at each sample's stored (native) resolution.

    Each rank predicts its share of ``split`` (the val plan: every sample exactly once across
    ranks) as ``segdist predict`` does, one image per batch group so its result does not depend
    on the rank layout, counts TP/FP/FN/TN against the native-size mask and joins one reduce.
    Used by ``segdist eval`` and, with ``train.eval_full_res``, by every evaluation in training.
    """
    predictor = Predictor(model, meta, opts, accelerator.device, batch_size, accelerator.autocast)
    counts = SegCounts(meta.num_classes, meta.binary, device=accelerator.device)
    total, samples = val_samples(cfg, shards, split, accelerator, num_workers)
    items = ((Source(image_bytes(smp), mask.shape, orient=False), mask)
             for smp in samples for mask in [decode_mask(mask_bytes(smp))])
    show = progress and accelerator.is_main_process
    with tqdm(total=total, unit="image", desc="eval", disable=None if show else True, leave=False) as bar:
        for mask, probs in predictor.run(items, per_image=True):
            target = torch.from_numpy(mask).to(accelerator.device)
            counts.update(predictor.labels(probs)[None], target[None])
            bar.update()
    counts.reduce(accelerator)  # the one collective: integer counts only
    metrics = counts.compute(meta.class_names)
    metrics["resolution"] = f"native ({describe_options(opts)})"
    return metrics
