"""The training loop: a plain PyTorch loop under Accelerate, like nanoGPT and Accelerate's examples.

``run(cfg)`` builds everything through small helpers, then runs ``for epoch: for batch:`` with
augmentation on the device, gradient accumulation, clipping, a non-finite guard, an optimiser
step, logging, periodic resumable states, and exact evaluation every ``eval_every`` epochs.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .augment import DeviceAugment
from .checkpoint import find_resume, load_state, read_meta, save_model, save_state, torn_states
from .config import Config, save_config
from .errors import UserError
from .losses import create_loss
from .metrics import SegCounts, logits_to_pred
from .models import create_model, load_model
from .optim import create_optimizer, create_scheduler
from .decode import to_device
from .loader import Loader, make_loader
from .stream import ShardStream, batches_per_epoch, resolve_shards
from .track import RunLog, init_trackers, overlay_grid, plot_curves, tracker_names


# ------------------------------------------------------------------------------ helpers
def dataset_info(spec: str, splits: tuple[str, ...] = ("train", "val")) -> dict:
    """Task, classes and shard lists for ``splits`` from the shard manifest."""
    from .shards import read_manifest

    if not spec:
        raise UserError("config key 'data.shards' is empty; set it to a shard folder built with "
                        "`segdist shards build` (e.g. data.shards=runs/shards)")
    m = read_manifest(spec)
    info = {"task": m["task"], "num_classes": m["num_classes"], "class_names": m["class_names"]}
    for split in splits:
        info[split] = resolve_shards(spec, split)
    return info


def make_accelerator(**kw) -> Accelerator:
    """Accelerator that also forms a process group on CPU-only machines.

    Accelerate only picks MULTI_CPU (gloo) when told to run on the CPU; without ``cpu=True`` a
    CPU-only ``accelerate launch --num_processes 2`` gives two independent single processes.
    """
    no_gpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    if kw.get("mixed_precision") == "auto":
        kw["mixed_precision"] = None  # Accelerate reads ACCELERATE_MIXED_PRECISION set by `accelerate launch`
    return Accelerator(cpu=no_gpu, **kw)


def out_channels_for(cfg: Config, info: dict) -> int:
    """1 for binary (sigmoid), K for K classes; model.num_classes may restate it (1 or 2 for binary)."""
    want = 1 if info["task"] == "binary" else info["num_classes"]
    got = cfg.model.num_classes or want
    if got != want and not (info["task"] == "binary" and got == 2):
        raise UserError(f"config key 'model.num_classes' is {got} but the shards hold a {info['task']} task with "
                        f"{info['num_classes']} classes; use model.num_classes=0 (take it from the manifest)")
    return got


def set_train_mode(model, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:  # running stats stay fixed; BN affine weights still train
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def meta_for(cfg: Config, info: dict, out_ch: int) -> dict:
    return {"image_size": cfg.data.image_size, "mean": cfg.augment.mean, "std": cfg.augment.std,
            "class_names": info["class_names"], "num_classes": info["num_classes"],
            "binary": out_ch == 1, "config": cfg.to_dict()}


@torch.no_grad()
def evaluate(model, loader, accelerator, aug, loss_fn, num_classes: int, binary: bool,
             class_names: list[str], overlays: int = 0) -> tuple[dict, dict]:
    """Exact metrics over the whole split: counts summed per rank, one reduce, then scores.

    Returns (metrics, samples) where samples holds up to ``overlays`` (image, gt, pred) from the
    first batches of the main process, for the overlay grid.
    """
    model.eval()
    counts = SegCounts(num_classes, binary, device=accelerator.device)
    loss_sum = torch.zeros(2, device=accelerator.device)  # (sum, n); float32: MPS has no float64
    shown = {"images": [], "gts": [], "preds": []}
    for batch in loader:
        image, mask = to_device(batch, accelerator.device)
        x, y = aug(image, mask)
        with accelerator.autocast():
            logits = model(x)
        loss_sum += torch.stack([loss_fn(logits.float(), y) * len(y), loss_sum.new_tensor(len(y))])
        pred = logits_to_pred(logits)
        counts.update(pred, y)
        if accelerator.is_main_process and len(shown["images"]) < overlays:
            k = overlays - len(shown["images"])
            shown["images"] += list(image[:k].permute(0, 2, 3, 1).cpu().numpy())  # decoded (data.decode=device too)
            shown["gts"] += list(y[:k].cpu().numpy().astype(np.uint8))
            shown["preds"] += list(pred[:k].cpu().numpy().astype(np.uint8))
    counts.reduce(accelerator)  # the one collective of evaluation: integer counts only
    loss_sum = accelerator.reduce(loss_sum, reduction="sum") if accelerator.num_processes > 1 else loss_sum
    result = counts.compute(class_names)
    result["loss"] = float(loss_sum[0] / loss_sum[1].clamp_min(1))
    return result, shown


@torch.no_grad()
def sync_buffers(model, accelerator) -> None:
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


def val_loader(cfg: Config, info: dict, accelerator, batch_size: int = 0, num_workers: int = -1):
    urls, sizes = info["val"]
    return make_loader(urls, sizes, batch_size=batch_size or cfg.data.val_batch_size or cfg.data.batch_size,
                       image_size=cfg.data.image_size, train=False,
                       num_workers=cfg.data.num_workers if num_workers < 0 else num_workers,
                       rank=accelerator.process_index, world_size=accelerator.num_processes,
                       reduced_decode=cfg.data.reduced_decode, device_decode=cfg.data.decode == "device",
                       prefetch=cfg.data.prefetch)


def check_plan(saved: dict, now: dict, path: Path) -> None:
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
        raise UserError(f"cannot resume from {path}: the data plan changed ({what}); resume with the same "
                        f"processes, data.num_workers, data.batch_size, optim.accumulate and train.seed, "
                        f"or start a new run (train.name=...)")


def start_fresh(run_dir: Path, accelerator) -> None:
    """A new run in an old run folder: its states and metrics would mix with ours, so they go."""
    old = [p for p in (run_dir / "states", run_dir / "metrics.jsonl", run_dir / "overlays") if p.exists()]
    if old:
        accelerator.print(f"starting fresh in {run_dir}: removing the previous run's "
                          f"{', '.join(p.name for p in old)} (use train.resume=auto to continue it instead)")
    for p in old:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def all_finite(loss_sum, accelerator) -> bool:
    """True when the loss is finite on every rank (a scalar all-reduce and a device sync)."""
    bad = (~torch.isfinite(torch.as_tensor(loss_sum, device=accelerator.device))).float()
    return accelerator.reduce(bad, reduction="sum").item() == 0  # the only sync of the step


def evaluate_and_save(model, cfg: Config, info: dict, accelerator, aug, loss_fn, loop: dict, log: RunLog,
                      meta: dict) -> dict:
    """Exact val metrics; ``last/`` and (when IoU improves) ``best/`` model folders; overlay grid."""
    binary, num_classes = meta["binary"], meta["num_classes"]  # binary tasks count 2 classes
    sync_buffers(model, accelerator)
    metrics, shown = evaluate(model, val_loader(cfg, info, accelerator), accelerator, aug, loss_fn, num_classes,
                              binary, info["class_names"], overlays=cfg.train.overlays)
    if accelerator.is_main_process:
        run_dir = Path(cfg.train.out_dir) / cfg.train.name
        save_model(model, run_dir / "last", meta)
        iou = metrics["iou"]
        if (not math.isnan(iou) and iou > loop["best_iou"]) or not (run_dir / "best").exists():
            loop["best_iou"] = iou if not math.isnan(iou) else loop["best_iou"]
            save_model(model, run_dir / "best", meta)
        if shown["images"]:
            images = [np.ascontiguousarray(im) for im in shown["images"]]
            log.log_overlays(overlay_grid(images, shown["gts"], shown["preds"], num_classes), images, shown["gts"],
                             shown["preds"], info["class_names"], loop["step"], loop["epoch"])
    return metrics


def summary_line(epoch: int, rec: dict) -> str:
    parts = [f"epoch {epoch}", f"train_loss {rec['train_loss']:.4f}"]
    parts += [f"{k} {rec[k]:.4f}" for k in ("val_loss", "val_iou", "val_dice") if k in rec]
    parts += [f"{rec['img_s']:.1f} img/s", f"data-wait {100 * rec['data_wait']:.0f}%"]
    return " | ".join(parts)


# ------------------------------------------------------------------------------ the run
def run(cfg: Config) -> dict:
    """Train ``cfg``; returns the last evaluation's metrics (main and other ranks alike)."""
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    accelerator = make_accelerator(mixed_precision=cfg.train.mixed_precision, log_with=tracker_names(cfg) or None,
                                   project_dir=str(run_dir), step_scheduler_with_optimizer=False)
    # Different augmentation per rank, reproducible per seed.
    set_seed(cfg.train.seed, device_specific=True)
    info = dataset_info(cfg.data.shards)
    out_ch = out_channels_for(cfg, info)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    model = create_model(cfg.model, out_ch)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = create_loss(cfg.loss, out_ch)
    optimizer = create_optimizer(cfg.optim, model)
    steps_per_epoch = math.ceil(batches_per_epoch(info["train"][1], cfg.data.batch_size,
                                                  accelerator.num_processes) / cfg.optim.accumulate)
    total_steps = steps_per_epoch * cfg.train.epochs
    scheduler = create_scheduler(cfg.optim, optimizer, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = torch.optim.swa_utils.AveragedModel(
        accelerator.unwrap_model(model), multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.optim.ema)
    ) if cfg.optim.ema > 0 else None
    extras = {"ema": ema} if ema is not None else {}  # saved as safetensors beside the state
    if cfg.model.compile:
        model = torch.compile(model)
    train_aug, eval_aug = DeviceAugment(cfg.augment, train=True), DeviceAugment(cfg.augment, train=False)
    log = RunLog(accelerator, run_dir, cfg.track.backend)
    init_trackers(accelerator, cfg, run_dir)

    # Resume: model/optimiser/scheduler/scaler/RNG from accelerate, loop position from loop.json.
    states_dir = run_dir / "states"
    # The sample plan depends on these; a resume must see the same ones to continue exactly.
    # "stream": the sample-order version; 2 = take before shuffle (states saved by 1 resume differently)
    plan = {"world_size": accelerator.num_processes, "num_workers": cfg.data.num_workers,
            "batch_size": cfg.data.batch_size, "accumulate": cfg.optim.accumulate, "seed": cfg.train.seed,
            "stream": 2}
    loop = {"epoch": 0, "batch": 0, "step": 0, "best_iou": -1.0, "nonfinite": 0, "plan": plan}
    for torn in torn_states(states_dir):
        accelerator.print(f"ignoring torn state {torn} (left by a killed job)")
    resume = find_resume(cfg.train.resume, states_dir)
    if resume is not None:
        check_plan(json.loads((resume / "loop.json").read_text()).get("plan", plan), plan, resume)
        loop = load_state(accelerator, resume, extras)
        if accelerator.is_main_process:
            log.truncate_after(loop["step"])  # drop what the killed run logged after this state
        accelerator.print(f"resumed from {resume}: epoch {loop['epoch']}, batch {loop['batch']}, step {loop['step']}")
    elif accelerator.is_main_process:
        start_fresh(run_dir, accelerator)
    accelerator.wait_for_everyone()
    world, bs, acc_n = accelerator.num_processes, cfg.data.batch_size, cfg.optim.accumulate
    accelerator.print(f"{sum(info['train'][1])} train / {sum(info['val'][1])} val samples | world {world} x "
                      f"batch {bs} x accumulate {acc_n} = global batch {world * bs * acc_n} | "
                      f"{steps_per_epoch} steps/epoch, {total_steps} steps | lr {cfg.optim.lr}")
    meta = meta_for(cfg, info, out_ch)
    state = lambda: dict(loop)  # noqa: E731  -- snapshot for save_state
    metrics: dict = {}
    nonfinite_run = 0

    train_stream = ShardStream(*info["train"], batch_size=bs, image_size=cfg.data.image_size, train=True,
                               num_workers=cfg.data.num_workers, seed=cfg.train.seed, rank=accelerator.process_index,
                               world_size=world, shuffle_buffer=cfg.data.shuffle_buffer,
                               reduced_decode=cfg.data.reduced_decode, device_decode=cfg.data.decode == "device")
    # One loader for the whole run: its workers decode on into the next epoch while this one ends.
    with Loader(train_stream, start_epoch=loop["epoch"], end_epoch=cfg.train.epochs, start_batch=loop["batch"],
                prefetch=cfg.data.prefetch) as loader:
        for epoch in range(loop["epoch"], cfg.train.epochs):
            batches = loader.epoch(epoch)
            n_batches = loop["batch"] + len(batches)
            set_train_mode(model, cfg.model.freeze_bn)
            t_epoch, t_wait, seen, loss_total, loss_n = time.perf_counter(), 0.0, 0, 0.0, 0
            epoch_loss = torch.zeros(2, device=accelerator.device)  # (sum of batch losses, batches)
            bar = tqdm(total=n_batches, initial=loop["batch"], desc=f"epoch {epoch}",
                       disable=not accelerator.is_local_main_process, leave=False)
            it = iter(batches)
            for i in range(loop["batch"], n_batches):
                t0 = time.perf_counter()
                batch = next(it)
                t_wait += time.perf_counter() - t0
                image, mask = to_device(batch, accelerator.device)
                x, y = train_aug(image, mask)
                if cfg.model.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                # Accumulation groups end every `accumulate` batches and at the epoch end; DDP only
                # all-reduces gradients on a group's last micro-batch.
                last = (i + 1) % acc_n == 0 or i + 1 == n_batches
                group = acc_n if i // acc_n < n_batches // acc_n else n_batches % acc_n
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss = loss_fn(model(x), y)
                    accelerator.backward(loss / group)
                loss_total += loss.detach().float()
                loss_n += 1
                epoch_loss += torch.stack([loss.detach().float(), torch.ones((), device=loss.device)])
                seen += len(y)
                bar.update(1)
                if not last:
                    continue
                # Non-finite guard: every rank must agree (one scalar all-reduce), else DDP diverges.
                if not all_finite(loss_total, accelerator):
                    optimizer.zero_grad(set_to_none=True)
                    loop["nonfinite"] += 1
                    nonfinite_run += 1
                    loss_total, loss_n = 0.0, 0
                    log.log({"event": "nonfinite", "epoch": epoch, "count": loop["nonfinite"]}, loop["step"])
                    if nonfinite_run >= cfg.train.max_nonfinite:
                        path = save_state(accelerator, states_dir, loop["step"],
                                          {**state(), "epoch": epoch, "batch": i + 1}, cfg.train.keep_last, extras)
                        accelerator.end_training()
                        raise UserError(f"loss was non-finite for {nonfinite_run} consecutive steps "
                                        f"({loop['nonfinite']} in all); stopped with the last good weights saved "
                                        f"in {path}. Lower optim.lr, set optim.grad_clip, or use "
                                        f"train.mixed_precision=bf16")
                    continue
                nonfinite_run = 0
                if cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                if not optimizer.step_was_skipped:  # fp16 GradScaler skips overflowing steps
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(accelerator.unwrap_model(model, keep_torch_compile=False))
                loop["step"] += 1
                if loop["step"] % cfg.train.log_every == 0:
                    # .item() syncs with the device: only on logging steps.
                    lr = scheduler.get_last_lr()[-1]
                    log.log({"event": "train", "epoch": epoch, "loss": float(loss_total) / loss_n, "lr": lr},
                            loop["step"])
                    bar.set_postfix(loss=f"{float(loss_total) / loss_n:.4f}", lr=f"{lr:.2e}")
                if cfg.train.checkpoint_every and loop["step"] % cfg.train.checkpoint_every == 0 and i + 1 < n_batches:
                    save_state(accelerator, states_dir, loop["step"], {**state(), "epoch": epoch, "batch": i + 1},
                               cfg.train.keep_last, extras)
                loss_total, loss_n = 0.0, 0
            bar.close()
            elapsed = time.perf_counter() - t_epoch
            rec = {"event": "epoch", "epoch": epoch + 1,
                   "train_loss": float(epoch_loss[0] / epoch_loss[1].clamp_min(1)),
                   "img_s": seen * world / elapsed, "data_wait": t_wait / elapsed, **device_memory(accelerator)}
            loop.update(epoch=epoch + 1, batch=0)
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                # keep_torch_compile=False: the default would rewire the compiled module to skip DDP.
                eval_model = (ema.module if ema is not None
                              else accelerator.unwrap_model(model, keep_torch_compile=False))
                metrics = evaluate_and_save(eval_model, cfg, info, accelerator, eval_aug, loss_fn, loop, log, meta)
                rec.update(val_loss=metrics["loss"], val_iou=metrics["iou"], val_dice=metrics["dice"],
                           **{f"val_iou/{c['name']}": c["iou"] for c in metrics["per_class"] if c["iou"] is not None})
            log.log(rec, loop["step"])
            accelerator.print(summary_line(epoch + 1, rec))
            save_state(accelerator, states_dir, loop["step"], state(), cfg.train.keep_last, extras)
            if accelerator.is_main_process:
                plot_curves(log.path, run_dir / "curves.png")

    accelerator.end_training()
    if metrics:
        accelerator.print(f"final val IoU {metrics['iou']:.4f}  Dice {metrics['dice']:.4f}  "
                          f"(best IoU {loop['best_iou']:.4f}; model in {run_dir / 'best'})")
    return metrics


def device_memory(accelerator) -> dict:
    if accelerator.device.type == "cuda":
        return {"gpu_mem_gb": torch.cuda.max_memory_allocated(accelerator.device) / 2**30}
    return {}


# ------------------------------------------------------------------------------ eval command
def evaluate_checkpoint(ckpt: str, shards: str, split: str = "val", batch_size: int = 0,
                        num_workers: int = -1, as_json: bool = False) -> dict:
    """``segdist eval``: exact metrics of a saved model on a shard split (1 or N processes)."""
    from .config import config_from_dict

    meta = read_meta(ckpt)
    cfg = config_from_dict(meta["config"])
    cfg.data.shards = shards
    accelerator = make_accelerator(mixed_precision=cfg.train.mixed_precision)
    info = dataset_info(shards, splits=(split,))
    info["val"] = info[split]
    model = load_model(ckpt).to(accelerator.device)
    out_ch = 1 if meta["binary"] else meta["num_classes"]
    loss_fn = create_loss(cfg.loss, out_ch)
    metrics, _ = evaluate(model, val_loader(cfg, info, accelerator, batch_size, num_workers), accelerator,
                          DeviceAugment(cfg.augment, train=False), loss_fn,
                          meta["num_classes"], meta["binary"], meta["class_names"])
    if accelerator.is_main_process:
        if as_json:
            print(json.dumps({k: metrics[k] for k in ("iou", "dice", "micro_iou", "micro_dice", "per_class",
                                                       "num_samples", "loss")}))
        else:
            print(f"{split}: IoU {metrics['iou']:.4f}  Dice {metrics['dice']:.4f}  ({metrics['num_samples']} samples)")
            for c in metrics["per_class"]:
                iou = "absent" if c["iou"] is None else f"{c['iou']:.4f}"
                print(f"  {c['name']:>20}: IoU {iou}  tp {c['tp']} fp {c['fp']} fn {c['fn']}")
    return metrics
