"""Optimiser and scheduler factories (registries), with separate encoder/decoder learning rates.

Schedulers count optimiser steps really taken (after accumulation; a skipped non-finite step
does not count), so ``total_steps`` is the number of optimiser steps of the whole run as this
rank sees it; the same on every rank. The optimisers are PyTorch's fused ones: one kernel per
parameter group, and a ``found_inf`` flag on the device makes a step leave weights, moments and
step counts as they were, so the training step decides a skip without reading anything back
(:class:`DeviceSchedule` keeps the LR in step with the steps taken).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from timm.utils import ModelEmaV3
from torch import nn

from .config import OptimConfig
from .registry import Registry

OPTIMIZERS: Registry[Callable] = Registry("optim.name", {
    "adamw": lambda groups, c: torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay, fused=True),
    "adam": lambda groups, c: torch.optim.Adam(groups, lr=c.lr, weight_decay=c.weight_decay, fused=True),
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                             nesterov=c.momentum > 0, fused=True),
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
    opt = OPTIMIZERS.pick(cfg.name)(param_groups(cfg, model), cfg)
    if isinstance(opt, torch.optim.SGD) and cfg.momentum > 0:
        # Fused SGD allocates its momentum buffers uninitialised on the first step and fills them
        # there, unless found_inf skips that step: then the second step reads garbage. Zeros give
        # the first step's result exactly (0 * momentum + grad) and survive a skipped first step.
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return opt


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




class DeviceSchedule:
    """The LR schedule as the device reads it, so the optimiser step needs no host sync.

    At each read (:meth:`start`) the host scheduler is stepped once per optimiser step the device
    really took since the last read, then the next ``span`` steps' LRs are uploaded as a table.
    Between reads, :meth:`step` picks the table row by the steps taken since the read (a device
    counter that a skipped step does not advance), so a skipped step keeps its LR, as it would
    if the host had skipped ``scheduler.step()``. Hyper-parameters that a scheduler also cycles
    (OneCycleLR's ``betas``/``momentum``) are host floats of the fused kernels: they follow the
    steps *tried* since the read, which differ from the steps taken only after a skipped step,
    until the next read. The table is float64 on the CPU (its fused kernels read the LR as a
    double: bit-identical to a float LR) and float32 on CUDA (as its kernels read it).
    """

    HYPER = ("betas", "momentum")

    def __init__(self, optimizer, scheduler, span: int, device: torch.device):
        # the torch objects inside Accelerate's wrappers
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        self.scheduler, self.span = getattr(scheduler, "scheduler", scheduler), span
        self.dtype = torch.float64 if device.type == "cpu" else torch.float32
        self.taken = torch.zeros((), dtype=torch.int64, device=device)  # optimiser steps since the read
        self.at = 0  # the optimiser steps the host scheduler has been stepped to
        self.table: torch.Tensor | None = None
        self.hyper: list[list[dict]] = []

    def start(self, steps: int, advance: bool = True) -> None:
        """At a read: step the host scheduler to ``steps`` optimiser steps (``advance=False``: it is
        there already, as after set-up or a resume), then upload the next ``span`` steps' LRs."""
        for _ in range(steps - self.at if advance else 0):
            self.scheduler.step()
        self.at = steps
        rows = self._probe()
        lrs = torch.tensor([[g["lr"] for g in row] for row in rows], dtype=self.dtype)
        device = self.taken.device
        self.table = lrs.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else lrs
        self.hyper = [[{k: g[k] for k in self.HYPER if k in g} for g in row] for row in rows]
        self.taken.zero_()

    def _probe(self) -> list[list[dict]]:
        """The param groups' values now and after each of the next ``span`` scheduler steps (the
        scheduler and the groups are put back as they were)."""
        groups = self.optimizer.param_groups
        saved, values = self.scheduler.state_dict(), [dict(g) for g in groups]
        rows = [[dict(g) for g in groups]]
        with warnings.catch_warnings():  # "step() before optimizer.step()" at step 0: the probe only
            warnings.simplefilter("ignore")
            for _ in range(self.span):
                try:
                    self.scheduler.step()
                except ValueError:  # OneCycleLR past its last step, which real steps never reach
                    break
                rows.append([dict(g) for g in groups])
        self.scheduler.load_state_dict(saved)
        for g, v in zip(groups, values):
            g.update({k: v[k] for k in ("lr", *self.HYPER) if k in v})
        return rows + [rows[-1]] * (self.span + 1 - len(rows))

    def step(self, optimizer, tried: int) -> None:
        """``optimizer.step()`` with this step's LR read on the device (``tried``: steps tried since the read)."""
        groups = self.optimizer.param_groups
        # One gather on the device: each group's LR for this step. (index_select: indexing with a
        # 0-dim tensor, table[taken], would read the index back to the host.)
        lrs = self.table.index_select(0, self.taken.view(1))[0]
        host = [g["lr"] for g in groups]
        for g, lr, hyper in zip(groups, lrs.unbind(), self.hyper[tried]):
            g.update(hyper, lr=lr)
        try:
            optimizer.step()
        finally:  # the host scheduler, state_dict() and logging see float LRs
            for g, lr in zip(groups, host):
                g["lr"] = lr

    def took(self, skipped: torch.Tensor) -> None:
        self.taken += ~skipped


class EMA(ModelEmaV3):
    """Exponential moving average of a model's weights, for evaluation: timm's ``ModelEmaV3``.

    timm moves the parameters ``1 - d_n`` of the way to the model's with one fused ``_foreach_lerp_``
    and copies the buffers (``exclude_buffers``: BatchNorm statistics stay current, not averaged).
    The decay is TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` warm-up: the first update
    copies the weights, the n-th later one uses ``d_n = min(decay, (1 + n) / (10 + n))``. Without a
    warm-up the average still holds ``decay ** n`` of the initial weights (a random decoder) after n
    steps -- 10 % after 230 steps at 0.99, most of a short fine-tuning run; timm's own warm-up
    (``use_warmup``) is a power law that stays lower for thousands of steps.

    The training step calls :meth:`update_on_device`: the update count lives on the device, so a
    step skipped there (non-finite) leaves the average and the count unchanged, without a sync.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, decay=decay, foreach=True, exclude_buffers=True)
        self.module.requires_grad_(False)
        device = next(self.module.parameters()).device
        # float64: (1 + n) / (10 + n) as Python computes it, so both updates give the same bits
        self.count = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)

    @property
    def updates(self) -> int:
        return int(self.count)  # a sync: for state_dict (saving) and tests only

    def get_decay(self, step: int | None = None) -> float:
        n = self.updates
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        super().update(model)
        self.count += 1

    @torch.no_grad()
    def update_on_device(self, model: nn.Module, skipped: torch.Tensor) -> None:
        """:meth:`update` with the decay computed on the device; ``skipped`` (a 0-dim bool device
        tensor) makes it a no-op. The same arithmetic as :meth:`update` (bit-identical, tested)."""
        n = self.count
        decay = torch.where(n == 0, 0.0, ((1 + n) / (10 + n)).clamp(max=self.decay))
        weight = ((1 - decay) * ~skipped).float()  # the float32 a scalar weight becomes in the kernel
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], weight)
        torch._foreach_copy_(list(self.module.buffers()), list(model.buffers()))  # one kernel, not one per buffer
        self.count += ~skipped

    def state_dict(self, *args, **kwargs) -> dict:
        """The averaged model's tensors (no ``module.`` prefix) and the update count."""
        return {**self.module.state_dict(), "ema_updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict, strict: bool = True):
        state = dict(state)
        self.count.fill_(int(state.pop("ema_updates")))
        return self.module.load_state_dict(state, strict=strict)
