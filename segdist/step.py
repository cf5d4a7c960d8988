"""The optimiser step without a host sync, and the read that settles it (``train.py``'s loop calls these).

A CUDA step is queued, not waited for: the host runs ahead and the GPU never idles between steps,
as long as nothing reads a device value back. So the step decides on the device:

* **skip**: a step whose loss (on any rank) or gradient norm is not finite is skipped by the fused
  optimiser itself (``found_inf``: weights, moments and step counts stay as they were); the LR
  (:class:`~segdist.optim.DeviceSchedule`), the EMA and the loss sums follow the steps taken;
* **counters**: steps taken, skipped, skipped in a row, loss sums, live on the device.

:meth:`Steps.read` is the one sync: every ``train.log_every`` tried steps, before each periodic
save and at the epoch end (see :meth:`Steps.due`). Every rank reads at the same steps, so a stop
signal (agreed at a read) stops every rank after the same step; BatchNorm statistics that turned
non-finite go back to the last read's (:class:`BufferGuard`), so no state saves them.

:func:`compile_forward_loss` is the model + loss under ``train.compile``; :class:`Meter` the host's
clock (data wait, images, compile time).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from .distributed import any_rank
from .evaluate import exact_kernels
from .optim import DeviceSchedule

__all__ = ["BufferGuard", "Meter", "Progress", "Steps", "compile_forward_loss", "kernels_for_eval"]

COMPILE_MODES = ("none", "default", "max-autotune", "reduce-overhead")


@dataclass
class Progress:
    """What one read found on the device, since the previous read."""

    taken: int  # optimiser steps taken
    skipped: int  # ... and skipped (non-finite)
    run: int  # skipped in a row up to now (not reset by reads)
    loss_sum: float  # summed loss of the micro-batches of the steps taken
    loss_batches: int
    buffers_ok: bool  # BatchNorm statistics finite (else put back to the previous read's)


class BufferGuard:
    """Floating-point buffers (BatchNorm running statistics) kept as of the last good read.

    A forward pass over non-finite activations writes non-finite running statistics, and the
    model keeps them even though the step is skipped; a read that finds them puts back the
    statistics of the read before (at most ``log_every`` steps older), here and in the EMA copy.
    """

    def __init__(self, model: torch.nn.Module, ema=None):
        self.device = next(model.parameters()).device
        self.bufs = [b for b in model.buffers() if b.is_floating_point()]
        self.ema_bufs = [b for b in ema.module.buffers() if b.is_floating_point()] if ema is not None else []
        self.saved = [b.detach().clone() for b in self.bufs]

    def finite(self) -> torch.Tensor:
        if not self.bufs:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.stack(torch._foreach_norm(self.bufs, 1)).isfinite().all()

    def keep(self) -> None:
        if self.bufs:
            torch._foreach_copy_(self.saved, self.bufs)

    def restore(self) -> None:
        if self.bufs:
            torch._foreach_copy_(self.bufs, self.saved)
        if self.ema_bufs:
            torch._foreach_copy_(self.ema_bufs, self.saved)


class Steps:
    """Optimiser steps decided on the device; the host knows only how many it *tried* since the last read."""

    def __init__(self, accelerator, model, optimizer, scheduler, ema, grad_clip: float, log_every: int,
                 checkpoint_every: int = 0):
        self.acc, self.model, self.optimizer, self.ema, self.grad_clip = accelerator, model, optimizer, ema, grad_clip
        self.every = tuple(n for n in (log_every, checkpoint_every) if n > 0)
        device = accelerator.device
        self.schedule = DeviceSchedule(optimizer, scheduler, log_every, device)
        self.inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimiser inside Accelerate's wrapper
        self.buffers = BufferGuard(self._bare(), ema)
        zero = torch.zeros((), dtype=torch.float32, device=device)
        self.loss_sum, self.loss_batches, self.skipped, self.run = (zero.clone() for _ in range(4))
        self.group_loss: torch.Tensor | None = None
        self.tried = 0  # optimiser steps tried since the last read (host)

    def _bare(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model, keep_torch_compile=False)

    def start(self, step: int) -> None:
        """At the start of an epoch (``step`` optimiser steps taken so far, as the host scheduler has them)."""
        self.schedule.start(step, advance=False)
        self.buffers.keep()

    def add(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss into its accumulation group's sum (no new zeros per group)."""
        # A copy: with train.compile=reduce-overhead the loss lives in a CUDA graph's output buffer.
        loss = loss.detach().float()
        self.group_loss = loss.clone() if self.group_loss is None else self.group_loss + loss

    def step(self, micro_batches: int) -> None:
        """Clip, decide the skip, step the optimiser, LR and EMA, count: all queued on the device."""
        bad = any_rank(self.acc, ~torch.isfinite(self.group_loss))  # every rank must skip alike
        params = [p for p in self.model.parameters() if p.grad is not None]
        fp16 = self.acc.mixed_precision == "fp16"
        if fp16:  # GradScaler sets found_inf itself, from the gradients: make a bad loss show there
            params[0].grad.add_(torch.where(bad, float("nan"), 0.0))
        norm = self._clip(params)
        bad = bad | ~torch.isfinite(norm)  # the gradients are all-reduced: the same on every rank
        if not fp16:
            self.inner.found_inf = bad.float()
        try:
            self.schedule.step(self.optimizer, self.tried)
        finally:
            if not fp16:
                del self.inner.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_on_device(self._bare(), bad)
        self.schedule.took(bad)
        self.loss_sum += torch.where(bad, 0.0, self.group_loss)
        self.loss_batches += ~bad * micro_batches
        self.skipped += bad
        self.run = torch.where(bad, self.run + 1, 0.0)
        self.group_loss, self.tried = None, self.tried + 1

    def _clip(self, params: list) -> torch.Tensor:
        """Global gradient norm (0-dim, on the device), clipped to ``optim.grad_clip`` when that is set."""
        if self.grad_clip > 0:
            return self.acc.clip_grad_norm_(params, self.grad_clip)  # unscales fp16 gradients first
        self.acc.unscale_gradients()  # fp16: the norm of the real gradients (a no-op otherwise)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def due(self, step: int, epoch_end: bool) -> bool:
        """Read now? At the epoch end, and when ``step`` (taken at the last read) plus the steps tried
        since reaches a multiple of ``log_every`` or ``checkpoint_every``. The same on every rank. The
        tried count is an upper bound of the steps taken, so no multiple is passed without a read."""
        at = step + self.tried
        return epoch_end or any(at % n == 0 for n in self.every)

    def read(self, step: int) -> Progress:
        """The sync: the device's counters since the last read; then the LR table for the next steps."""
        finite = self.buffers.finite()
        values = torch.stack([self.schedule.taken.float(), self.skipped, self.run, self.loss_sum,
                              self.loss_batches, finite.float()]).tolist()
        taken, skipped, run, loss_sum, batches, ok = values
        p = Progress(int(taken), int(skipped), int(run), loss_sum, int(batches), ok > 0)
        if p.buffers_ok:
            self.buffers.keep()
        else:
            self.buffers.restore()
        for t in (self.loss_sum, self.loss_batches, self.skipped):
            t.zero_()
        self.tried = 0
        self.schedule.start(step + p.taken)
        return p


def compile_forward_loss(model: torch.nn.Module, loss_fn, mode: str):
    """``(x, y) -> loss_fn(model(x), y)``, through ``torch.compile`` unless ``mode`` is ``none``.

    Model and loss in one graph (its backward compiled with it). ``dynamic=False``: one static
    graph per batch shape -- one per epoch, two in an elastic epoch (B and B - 1 samples) -- and
    ``reduce-overhead`` records a CUDA graph per shape.
    """
    def forward_loss(x, y):
        return loss_fn(model(x), y)

    if mode == "none":
        return forward_loss
    return torch.compile(forward_loss, mode=None if mode == "default" else mode, dynamic=False)


@contextlib.contextmanager
def kernels_for_eval():
    """Exact kernels for the duration (``segdist.evaluate.exact_kernels``), the training ones after:
    cuDNN autotuning suits fixed-shape training, not scores that must not depend on the batch."""

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32)
    exact_kernels()
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = saved


class Meter:
    """The host's side of the epoch: images, time waiting for data, compile time, and the loss the
    reads bring in. ``window`` covers the optimiser steps since the last log line, ``epoch`` the
    whole epoch, so every log line carries its data-wait share, as torchvision's ``log_every`` does.
    """

    def __init__(self, compiled: bool = False):
        self.t0 = self.t_window = time.perf_counter()
        self.wait = self.wait_window = self.compile = self.compile_window = 0.0
        self.samples = self.samples_window = 0
        self.loss = [0.0, 0]  # epoch: (summed loss, micro-batches) of the steps taken
        self.loss_window = [0.0, 0]
        self.compiled, self.shapes = compiled, set()
        self.decode: dict = {}  # JPEGs the device decoder refused (decoded on the CPU instead)

    def wait_for(self, it):
        t0 = time.perf_counter()
        batch = next(it)
        dt = time.perf_counter() - t0
        self.wait += dt
        self.wait_window += dt
        return batch

    @contextlib.contextmanager
    def first_of_shape(self, shape: tuple):
        """Times the block when ``shape`` is new and the step is compiled: that is when torch.compile
        compiles (host time; the block's own kernels are a rounding error next to it)."""
        new = self.compiled and shape not in self.shapes
        self.shapes.add(shape)
        t0 = time.perf_counter()
        yield
        if new:
            dt = time.perf_counter() - t0
            self.compile += dt
            self.compile_window += dt

    def add(self, n: int) -> None:
        self.samples += n
        self.samples_window += n

    def settle(self, p: Progress) -> None:
        for acc in (self.loss, self.loss_window):
            acc[0] += p.loss_sum
            acc[1] += p.loss_batches

    def window(self, **extra) -> dict:
        """The log line's figures; images/s and data wait leave out compile time (reported apart)."""
        now = time.perf_counter()
        dt = max(now - self.t_window - self.compile_window, 1e-9)
        loss = self.loss_window[0] / max(self.loss_window[1], 1)
        rec = {"event": "train", **extra, "loss": loss, "img_s": self.samples_window / dt,
               "data_wait": self.wait_window / dt}
        self.t_window, self.wait_window, self.samples_window, self.loss_window = now, 0.0, 0, [0.0, 0]
        self.compile_window = 0.0
        return rec

    def epoch(self, world_size: int) -> dict:
        elapsed = max(time.perf_counter() - self.t0 - self.compile, 1e-9)
        rec = {"train_loss": self.loss[0] / max(self.loss[1], 1), "img_s": self.samples * world_size / elapsed,
               "data_wait": self.wait / elapsed, **self.decode}
        return rec | ({"compile_s": round(self.compile, 2)} if self.compiled else {})
