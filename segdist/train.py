"""The training loop: a plain PyTorch loop under Accelerate, like nanoGPT and Accelerate's examples.

``run(cfg)`` reads top to bottom: :func:`setup` takes the run folder (its lock) and builds everything
without writing, :func:`resume_or_start` finds where to begin (or refuses, leaving the folder as it
was), :func:`open_run` writes the config, then ``for epoch:`` calls :func:`train_one_epoch` and
:func:`evaluate_and_save`, logs, and saves a resumable state. Each helper returns what it
changed (a new :class:`Loop`); nothing is mutated behind the caller's back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import storage
from .augment import DeviceAugment
from .card import write_model_card
from .checkpoint import ModelMeta, repair_run_folder, save_model, save_state
from .config import Config, save_config
from .decode import device_batches
from .distributed import StopSignal, agree, make_accelerator, sync_buffers, train_precision
from .errors import Paused, UserError
from .evaluate import evaluate, native_metrics, val_loader, with_input_res
from .infer import options_for
from .loader import Loader
from .losses import check_loss_config, class_weights, create_loss
from .models import check_model_config, create_model
from .optim import EMA, check_optim_config, create_optimizer, create_scheduler
from .shards import ShardSet, open_shards
from .shards.classes import out_channels_for
from .shards.fingerprint import check_disjoint, class_table, fingerprint, summary
from .resume import Loop, resume_or_start, scored_at
from .runlock import hold_run_folder
from .step import Meter, Steps, compile_forward_loss, kernels_for_eval
from .stream import ShardStream, batches_per_epoch
from .track import RunLog, init_trackers, overlay_grid, plot_confusion, plot_curves, tracker_names

__all__ = ["Loop", "evaluate_and_save", "run", "train_one_epoch"]

@dataclass
class Trainer:
    """Everything the loop's helpers share, built once by :func:`setup`."""

    cfg: Config
    stop: StopSignal
    accelerator: object
    run_dir: Path
    shards: ShardSet
    meta: ModelMeta  # what using the model needs (config, classes), saved beside each model
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: EMA | None
    loss_fn: torch.nn.Module
    train_aug: DeviceAugment
    eval_aug: DeviceAugment
    log: RunLog
    steps_per_epoch: int
    forward_loss: object  # (x, y) -> loss: model + loss, compiled with train.compile
    steps: Steps  # the optimiser step on the device, and its reads
    channels_last: bool
    dataset: dict = dataclasses.field(default_factory=dict)  # the shard set's fingerprint, saved in every state

    @property
    def states_dir(self) -> Path:
        return self.run_dir / "states"

    @property
    def extras(self) -> dict:
        """Modules saved beside each state as safetensors (the EMA weights)."""
        return {"ema": self.ema} if self.ema is not None else {}

    def eval_model(self) -> torch.nn.Module:
        # keep_torch_compile=False: the default would rewire the compiled module to skip DDP.
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(
            self.model, keep_torch_compile=False)


# ------------------------------------------------------------------------------ the run
def run(cfg: Config) -> dict:
    """Train ``cfg``; returns the last evaluation's metrics (main and other ranks alike)."""
    # From here on SIGUSR1/SIGTERM pause the run instead of killing it; `owned` holds the run folder's lock.
    with StopSignal() as stop, contextlib.ExitStack() as owned:
        t = setup(cfg, stop, owned)
        acc, metrics = t.accelerator, {}
        loop = resume_or_start(cfg, acc, t.run_dir, t.extras, t.log, t.dataset)
        if loop.epoch >= cfg.train.epochs:  # a finished run started again (a requeue, fewer epochs): say so, no more
            acc.print(f"{t.run_dir} has finished {loop.epoch} epoch(s) (step {loop.step}) and train.epochs is "
                      f"{cfg.train.epochs}: nothing to train; raise train.epochs to continue it")
            acc.end_training()
            return {}
        open_run(t)
        acc.print(describe_run(t))
        # One loader for the whole run: its workers decode on into the next epoch while this one ends.
        with Loader(train_stream(t, loop), start_epoch=loop.epoch, end_epoch=cfg.train.epochs,
                    start_batch=loop.batch, prefetch=cfg.data.prefetch) as loader:
            for epoch in range(loop.epoch, cfg.train.epochs):
                loop, record = train_one_epoch(t, loader.epoch(epoch), loop)
                if loop.epoch % cfg.train.eval_every == 0 or loop.epoch == cfg.train.epochs:
                    metrics, best_iou = evaluate_and_save(t, loop)
                    loop = dataclasses.replace(loop, best_iou=best_iou, best_at=scored_at(cfg))
                    record |= val_record(metrics, t.meta.binary)
                t.log.log(record, loop.step)
                acc.print(summary_line(record))
                save(t, loop)
                if acc.is_main_process:
                    plot_curves(t.log.path, t.run_dir / "curves.png")
        acc.end_training()
    if metrics:
        acc.print(f"final val IoU {metrics['iou']:.4f}  Dice {metrics['dice']:.4f}  "
                  f"(best IoU {loop.best_iou:.4f}; model in {t.run_dir / 'best'})")
    return metrics


def train_one_epoch(t: Trainer, batches, loop: Loop) -> tuple[Loop, dict]:
    """One epoch from ``loop.batch`` on; returns the new position and the epoch's record."""
    cfg, acc, model, steps = t.cfg, t.accelerator, t.model, t.steps
    acc_n, first, end = cfg.optim.accumulate, loop.batch, loop.batch + len(batches)
    set_train_mode(model, cfg.model.freeze_bn)
    meter = Meter(compiled=cfg.train.compile != "none")
    steps.start(loop.step)
    bar = tqdm(total=end, initial=first, desc=f"epoch {loop.epoch}", leave=False,
               disable=not acc.is_local_main_process or bool(os.environ.get("TQDM_DISABLE")))
    it = device_batches(batches, acc.device, meter.decode)  # on CUDA copied ahead on a side stream
    for i in range(first, end):
        x, y = t.train_aug(*meter.wait_for(it))
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Accumulation groups end every `accumulate` batches and at the epoch end; DDP only
        # all-reduces gradients on a group's last micro-batch.
        last = (i + 1) % acc_n == 0 or i + 1 == end
        group = acc_n if i // acc_n < end // acc_n else end % acc_n
        with contextlib.nullcontext() if last else acc.no_sync(model), meter.first_of_shape(x.shape):
            with acc.autocast():
                loss = t.forward_loss(x, y)  # model + loss (one compiled graph with train.compile)
            acc.backward(loss / group)
        steps.add(loss)
        meter.add(len(y))
        bar.update(1)
        if not last:
            continue
        steps.step(group)  # clip, step or skip (non-finite), LR, EMA: all queued, nothing read back
        # The host reads the device's counters every log_every steps, before a periodic save and at
        # the epoch end: the loop's only sync. Every rank reads at the same steps.
        if not steps.due(loop.step, i + 1 == end):
            continue
        loop, stop = settle(t, dataclasses.replace(loop, batch=i + 1), meter, bar)
        if stop:
            pause(t, loop)  # a state at this same step on every rank, then exit for requeue
        if cfg.train.checkpoint_every and loop.step % cfg.train.checkpoint_every == 0 and i + 1 < end:
            save(t, loop)
    bar.close()
    record = {"event": "epoch", "epoch": loop.epoch + 1, **meter.epoch(acc.num_processes), **device_memory(acc),
              **storage_record(t)}
    return dataclasses.replace(loop, epoch=loop.epoch + 1, batch=0, carry=[]), record


def settle(t: Trainer, loop: Loop, meter: Meter, bar) -> tuple[Loop, bool]:
    """A read (:meth:`Steps.read`): the steps taken and skipped since the last one; logs the window
    when it ends on a logging step, stops a run whose steps keep failing, and says whether a stop
    signal reached any rank."""
    p = t.steps.read(loop.step)
    meter.settle(p)
    loop = dataclasses.replace(loop, step=loop.step + p.taken, nonfinite=loop.nonfinite + p.skipped,
                               nonfinite_run=p.run)
    if not p.buffers_ok:
        t.accelerator.print(f"step {loop.step}: non-finite BatchNorm statistics put back to the previous read's")
    if p.skipped:
        t.log.log({"event": "nonfinite", "epoch": loop.epoch, "count": loop.nonfinite}, loop.step)
        if loop.nonfinite_run >= t.cfg.train.max_nonfinite:
            stop_nonfinite(t, loop)
    if loop.step % t.cfg.train.log_every == 0 and loop.nonfinite_run == 0:
        record = meter.window(epoch=loop.epoch, lr=t.scheduler.get_last_lr()[-1])
        t.log.log(record, loop.step)
        bar.set_postfix(loss=f"{record['loss']:.4f}", wait=f"{100 * record['data_wait']:.0f}%")
    (stop,) = agree(t.accelerator, t.stop.requested)  # one tiny all-reduce: every rank stops at this step
    return loop, stop


def pause(t: Trainer, loop: Loop) -> None:
    """Save a state at this step (all ranks together) and raise :class:`Paused` (exit 75: requeue me)."""
    path = save(t, loop)
    t.accelerator.end_training()
    why = t.stop.received or "a stop signal on another process"
    raise Paused(f"paused by {why} at step {loop.step} (epoch {loop.epoch}, batch {loop.batch}); state saved in "
                 f"{path}. Run the same command with train.resume=auto to continue exactly there")


def stop_nonfinite(t: Trainer, loop: Loop) -> None:
    """Save the last good weights (all ranks) and stop with a message that names the fixes."""
    path = save(t, loop)
    t.accelerator.end_training()
    raise UserError(f"loss was non-finite for {loop.nonfinite_run} consecutive steps ({loop.nonfinite} in all); "
                    f"stopped with the last good weights saved in {path}. Lower optim.lr, set optim.grad_clip, "
                    f"or use train.mixed_precision=bf16")


def save(t: Trainer, loop: Loop) -> Path:
    """A resumable state at ``loop`` (all ranks together), with the EMA weights and the dataset fingerprint."""
    return save_state(t.accelerator, t.states_dir, loop.step, dataclasses.asdict(loop), t.cfg.train.keep_last,
                      t.extras, {"dataset": t.dataset})


def evaluate_and_save(t: Trainer, loop: Loop) -> tuple[dict, float]:
    """Exact val metrics; ``last/`` and (when IoU improves) ``best/``; the overlay grid.

    Returns the metrics and the best IoU so far.
    """
    acc, best_iou = t.accelerator, loop.best_iou
    model = t.eval_model()
    sync_buffers(model, acc)
    with kernels_for_eval():
        metrics, shown = evaluate(model, val_loader(t.cfg, t.shards, "val", acc), acc, t.eval_aug, t.loss_fn,
                                  t.meta.num_classes, t.meta.binary, t.meta.class_names,
                                  overlays=t.cfg.train.overlays)
        if t.cfg.train.eval_full_res:
            metrics = full_res_metrics(t, model, metrics)
    iou = metrics["iou"]
    improved = not math.isnan(iou) and iou > best_iou
    if acc.is_main_process:
        save_model(model, t.run_dir / "last", t.meta)
        if improved or not (t.run_dir / "best").exists():
            save_model(model, t.run_dir / "best", t.meta)
            write_model_card(t.run_dir / "best", t.meta, {**metrics, "epoch": loop.epoch})
        plot_confusion(metrics["confusion"], t.meta.class_names, t.run_dir / "confusion.png",
                       f"val, epoch {loop.epoch}")
        t.log.log_png("val/confusion", t.run_dir / "confusion.png", loop.step)
        if shown["images"]:
            images = [np.ascontiguousarray(im) for im in shown["images"]]
            t.log.log_overlays(overlay_grid(images, shown["gts"], shown["preds"], t.meta.num_classes), images,
                               shown["gts"], shown["preds"], t.meta.class_names, loop.step, loop.epoch)
    return metrics, iou if improved else best_iou


def full_res_metrics(t: Trainer, model, at_input: dict) -> dict:
    """``train.eval_full_res``: the val split scored at each mask's stored resolution (the headline),
    with the network-input scores ``at_input`` kept under ``"input_res"``."""
    cfg = t.cfg
    opts = options_for(t.meta, "resize", tta="" if cfg.train.eval_tta == "none" else cfg.train.eval_tta)
    full = native_metrics(model, t.meta, opts, cfg, t.shards, t.accelerator, "val",
                          cfg.data.eval_batch_size, progress=False)
    return {**with_input_res(full, at_input), "loss": at_input["loss"]}


# ------------------------------------------------------------------------------ set-up
def setup(cfg: Config, stop: StopSignal, owned: contextlib.ExitStack) -> Trainer:
    """The run folder's lock (held until ``owned`` closes), then accelerator, shards, model, optimiser,
    scheduler, EMA, losses, augmentation, logging. Writes nothing: a refused start leaves the folder as it was."""
    # Names that pick from a registry are checked where the registry lives, before anything is built.
    check_model_config(cfg.model)
    check_loss_config(cfg.loss)
    check_optim_config(cfg.optim)
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    acc = make_accelerator(mixed_precision=train_precision(cfg.train.mixed_precision),
                           log_with=tracker_names(cfg) or None, project_dir=str(run_dir),
                           step_scheduler_with_optimizer=False)
    note = owned.enter_context(hold_run_folder(acc, run_dir))  # before anything in run_dir is written
    for line in [note] * bool(note) + (repair_run_folder(run_dir) if acc.is_main_process else []):
        acc.print(line)
    set_seed(cfg.train.seed, device_specific=True)  # different augmentation per rank, reproducible per seed
    storage.configure_from(cfg.data)  # s3:// endpoint, retries, cache: before any read, inherited by loader workers
    shards = open_shards(cfg.data.shards)  # manifest.json read once per process
    check_disjoint(shards)
    out_ch = out_channels_for(cfg, shards)
    dataset = fingerprint(shards)
    cuda = acc.device.type == "cuda"
    channels_last = cuda if cfg.model.channels_last == "auto" else cfg.model.channels_last
    torch.backends.cudnn.benchmark = cuda  # fixed-shape training: cuDNN times its kernels once per shape
    model = create_model(cfg.model, out_ch)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(cfg.optim, model)
    steps_per_epoch = math.ceil(batches_per_epoch(shards.split("train")[1], cfg.data.batch_size,
                                                  acc.num_processes) / cfg.optim.accumulate)
    scheduler = create_scheduler(cfg.optim, optimizer, steps_per_epoch * cfg.train.epochs)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    ema = EMA(acc.unwrap_model(model), cfg.optim.ema) if cfg.optim.ema > 0 else None
    log = RunLog(acc, run_dir, cfg.track.backend)
    meta = ModelMeta(cfg, tuple(shards.class_names), shards.num_classes, out_ch == 1, shards.palette,
                     class_table(shards), summary(dataset, cfg.data.shards))
    loss_fn = create_loss(cfg.loss, out_ch, class_weights(shards.manifest, cfg.loss.class_weights))
    steps = Steps(acc, model, optimizer, scheduler, ema, cfg.optim.grad_clip, cfg.train.log_every,
                  cfg.train.checkpoint_every)
    return Trainer(cfg, stop, acc, run_dir, shards, meta, model, optimizer, scheduler, ema, loss_fn,
                   DeviceAugment(cfg.augment, train=True), DeviceAugment(cfg.augment, train=False), log,
                   steps_per_epoch, compile_forward_loss(model, loss_fn, cfg.train.compile), steps, channels_last,
                   dataset=dataset)


def open_run(t: Trainer) -> None:
    """The start is accepted: write the resolved config (its header names the data) and start the trackers."""
    if t.accelerator.is_main_process:
        save_config(t.cfg, t.run_dir / "config.yaml",
                    header=f"data: {t.cfg.data.shards} (fingerprint {t.dataset['digest'][:16]}; each state's "
                           f"dataset.json lists its shards)")
    init_trackers(t.accelerator, t.cfg, t.run_dir)


def train_stream(t: Trainer, loop: Loop) -> ShardStream:
    """This rank's training samples: shuffled per (seed, epoch), the same batch count on every rank;
    ``loop.carry`` holds what an elastic resume still owes of the current epoch."""
    acc = t.accelerator
    stream = ShardStream.from_config(*t.shards.split("train"), t.cfg.data, train=True, seed=t.cfg.train.seed,
                                     rank=acc.process_index, world_size=acc.num_processes,
                                     ids=t.shards.identity("train"),
                                     carry=tuple(loop.carry), carry_epoch=loop.epoch if loop.carry else None)
    if loop.carry and loop.batch == 0:
        left = sum(len(refs) for rank in stream.spread for refs, _ in rank)
        acc.print(f"epoch {loop.epoch}: the {left} samples the interrupted run had not trained yet are spread over "
                  f"{acc.num_processes} process(es), {stream.num_batches(loop.epoch)} batches each"
                  + (f"; {stream.dropped} did not fit evenly and are skipped" if stream.dropped else ""))
    return stream


def set_train_mode(model, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:  # running stats stay fixed; BN affine weights still train
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


# ------------------------------------------------------------------------------ logging
def val_record(metrics: dict, binary: bool) -> dict:
    """The logged val scores: the headline (full resolution with ``train.eval_full_res``), plus the
    network-input scores as ``val_input_*`` when both were measured."""
    rec = {"val_loss": metrics["loss"], "val_iou": metrics["iou"], "val_dice": metrics["dice"],
           "val_pixel_acc": metrics["pixel_acc"],
           **{f"val_iou/{c['name']}": c["iou"] for c in metrics["per_class"] if c["iou"] is not None}}
    if not binary:  # softmax classes: also the mean over the classes the masks hold
        rec["val_iou_present"] = metrics["iou_present"]
    if "input_res" in metrics:
        rec |= {f"val_input_{k}": metrics["input_res"][k] for k in ("iou", "dice", "pixel_acc")}
    return rec


def describe_run(t: Trainer) -> str:
    cfg, world = t.cfg, t.accelerator.num_processes
    bs, acc_n = cfg.data.batch_size, cfg.optim.accumulate
    n_train, n_val = (sum(t.shards.split(s)[1]) for s in ("train", "val"))
    return (f"{n_train} train / {n_val} val samples | world {world} x batch {bs} x accumulate {acc_n} = "
            f"global batch {world * bs * acc_n} | {t.steps_per_epoch} steps/epoch, "
            f"{t.steps_per_epoch * cfg.train.epochs} steps | lr {cfg.optim.lr}")


def summary_line(rec: dict) -> str:
    parts = [f"epoch {rec['epoch']}", f"train_loss {rec['train_loss']:.4f}"]
    parts += [f"{k} {rec[k]:.4f}" for k in ("val_loss", "val_iou", "val_dice", "val_iou_present", "val_pixel_acc",
                                          "val_input_iou") if k in rec]
    parts += [f"{rec['img_s']:.1f} img/s", f"data-wait {100 * rec['data_wait']:.0f}%"]
    if rec.get("storage/retries"):
        parts.append(f"{rec['storage/retries']:.0f} storage retries ({rec['storage/retry_s']:.1f} s)")
    if rec.get("decode_fallbacks"):
        parts.append(f"{rec['decode_fallbacks']} JPEGs decoded on the CPU (the device decoder refused them)")
    return " | ".join(parts)


def storage_record(t: Trainer) -> dict:
    """Object-storage traffic of all ranks since the last record (``s3://`` shards only): requests, MB,
    retries and the seconds they cost, cache hits. One all-reduce, at the same point on every rank."""
    if not storage.is_remote(t.cfg.data.shards):
        return {}
    names, values = storage.stats.take()
    total = t.accelerator.reduce(torch.tensor(values, device=t.accelerator.device), "sum")
    return {f"storage/{n}": round(v, 3) for n, v in zip(names, total.tolist())}


def device_memory(accelerator) -> dict:
    """Peak GPU memory of the epoch that just ended (the peak is reset for the next one)."""
    if accelerator.device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    torch.cuda.reset_peak_memory_stats(accelerator.device)
    return {"gpu_mem_gb": peak}
