"""Optimiser and scheduler factories (registries), with separate encoder/decoder learning rates.

Schedulers are stepped once per optimiser step (after accumulation), so ``total_steps`` is the
number of optimiser steps of the whole run as this rank sees it; the same on every rank.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from timm.utils import ModelEmaV3
from torch import nn

from .config import OptimConfig
from .registry import Registry

OPTIMIZERS: Registry[Callable] = Registry("optim.name", {
    "adamw": lambda groups, c: torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay),
    "adam": lambda groups, c: torch.optim.Adam(groups, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum,
                                             weight_decay=c.weight_decay, nesterov=c.momentum > 0),
})


def param_groups(cfg: OptimConfig, model: nn.Module) -> list[dict]:
    """Encoder params at ``encoder_lr`` (default ``lr``), everything else (decoder, head) at ``lr``."""
    encoder = getattr(model, "encoder", None)
    enc_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    enc = [p for p in model.parameters() if id(p) in enc_ids and p.requires_grad]
    rest = [p for p in model.parameters() if id(p) not in enc_ids and p.requires_grad]
    groups = [{"params": enc, "lr": cfg.encoder_lr or cfg.lr, "name": "encoder"},
              {"params": rest, "lr": cfg.lr, "name": "decoder"}]
    return [g for g in groups if g["params"]]


def create_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS.pick(cfg.name)(param_groups(cfg, model), cfg)


def check_optim_config(cfg: OptimConfig) -> None:
    """``optim.name`` and ``optim.scheduler`` name registered things (UserError naming the key otherwise)."""
    OPTIMIZERS.check(cfg.name)
    SCHEDULERS.check(cfg.scheduler)


def _warmup_then(decay: Callable[[float], float], cfg: OptimConfig, total: int):
    """LR factor: linear warmup over ``warmup_steps``, then ``decay(t)`` for t in [0, 1]."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return decay(min((step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps), 1.0))
    return f


def _cosine(t: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * t))


def _poly(t: float, power: float = 0.9) -> float:
    return (1 - t) ** power


SCHEDULERS: Registry[Callable] = Registry("optim.scheduler", {
    "cosine": lambda opt, c, total: torch.optim.lr_scheduler.LambdaLR(opt, _warmup_then(_cosine, c, total)),
    "poly": lambda opt, c, total: torch.optim.lr_scheduler.LambdaLR(opt, _warmup_then(_poly, c, total)),
    "constant": lambda opt, c, total: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
    "onecycle": lambda opt, c, total: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=max(total, 1),
        # OneCycleLR divides by each phase's length: keep both phases at least 2 steps long.
        pct_start=min(0.3, max(c.warmup_steps, 2) / total) if c.warmup_steps and total else 0.3),
})


def create_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    return SCHEDULERS.pick(cfg.scheduler)(optimizer, cfg, total_steps)


class EMA(ModelEmaV3):
    """Exponential moving average of a model's weights, for evaluation: timm's ``ModelEmaV3``.

    timm moves the parameters ``1 - d_n`` of the way to the model's with one fused ``_foreach_lerp_``
    and copies the buffers (``exclude_buffers``: BatchNorm statistics stay current, not averaged).
    The decay is TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` warm-up, counted here in
    a Python int (nothing read back from the device): the first update copies the weights, the n-th
    later one uses ``d_n = min(decay, (1 + n) / (10 + n))``. Without a warm-up the average still
    holds ``decay ** n`` of the initial weights (a random decoder) after n steps -- 10 % after 230
    steps at 0.99, most of a short fine-tuning run; timm's own warm-up (``use_warmup``) is a power
    law that stays lower for thousands of steps.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, decay=decay, foreach=True, exclude_buffers=True)
        self.module.requires_grad_(False)
        self.updates = 0

    def get_decay(self, step: int | None = None) -> float:
        n = self.updates
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        super().update(model)
        self.updates += 1

    def state_dict(self, *args, **kwargs) -> dict:
        """The averaged model's tensors (no ``module.`` prefix) and the update count."""
        return {**self.module.state_dict(), "ema_updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict, strict: bool = True):
        state = dict(state)
        self.updates = int(state.pop("ema_updates"))  # one sync, at resume only
        return self.module.load_state_dict(state, strict=strict)
