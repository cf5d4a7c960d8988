"""segdist's real training loop, measured: ``segdist bench train``'s segdist side and its ``--sweep``.

The trainer is the one ``segdist train`` builds (:func:`segdist.train.setup` from a config), and
the measured steps are :func:`segdist.train.train_one_epoch` over epochs of a fixed number of
batches: the same augmentation, the same non-finite guard and optimiser, the same reads every
``train.log_every`` steps, the same CUDA prefetch. A warm-up epoch first (it compiles
with ``--compile``: its time is reported as ``compile_s``), then the timed epoch, whose record gives
images/s and the data-wait share (the clock stops at the epoch's last read, a device sync).

The sweep runs one batch size after the other in one fresh process, over the source's shards
repeated so that every loader worker delivers several full batches per epoch, until the batch
sizes end or the GPU runs out of memory. ``mfu`` is the model's FLOPs per image (forward + backward,
counted by ``torch.utils.flop_counter``) times images/s over the GPU's dense bf16 peak.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import load_config
from ..distributed import StopSignal
from ..loader import Loader
from ..memory import tune_malloc
from ..resume import Loop
from ..stream import ShardStream
from ..train import setup, train_one_epoch
from .common import PeakRss

BF16_PEAK_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "A100": 312, "L40S": 362,
                    "L4": 121, "A10G": 70, "A10": 125, "B200": 2250, "RTX 4090": 165}
"""Dense bf16 tensor-core peaks (NVIDIA data sheets, no sparsity), matched against the device name in this order."""

COURSE_AUGMENT_KW = {"hflip": 0.5, "vflip": 0.5, "crop_p": 0.0, "color_p": 0.0}
"""The course's augmentation (albumentations HorizontalFlip + VerticalFlip) as segdist's augment keys, so
both loops of the comparison train the same recipe; segdist's default crop + colour jitter cost ~0.8 s per
16-image batch on one CPU thread (the colour jitter's HSV round trip most of it), which is recipe, not step
speed. The sweep trains segdist's default recipe."""


def peak_tflops(name: str | None) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if name and k in name), None)


class Take:
    """The first ``n`` batches of a loader epoch, as ``train_one_epoch`` takes an epoch (``len`` and one pass)."""

    def __init__(self, batches, n: int):
        self.batches, self.n = batches, min(n, len(batches))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(iter(self.batches), self.n)


def repeats(samples: int, batch: int, workers: int, batches: int) -> int:
    """How many times to repeat the shards so an epoch holds ``batches`` full batches and every worker
    (each reads its own part of the shards) at least two."""
    return math.ceil((max(batches, 2 * max(workers, 1)) + max(workers, 1)) * batch / max(samples, 1))


def trainer_for(args, shard_dir: str, out: Path, course: bool, owned: contextlib.ExitStack):
    """``segdist train``'s trainer for these bench options (``course``: the course's recipe, Adam(3e-3) and flips);
    ``owned`` holds its run folder's lock."""

    recipe = ["optim.name=adam", "optim.lr=3e-3", "optim.weight_decay=0"] if course else []
    recipe += [f"augment.{k}={v}" for k, v in COURSE_AUGMENT_KW.items()] if course else []
    cfg = load_config(None, [f"data.shards={shard_dir}", f"data.image_size={args.size}",
                             f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
                             f"data.decode={args.decode}", "model.pretrained=none", "track.backend=none",
                             f"train.out_dir={out}", "train.name=bench", "train.overlays=0",
                             f"train.mixed_precision={args.precision}", f"model.channels_last={args.channels_last}",
                             f"train.compile={args.compile}", "optim.scheduler=constant", *recipe])
    return setup(cfg, StopSignal(), owned)


def epochs_of(t, urls: list[str], sizes: list[int], args, batch: int, stack):
    """``run(n)``: one ``train_one_epoch`` of ``n`` batches of ``batch`` (next epoch each call); returns its record."""

    times = repeats(sum(sizes), batch, args.workers, max(args.steps, args.warmup))
    stream = ShardStream(urls * times, sizes * times, batch_size=batch, image_size=args.size, train=True,
                         num_workers=args.workers, device_decode=args.decode == "device")
    loader = stack.enter_context(Loader(stream, prefetch=t.cfg.data.prefetch))
    state = {"loop": Loop(), "epoch": 0}

    def run(n: int) -> dict:
        loop = state["loop"]
        loop, record = train_one_epoch(t, Take(loader.epoch(state["epoch"]), n), loop)
        state["loop"], state["epoch"] = loop, state["epoch"] + 1
        return record

    return run


def flops_per_image(t, size: int) -> float:
    """Forward + backward FLOPs of one image through the model and the loss (matmuls and convolutions)."""

    model = t.accelerator.unwrap_model(t.model, keep_torch_compile=False)
    dev = t.accelerator.device
    x, y = torch.zeros(2, 3, size, size, device=dev), torch.zeros(2, size, size, dtype=torch.long, device=dev)
    with FlopCounterMode(display=False) as counter:
        t.loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def sweep(args, urls: list[str], sizes: list[int], shard_dir: str) -> dict:
    """In a fresh process: each batch size of ``args.sweep``: warm-up epoch, timed epoch; stops at out-of-memory."""

    os.environ.setdefault("TQDM_DISABLE", "1")
    tune_malloc()  # as `segdist train` starts
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    rows = []
    with tempfile.TemporaryDirectory(prefix="segdist-sweep-") as tmp, contextlib.ExitStack() as owned:
        t = trainer_for(args, shard_dir, Path(tmp), course=False, owned=owned)
        flops = flops_per_image(t, args.size)
        gpu = torch.cuda.get_device_name() if cuda else None
        peak = peak_tflops(gpu)
        for batch in args.sweep:
            row = {"batch": batch}
            try:
                with contextlib.ExitStack() as stack:
                    run = epochs_of(t, urls, sizes, args, batch, stack)
                    warm = run(args.warmup) if args.warmup else {}
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    with PeakRss() as rss:
                        timed = run(args.steps)
                row |= {"img_s": round(timed["img_s"], 2), "data_wait": round(timed["data_wait"], 4),
                        "compile_s": round(warm.get("compile_s", 0.0) + timed.get("compile_s", 0.0), 1),
                        "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.mb, 1),
                        "mfu": round(timed["img_s"] * flops / (peak * 1e12), 4) if peak else None}
            except torch.OutOfMemoryError:
                row["oom"] = True
            rows.append(row)
            t.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            if row.get("oom"):
                break
    return {"rows": rows, "flops_per_image": flops, "gpu": gpu, "bf16_peak_tflops": peak,
            "torch_threads": torch.get_num_threads()}


def format_sweep_table(r: dict) -> str:
    lines = [f"segdist bench train --sweep: segdist's training loop (default recipe), size {r['size']}, "
             f"{r['steps']} timed steps after {r['warmup']} warm-up, {r['workers']} workers, precision "
             f"{r['precision']}, channels_last {r['channels_last']}, compile {r['compile']}; on "
             f"{r.get('gpu') or 'the CPU'}; {r['flops_per_image'] / 1e9:.1f} GFLOP per image (fwd + bwd)",
             f"{'batch':>6} {'img/s':>9} {'data-wait':>10} {'compile s':>10} {'peak MB':>10} {'MFU':>7}"]
    for row in r["rows"]:
        if row.get("oom"):
            lines.append(f"{row['batch']:>6} out of memory")
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
        lines.append(f"{row['batch']:>6} {row['img_s']:>9.1f} {100 * row['data_wait']:>9.1f}% "
                     f"{row['compile_s']:>10.1f} {row['peak_mem_mb']:>10.0f} {mfu:>7}")
    return "\n".join(lines)


def timed_segdist(args, urls: list[str], sizes: list[int], shard_dir: str, stack):
    """The comparison's segdist side: ``run(n)`` trains ``n`` batches of ``args.batch`` through the trainer's
    epoch (course recipe); returns the seconds spent waiting for data (its clock is the caller's)."""
    t = trainer_for(args, shard_dir, Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="segdist-"))),
                    course=True, owned=stack)
    run_epoch = epochs_of(t, urls, sizes, args, args.batch, stack)

    def run(n: int) -> float:
        record = run_epoch(n)
        return record["data_wait"] * n * args.batch / record["img_s"]  # the share of the epoch's own clock

    return run
