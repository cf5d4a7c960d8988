"""Exact segmentation metrics: integer counts in, one reduce across ranks, scores out.

Shaped like torchvision's ``ConfusionMatrix``: :meth:`SegCounts.update` adds a ``bincount`` of
``K * truth + pred`` to an int64 confusion matrix (``ignore_index`` pixels excluded),
:meth:`SegCounts.reduce` sums it across processes with one ``all_reduce``, and
:meth:`SegCounts.compute` turns it into per-class TP/FP/FN, IoU and Dice. Because only integer
counts cross ranks, the result is identical for any world size and any batch split; per-batch or
per-rank scores are never averaged.

Binary tasks are counted as two classes (0 = background, 1 = foreground); their headline
``iou``/``dice`` is the foreground class, as in the classic recipe. Multi-class headline scores
are the macro mean over classes present in the ground truth or the prediction; a class absent
from both has no score (``None``) and is left out of the mean. ``micro_*`` pool all classes.
"""

from __future__ import annotations

import torch

from .shards import IGNORE_INDEX


class SegCounts:
    """The int64 confusion matrix ``cm`` (K, K) (rows: truth, columns: prediction) over non-ignored
    pixels; per-class ``tp, fp, fn, tn`` (:attr:`counts`, (4, K)) and scores derive from it."""

    def __init__(self, num_classes: int, binary: bool, ignore_index: int = IGNORE_INDEX,
                 device: torch.device | str = "cpu"):
        self.num_classes, self.binary, self.ignore_index = num_classes, binary, ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.num_samples = 0

    @property
    def counts(self) -> torch.Tensor:
        """(4, K) int64: tp, fp, fn, tn per class."""
        tp = self.cm.diagonal()
        fp, fn = self.cm.sum(0) - tp, self.cm.sum(1) - tp
        return torch.stack([tp, fp, fn, self.cm.sum() - tp - fp - fn])

    def confusion(self) -> torch.Tensor:
        """(K, K) float64 on the CPU: each truth row normalised to sum 1 (rows of absent classes 0)."""
        cm = self.cm.cpu().double()
        return cm / cm.sum(1, keepdim=True).clamp_min(1)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer class ids (B, H, W), same shape; target may hold ``ignore_index``."""
        valid = target != self.ignore_index
        k = self.num_classes
        # Ignored pixels go to an extra bin k*k that is dropped: boolean indexing (pred[valid]) would
        # make the output size data-dependent, a device-to-host sync per batch.
        idx = torch.where(valid, target.long() * k + pred.long(), k * k)
        cm = torch.bincount(idx.flatten(), minlength=k * k + 1)[: k * k].reshape(k, k)  # rows: truth, cols: pred
        self.cm += cm.to(self.cm.device)
        self.num_samples += target.shape[0]

    def reduce(self, accelerator=None) -> None:
        """Sum counts (and the sample count) over all processes: one collective call."""
        if accelerator is None or accelerator.num_processes == 1:
            return
        flat = torch.cat([self.cm.flatten(), self.cm.new_tensor([self.num_samples])])
        flat = accelerator.reduce(flat.to(accelerator.device), reduction="sum").to(self.cm.device)
        self.cm = flat[:-1].reshape(self.num_classes, self.num_classes)
        self.num_samples = int(flat[-1])

    def compute(self, class_names: list[str] | None = None) -> dict:
        """Scores from counts. ``per_class`` holds every class, with None where it is absent.

        ``iou``/``dice``: means over the classes in the truth or the predictions (binary: the
        foreground only); ``iou_present``: mean IoU over the classes the masks hold; ``pixel_acc``:
        correct / counted pixels (all classes, ignored pixels excluded); ``micro_*``: from summed counts.
        """
        names = class_names or [str(i) for i in range(self.num_classes)]
        tp, fp, fn, _ = (c.double() for c in self.counts.cpu())
        per_class = []
        for i in range(self.num_classes):
            denom = tp[i] + fp[i] + fn[i]
            iou = float(tp[i] / denom) if denom > 0 else None
            dice = float(2 * tp[i] / (2 * tp[i] + fp[i] + fn[i])) if denom > 0 else None
            per_class.append({"name": names[i], "iou": iou, "dice": dice, "tp": int(tp[i]),
                              "fp": int(fp[i]), "fn": int(fn[i])})
        scored = per_class[1:] if self.binary else per_class
        present = [c for c in scored if c["iou"] is not None]
        mean = lambda key: sum(c[key] for c in present) / len(present) if present else float("nan")  # noqa: E731
        stp, sfp, sfn = (float(x[1:].sum() if self.binary else x.sum()) for x in (tp, fp, fn))
        micro_den = stp + sfp + sfn
        in_truth = [c["iou"] for c in scored if c["tp"] + c["fn"] > 0]
        total = float(self.cm.sum())
        return {
            "iou": mean("iou"),
            # classes the split's masks hold (a class only ever predicted is left out here, kept in "iou")
            "iou_present": sum(in_truth) / len(in_truth) if in_truth else float("nan"),
            "pixel_acc": float(tp.sum()) / total if total else float("nan"),
            "dice": mean("dice"),
            "micro_iou": stp / micro_den if micro_den else float("nan"),
            "micro_dice": 2 * stp / (2 * stp + sfp + sfn) if micro_den else float("nan"),
            "per_class": per_class,
            "num_samples": self.num_samples,
            "confusion": self.confusion().tolist(),  # (K, K), rows: truth, normalised
        }


def logits_to_pred(logits: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) logits -> (B, H, W) int64 class ids (C == 1: sigmoid > 0.5)."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(1)
