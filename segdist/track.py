"""Tracking: trackers via Accelerate (W&B offline by default, TensorBoard), ``metrics.jsonl``,
``curves.png`` and overlay images. Only the main process writes.
"""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path

import cv2
import numpy as np

from .atomic import atomic_write_bytes
from .config import Config
from .errors import writing

PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]],
                   np.uint8)


def colors(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB: a fixed palette, then seeded random colours."""
    extra = np.random.default_rng(0).integers(40, 255, (max(0, num_classes - len(PALETTE)), 3), dtype=np.uint8)
    return np.concatenate([PALETTE, extra])[:max(num_classes, 1)]


def wandb_logged_in() -> bool:
    """An API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def default_wandb_mode() -> None:
    """W&B offline unless the user logged in or set WANDB_MODE: no account needed, `wandb sync` later."""
    if not wandb_logged_in():
        os.environ.setdefault("WANDB_MODE", "offline")


def tracker_names(cfg: Config) -> list[str]:
    return [] if cfg.track.backend == "none" else [cfg.track.backend]


def init_trackers(accelerator, cfg: Config, run_dir: Path) -> None:
    if cfg.track.backend == "none":
        return
    kw, config = {}, cfg.to_dict()
    if cfg.track.backend == "tensorboard":  # hparams take flat scalars only
        config = {f"{sec}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
                  for sec, body in config.items() for k, v in body.items()}
    if cfg.track.backend == "wandb":
        default_wandb_mode()
        kw = {"wandb": {"name": cfg.train.name, "tags": cfg.track.tags, "dir": str(run_dir)}}
    accelerator.init_trackers(cfg.track.project, config=config, init_kwargs=kw)


def read_records(path: Path) -> tuple[list[dict], int]:
    """The records of a ``metrics.jsonl`` and how many lines are not one: a job killed while appending
    leaves a torn last line, which must not stop a resume or a plot."""
    records, torn = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            torn += 1
    return records, torn


class RunLog:
    """Appends one JSON line per event to ``metrics.jsonl`` and mirrors scalars to trackers."""

    def __init__(self, accelerator, run_dir: Path, backend: str):
        self.acc, self.dir, self.backend = accelerator, run_dir, backend
        self.path = run_dir / "metrics.jsonl"

    def truncate_after(self, step: int) -> None:
        """Keep only records up to ``step`` (a resumed run re-logs what came after its state)."""
        if self.path.is_file():
            records, torn = read_records(self.path)
            if torn:
                self.acc.print(f"{self.path}: dropping {torn} unreadable line(s) (torn by the killed run)")
            keep = [json.dumps(r) for r in records if r.get("step", 0) <= step]
            atomic_write_bytes(self.path, ("\n".join(keep) + "\n" if keep else "").encode())

    def log(self, record: dict, step: int) -> None:
        if not self.acc.is_main_process:
            return
        # A full disk may tear this line: a resume drops a torn last line (read_records) and re-logs from its state.
        with writing(self.path, "run the same command with train.resume=auto"), open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}
        if self.backend != "none":
            self.acc.log(scalars, step=step)

    def log_png(self, name: str, path: Path, step: int) -> None:
        """Send a PNG the run wrote (e.g. the confusion matrix) to W&B / TensorBoard."""
        if not self.acc.is_main_process or self.backend == "none":
            return
        if self.backend == "wandb":
            import wandb  # lazy: only W&B runs need it, and it takes seconds to import

            self.acc.get_tracker("wandb").log({name: wandb.Image(str(path))}, step=step)
        else:
            rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            self.acc.get_tracker("tensorboard").log_images({name: rgb[None]}, step=step, dataformats="NHWC")

    def log_overlays(self, grid: np.ndarray, images: list[np.ndarray], gts: list[np.ndarray],
                     preds: list[np.ndarray], class_names: list[str], step: int, epoch: int) -> None:
        """Save the overlay grid PNG and send per-image masks to W&B / the grid to TensorBoard."""
        if not self.acc.is_main_process:
            return
        ok, png = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        atomic_write_bytes(self.dir / "overlays" / f"epoch-{epoch:03d}.png", png.tobytes())
        if self.backend == "wandb":
            import wandb  # lazy: only W&B runs need it, and it takes seconds to import

            labels = {i: n for i, n in enumerate(class_names)}
            media = [wandb.Image(img, masks={"ground_truth": {"mask_data": gt, "class_labels": labels},
                                             "prediction": {"mask_data": pr, "class_labels": labels}})
                     for img, gt, pr in zip(images, gts, preds)]
            self.acc.get_tracker("wandb").log({"val/overlays": media}, step=step)
        elif self.backend == "tensorboard":
            self.acc.get_tracker("tensorboard").log_images({"val/overlays": grid[None]}, step=step,
                                                           dataformats="NHWC")


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 (H, W, 3) image + (H, W) class ids -> RGB overlay; class 0 and 255 left clear."""
    col = colors(max(num_classes, 2))
    m = mask.astype(np.int64)
    paint = (m > 0) & (m < len(col))
    out = image.copy()
    out[paint] = (alpha * col[m[paint]] + (1 - alpha) * image[paint]).astype(np.uint8)
    # A white outline keeps the region readable when its colour is close to the object's own.
    ids = np.where(paint, m, 0).astype(np.uint8)
    edge = cv2.morphologyEx(ids, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    out[edge] = 255
    return out


def overlay_grid(images: list[np.ndarray], gts: list[np.ndarray], preds: list[np.ndarray],
                 num_classes: int) -> np.ndarray:
    """One row per image: [image | ground truth overlay | prediction overlay]."""
    rows = [np.concatenate([im, overlay(im, gt, num_classes), overlay(im, pr, num_classes)], 1)
            for im, gt, pr in zip(images, gts, preds)]
    return np.concatenate(rows, 0)


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display), imported on first use: plots are drawn once per
    evaluation, and the import costs a fraction of a second every command would pay otherwise."""
    import matplotlib  # lazy: see the docstring

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path) -> None:
    """Write a matplotlib figure to ``out`` (PNG) atomically and close it: a reader never sees half a file."""
    plt = pyplot()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        with writing(out):
            fig.savefig(tmp, dpi=100)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)  # a figure cut short by a full disk


def plot_curves(metrics_path: Path, out: Path) -> None:
    """``curves.png``: train/val loss and val IoU/Dice per epoch, from ``metrics.jsonl``."""
    plt = pyplot()

    rows, _ = read_records(metrics_path)
    ep = [r for r in rows if r.get("event") == "epoch"]
    if not ep:
        return
    x = [r["epoch"] for r in ep]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, [r["train_loss"] for r in ep], "o-", label="train loss")
    if any("val_loss" in r for r in ep):
        xs = [r["epoch"] for r in ep if "val_loss" in r]
        a.plot(xs, [r["val_loss"] for r in ep if "val_loss" in r], "s-", label="val loss")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.grid(alpha=0.3)
    for key, style in (("val_iou", "o-"), ("val_dice", "s--"), ("val_input_iou", "^:")):
        xs = [r["epoch"] for r in ep if key in r]
        b.plot(xs, [r[key] for r in ep if key in r], style, label=key)
    b.set_xlabel("epoch"), b.set_ylabel("score"), b.set_ylim(0, 1), b.legend(), b.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out)


def plot_confusion(confusion, class_names: list[str], out: Path, title: str = "") -> None:
    """A normalised confusion matrix (K, K) (rows: truth, each summing to 1) as a PNG heat map."""
    plt = pyplot()

    k = len(class_names)
    side = min(4 + 0.22 * k, 18)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(confusion, cmap="Blues", vmin=0, vmax=1)
    ticks = range(k)
    fontsize = 8 if k <= 30 else 5
    ax.set_xticks(ticks, class_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, class_names, fontsize=fontsize)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title or "confusion (rows sum to 1)")
    if k <= 12:  # the numbers stay readable
        for i in range(k):
            for j in range(k):
                v = float(confusion[i][j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, out)
