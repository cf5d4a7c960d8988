"""Exact evaluation over a shard split: per-epoch validation and ``segdist eval``.

Every sample of the split is read exactly once across all ranks (see :mod:`segdist.stream`);
each rank adds integer TP/FP/FN/TN counts, one all-reduce sums them, and only then are scores
computed, so 1 and N processes give identical numbers.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from .augment import DeviceAugment
from .checkpoint import read_meta
from .config import Config, config_from_dict
from .decode import to_device
from .distributed import make_accelerator
from .loader import OneEpoch
from .losses import create_loss
from .metrics import SegCounts, logits_to_pred
from .models import load_model
from .shards import ShardSet, open_shards
from .stream import ShardStream

__all__ = ["evaluate", "val_loader", "evaluate_checkpoint"]


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
                                     world_size=accelerator.num_processes,
                                     batch_size=batch_size or cfg.data.val_batch_size, num_workers=num_workers)
    return OneEpoch(stream, 0, 0, prefetch=cfg.data.prefetch)


def format_metrics(split: str, metrics: dict) -> str:
    lines = [f"{split}: IoU {metrics['iou']:.4f}  Dice {metrics['dice']:.4f}  ({metrics['num_samples']} samples)"]
    for c in metrics["per_class"]:
        iou = "absent" if c["iou"] is None else f"{c['iou']:.4f}"
        lines.append(f"  {c['name']:>20}: IoU {iou}  tp {c['tp']} fp {c['fp']} fn {c['fn']}")
    return "\n".join(lines)


def evaluate_checkpoint(ckpt: str, shards: str, split: str = "val", batch_size: int = 0,
                        num_workers: int = -1, as_json: bool = False) -> dict:
    """``segdist eval``: exact metrics of a saved model on a shard split (1 or N processes)."""
    meta = read_meta(ckpt)
    cfg = config_from_dict(meta["config"])
    cfg.data.shards = shards
    exact_kernels()
    accelerator = make_accelerator(mixed_precision=cfg.train.mixed_precision)
    shard_set = open_shards(shards)
    model = load_model(ckpt).to(accelerator.device)
    loss_fn = create_loss(cfg.loss, 1 if meta["binary"] else meta["num_classes"])
    try:
        metrics, _ = evaluate(model, val_loader(cfg, shard_set, split, accelerator, batch_size, num_workers),
                              accelerator, DeviceAugment(cfg.augment, train=False), loss_fn,
                              meta["num_classes"], meta["binary"], meta["class_names"])
    finally:
        accelerator.end_training()  # destroys the process group (NCCL warns otherwise)
    if accelerator.is_main_process:
        keys = ("iou", "dice", "micro_iou", "micro_dice", "per_class", "num_samples", "loss")
        print(json.dumps({k: metrics[k] for k in keys}) if as_json else format_metrics(split, metrics))
    return metrics
