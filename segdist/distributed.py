"""What every rank must agree on: the Accelerator, BatchNorm statistics, per-step decisions.

DDP keeps gradients in sync, but anything a rank decides alone (skip this step, stop now)
must be decided by all ranks together or the next collective hangs (or the weights diverge).
:func:`any_rank` agrees on a device flag without a host sync (the per-step skip); :func:`agree`
brings host flags (a stop signal) to every rank and reads the result: a sync, so the training
loop calls it only at its reads (``segdist.step``).
"""

from __future__ import annotations

import os
import signal
import threading

import torch
from accelerate import Accelerator

__all__ = ["make_accelerator", "train_precision", "sync_buffers", "agree", "any_rank", "StopSignal"]


def make_accelerator(**kw) -> Accelerator:
    """Accelerator that also forms a process group on CPU-only machines.

    Accelerate only picks MULTI_CPU (gloo) when told to run on the CPU; without ``cpu=True`` a
    CPU-only ``accelerate launch --num_processes 2`` gives two independent single processes.
    ``mixed_precision="auto"`` leaves the choice to ``accelerate launch`` / its config file.
    """
    no_gpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    if kw.get("mixed_precision") == "auto":
        kw["mixed_precision"] = None  # Accelerate reads ACCELERATE_MIXED_PRECISION set by `accelerate launch`
    return Accelerator(cpu=no_gpu, **kw)


@torch.no_grad()
def sync_buffers(model: torch.nn.Module, accelerator) -> None:
    """Average floating-point buffers (BatchNorm running stats) over ranks, in one all-reduce.

    DDP broadcasts rank 0's buffers at the start of each forward, but each rank then updates
    them with its own batch, so after the last step the ranks hold different BN statistics.
    Averaging them (as timm's ``distribute_bn`` does) makes every rank evaluate, and rank 0
    save, the same model.
    """
    if accelerator.num_processes == 1:
        return
    bufs = [b for b in model.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = accelerator.reduce(torch.cat([b.flatten().float() for b in bufs]), reduction="mean")
    for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
        b.copy_(v.view_as(b))


def train_precision(setting: str) -> str:
    """``train.mixed_precision`` for training: ``auto`` is what ``accelerate launch`` set
    (``--mixed_precision``, its config file), else bf16 on a CUDA GPU that has it, else no.
    (``segdist eval`` keeps ``auto`` as Accelerate reads it: exact scores do not follow the GPU.)"""

    if setting != "auto" or os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "auto"


def any_rank(accelerator, flag: torch.Tensor) -> torch.Tensor:
    """``flag`` (a 0-dim bool device tensor) set on *any* rank, as a device tensor: one all-reduce
    queued on the device (NCCL), no host sync; the flag itself on one process."""
    if accelerator.num_processes == 1:
        return flag
    t = flag.float()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t > 0


def agree(accelerator, *flags) -> list[bool]:
    """For each flag (a bool or a 0-dim tensor on any rank): is it set on *any* rank?

    One all-reduce of a tiny tensor and one device sync, whatever the number of flags.
    """
    dev = accelerator.device
    t = torch.stack([torch.as_tensor(f, device=dev).float().reshape(()) for f in flags])
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return (t > 0).tolist()


class StopSignal:
    """SIGUSR1 / SIGTERM ask for a pause: the loop finishes its step, saves, and exits for requeue.

    SLURM sends USR1 ahead of the time limit (``--signal=USR1@120``) and TERM on preemption;
    the default action of both kills the process at once, without a state. The handler only
    records the request: the training loop reads :attr:`requested` at its reads (every
    ``train.log_every`` steps, see ``segdist.step``) through :func:`agree`, so every rank stops after
    the same step even if only one got the signal.
    """

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
