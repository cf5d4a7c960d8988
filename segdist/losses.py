"""Loss factory: ``create_loss(cfg, out_channels)`` over a registry of SMP losses.

Every loss takes logits (B, C, H, W) float and a target (B, H, W) int64 with
``IGNORE_INDEX`` marking void/padding pixels, which contribute nothing.
"""

from __future__ import annotations

from typing import Callable

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from . import IGNORE_INDEX
from .config import LossConfig
from .errors import UserError


class BCE(nn.Module):
    """Binary cross-entropy on logits (B, 1, H, W), ignore pixels masked out of the mean."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != IGNORE_INDEX
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], (target == 1).to(logits.dtype),
                                                  reduction="none")
        return (loss * valid).sum() / valid.sum().clamp_min(1)


class CE(nn.Module):
    """Cross-entropy over non-ignored pixels; 0 (not NaN) when a batch has none."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
        return loss / (target != IGNORE_INDEX).sum().clamp_min(1)


class Dice(nn.Module):
    """SMP's soft Dice (binary or multi-class), with ignore_index support."""

    def __init__(self, binary: bool):
        super().__init__()
        self.loss = smp.losses.DiceLoss("binary" if binary else "multiclass", from_logits=True,
                                        ignore_index=IGNORE_INDEX)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), target)


class Sum(nn.Module):
    """Weighted sum of losses; keeps the parts for logging."""

    def __init__(self, parts: dict[str, tuple[float, nn.Module]]):
        super().__init__()
        self.weights = {k: w for k, (w, _) in parts.items()}
        self.parts = nn.ModuleDict({k: m for k, (_, m) in parts.items()})

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[k] * m(logits, target) for k, m in self.parts.items())


def _ce(binary: bool) -> nn.Module:
    return BCE() if binary else CE()


LOSSES: dict[str, Callable[[LossConfig, bool], nn.Module]] = {
    "dice_bce": lambda c, b: Sum({"dice": (c.dice_weight, Dice(b)), "bce": (c.ce_weight, _ce(b))}),
    "dice_ce": lambda c, b: Sum({"dice": (c.dice_weight, Dice(b)), "ce": (c.ce_weight, _ce(b))}),
    "bce": lambda c, b: _ce(b),
    "ce": lambda c, b: _ce(b),
    "dice": lambda c, b: Dice(b),
}


def create_loss(cfg: LossConfig, out_channels: int) -> nn.Module:
    """``out_channels`` 1 = binary (sigmoid), K = multi-class; ``auto`` picks Dice+BCE / Dice+CE."""
    binary = out_channels == 1
    name = cfg.name if cfg.name != "auto" else ("dice_bce" if binary else "dice_ce")
    if name not in LOSSES:
        raise UserError(f"unknown loss '{name}'; choose one of {', '.join(LOSSES)}")
    return LOSSES[name](cfg, binary)
