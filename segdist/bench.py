"""``segdist bench data``: the course loader vs the segdist stream vs the decode limit, in one run.

Three measurements on the same machine, cores, images and output size (S x S, batch B, W workers):

* **course** -- the classic course's loader, written the way the course writes it: a torch
  ``Dataset`` over the CSV (``images,masks`` columns) that reads files with ``cv2.imread``, runs
  albumentations ``Resize -> HorizontalFlip -> VerticalFlip`` and returns float tensors / 255
  (image (3, S, S) float32, mask (1, S, S) float32) into a shuffling ``DataLoader``.
* **segdist** -- one ``stream.Loader`` over the shards for all epochs, as training uses it: uint8 batches
  (B, 3, S, S) + (B, S, S). Augmentation runs on the accelerator in real use, so it is timed
  on its own (``augment_ms_per_batch``) and not charged to the loader's cores.
* **decode limit** -- W processes that only read the same shard bytes and make the same decode
  calls as the stream (same reduced decode, resize to S), nothing else: the ceiling for any
  loader that decodes these shards on these cores.

Both loaders are timed over whole epochs until at least ``min_seconds`` have passed; the clock
starts at each loader's first batch, so worker start-up and imports of the first epoch count for
neither. Peak memory is the RSS summed over the loader process and its workers, sampled.
"""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset

from .decode import decode_image, decode_mask, resize_square
from .errors import UserError
from .loader import Loader
from .shards import open_shards
from .stream import ShardStream, read_samples

DEFAULT_SOURCE = "../shared/datasets/human-segmentation"
MB = 1024 * 1024


# ----------------------------------------------------------------------------- measuring
@dataclass
class Timing:
    images: int
    seconds: float
    epochs: int
    peak_rss_mb: float = 0.0
    other_cpus: float = 0.0
    """Mean CPUs busy outside this process tree meanwhile: other jobs that skew the figure."""

    @property
    def img_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def tree_rss(proc: psutil.Process | None = None) -> int:
    """RSS in bytes of ``proc`` (default: this process) plus all of its descendants."""
    proc = proc or psutil.Process()
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # a worker that exited between listing and reading
    return total


class PeakRss:
    """Context manager: peak :func:`tree_rss` in MB, sampled every ``interval`` s in a thread.

    Summed RSS counts pages that forked workers share with the parent once per process, so it
    overstates real use; it is the figure that grows if a loader holds data per shard or epoch.
    One sample costs ~1 ms of this process's CPU (it walks /proc), hence the slow default rate.
    """

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss())

    @property
    def mb(self) -> float:
        return self.peak / MB


def _busy_cpu_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _own_cpu_s() -> float:
    """CPU seconds of this process, its exited (reaped) children and its live descendants."""
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # exited between listing and reading: counted in children_* once reaped
    return total


class OtherCpu:
    """Context manager: mean number of CPUs that *other* processes kept busy meanwhile (``.cpus``)."""

    def __enter__(self) -> OtherCpu:
        self._busy, self._own, self._t0 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
        self.cpus = 0.0
        return self

    def __exit__(self, *exc) -> None:
        other = (_busy_cpu_s() - self._busy) - (_own_cpu_s() - self._own)
        self.cpus = max(other, 0.0) / max(time.perf_counter() - self._t0, 1e-9)


def time_epochs(make_epoch: Callable[[int], Iterable], count: Callable[[object], int],
                min_seconds: float, rss_interval: float = 0.25) -> Timing:
    """Iterate whole epochs (``make_epoch(e)``) until >= ``min_seconds`` are measured.

    The first batch of the first epoch starts the clock and is not counted (worker start-up);
    later epochs' start-up is part of the cost, as it is in training.
    """
    images, epochs, t0 = 0, 0, None
    with PeakRss(rss_interval) as rss, OtherCpu() as other:
        while True:
            seen = 0
            for batch in make_epoch(epochs):
                seen += 1
                if t0 is None:
                    t0 = time.perf_counter()
                    continue
                images += count(batch)
            if seen == 0:
                raise UserError("the loader yielded no batch in an epoch; lower --batch or add samples")
            epochs += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds and images > 0:
                break
    return Timing(images, elapsed, epochs, rss.mb, other.cpus)


# ----------------------------------------------------------------------------- course loader
def read_course_csv(csv_path: Path, limit: int = 0) -> list[tuple[str, str]]:
    """(image path, mask path) rows of a course-style CSV (``images,masks``, relative paths)."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"images", "masks"} <= set(reader.fieldnames):
            raise UserError(f"{csv_path} needs 'images' and 'masks' columns (the course's train.csv format); "
                            f"has {reader.fieldnames}")
        root = csv_path.parent
        rows = [(str(root / r["images"]), str(root / r["masks"])) for r in reader]
    rows = rows[:limit] if limit else rows
    if not rows:
        raise UserError(f"{csv_path} lists no samples")
    return rows


class CourseDataset(Dataset):
    """The course's ``SegmentationDataset``: image (3, S, S) float32 in [0, 1], mask (1, S, S) float32 {0, 1}."""

    def __init__(self, rows: list[tuple[str, str]], augmentations):
        self.rows, self.augmentations = rows, augmentations

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int):
        image_path, mask_path = self.rows[idx]
        image = cv2.imread(image_path)
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        mask = cv2.imread(mask_path, cv2.IMREAD_GRAYSCALE)  # (h, w)
        mask = np.expand_dims(mask, axis=-1)  # (h, w, 1)
        data = self.augmentations(image=image, mask=mask)
        image, mask = data["image"], data["mask"]
        image = np.transpose(image, (2, 0, 1)).astype(np.float32)
        mask = np.transpose(mask, (2, 0, 1)).astype(np.float32)
        return torch.Tensor(image) / 255.0, torch.round(torch.Tensor(mask) / 255.0)


def course_loader(rows: list[tuple[str, str]], size: int, batch: int, workers: int) -> DataLoader:
    import albumentations as A

    # is_check_shapes=False: 198 of the 290 masks are stored smaller than their image; Resize fixes both.
    # Workers inherit cv2.setNumThreads(1) from segdist.decode's import; on 2 cores the course measured
    # the same with OpenCV's default threads (~415-420 img/s either way), so this costs it nothing.
    augs = A.Compose([A.Resize(size, size), A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)],
                     is_check_shapes=False)
    return DataLoader(CourseDataset(rows, augs), batch_size=batch, shuffle=True, num_workers=workers)


# ----------------------------------------------------------------------------- decode limit
def decode_sample(sample: dict, size: int, reduced: bool) -> None:
    """The stream's decode calls for one sample, results dropped."""
    key = "image.jpg" if "image.jpg" in sample else "image.png"
    decode_image(sample[key], size, reduced)
    decode_mask(sample["mask.png"], size)


def _decode_for(task: tuple[list[str], int, int, bool, float]) -> tuple[int, float]:
    """One worker: cycle over the shards (from ``start``) reading + decoding for ``seconds``."""
    urls, start, size, reduced, seconds = task
    n, t0 = 0, time.perf_counter()
    i = start
    while True:
        for sample in read_samples(urls[i % len(urls)]):
            decode_sample(sample, size, reduced)
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:  # checked per sample, so no worker idles at the end
                return n, elapsed
        i += 1


def _warm(task: tuple[str, int, bool]) -> int:
    url, size, reduced = task
    for sample in read_samples(url):
        decode_sample(sample, size, reduced)
        return 1
    return 0


def decode_limit(urls: list[str], size: int, workers: int, min_seconds: float, reduced: bool = True) -> Timing:
    """Images/s of ``workers`` processes that only read and decode the shards, all busy together."""
    nproc = max(workers, 1)
    ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    seconds = max(min_seconds, 0.5)
    with PeakRss() as rss, OtherCpu() as other, ctx.Pool(nproc) as pool:
        pool.map(_warm, [(urls[w % len(urls)], size, reduced) for w in range(nproc)], chunksize=1)
        tasks = [(urls, w * len(urls) // nproc, size, reduced, seconds) for w in range(nproc)]
        results = pool.map(_decode_for, tasks, chunksize=1)
    images = sum(n for n, _ in results)
    rate = sum(n / t for n, t in results)
    return Timing(images, images / rate, 0, rss.mb, other.cpus)


# ----------------------------------------------------------------------------- augmentation
def augment_ms_per_batch(batch: int, size: int, device: torch.device, iters: int = 0) -> float:
    """Mean ms of ``DeviceAugment(AugmentConfig(), train=True)`` on a (B, 3, S, S) uint8 batch."""
    from .augment import DeviceAugment
    from .config import AugmentConfig

    iters = iters or (50 if device.type == "cuda" else 5)
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
    mask = torch.randint(0, 2, (batch, size, size), dtype=torch.uint8, generator=gen).to(device)
    aug = DeviceAugment(AugmentConfig(), train=True).to(device).train()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # builds the Kornia pipeline and warms kernels
        aug(image, mask)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        aug(image, mask)
    sync()
    return (time.perf_counter() - t0) / iters * 1000


# ----------------------------------------------------------------------------- shards
def source_csv(source: str) -> Path:
    path = Path(source)
    if path.is_dir():
        path = path / "train.csv"
    if not path.is_file():
        raise UserError(f"bench source '{source}' has no train.csv; pass --source with a folder holding "
                        f"train.csv (columns images,masks) or the CSV itself")
    return path


def build_bench_shards(rows: list[tuple[str, str]], out: Path, max_side: int, workers: int) -> Path:
    """All ``rows`` as one train split (no val) in ``out``; downscaled images are re-encoded as JPEG."""
    from .shards import build_shards

    src = out.parent / "source.csv"
    with open(src, "w", newline="") as f:  # absolute paths: the same samples the course reads
        w = csv.writer(f)
        w.writerow(["images", "masks"])
        w.writerows([(str(Path(i).resolve()), str(Path(m).resolve())) for i, m in rows])
    build_shards(src, out, val_fraction=0.0, max_side=max_side, reencode="jpeg", jpeg_quality=95,
                 workers=workers, progress=False)
    return out


def repeated(urls: list[str], sizes: list[int], times: int) -> tuple[list[str], list[int]]:
    return urls * times, sizes * times


# ----------------------------------------------------------------------------- the run
def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class BenchArgs:
    shards: str | None = None
    source: str = DEFAULT_SOURCE
    split: str = "train"
    size: int = 320
    batch: int = 16
    workers: int = 2
    max_side: int = 0
    limit: int = 0
    min_seconds: float = 10.0
    rss: bool = False


def _check(args: BenchArgs) -> None:
    checks = [(args.size >= 16, f"--size must be >= 16 (got {args.size})"),
              (args.batch >= 1, f"--batch must be >= 1 (got {args.batch})"),
              (args.workers >= 0, f"--workers must be >= 0 (got {args.workers})"),
              (args.max_side == 0 or args.max_side >= 16, f"--max-side must be 0 or >= 16 (got {args.max_side})"),
              (args.limit >= 0, f"--limit must be >= 0 (got {args.limit})"),
              (args.min_seconds >= 0, f"--min-seconds must be >= 0 (got {args.min_seconds})")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


@contextlib.contextmanager
def stream_epochs(urls: list[str], sizes: list[int], args: BenchArgs):
    """``make_epoch(e)`` over one persistent :class:`Loader`, as ``segdist train`` streams."""
    stream = ShardStream(urls, sizes, batch_size=args.batch, image_size=args.size, train=True,
                         num_workers=args.workers)
    with Loader(stream, pin_memory=torch.cuda.is_available()) as loader:
        yield loader.epoch


def stream_rss(urls: list[str], sizes: list[int], args: BenchArgs, seconds: float = 3.0) -> float:
    """Peak tree RSS (MB) of the stream over whole epochs lasting >= ``seconds``, sampled densely."""
    with stream_epochs(urls, sizes, args) as make_epoch:
        timing = time_epochs(make_epoch, lambda b: len(b["key"]), seconds, rss_interval=0.02)
    return timing.peak_rss_mb


def run_data_bench(args: BenchArgs) -> dict:
    """Measure all three loaders; return the result dict that ``--json`` prints."""
    _check(args)
    csv_path = source_csv(args.source)
    rows = read_course_csv(csv_path, args.limit)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    baseline_mb = tree_rss() / MB  # this process before any loader: the floor under every peak below
    with tempfile.TemporaryDirectory(prefix="segdist-bench-") as tmp:
        shard_dir = args.shards or str(build_bench_shards(rows, Path(tmp) / "shards", args.max_side,
                                                          max(args.workers, 1)))
        urls, sizes = open_shards(shard_dir).split(args.split)
        load_before = os.getloadavg()[0]
        course = time_epochs(lambda e: course_loader(rows, args.size, args.batch, args.workers),
                             lambda b: len(b[0]), args.min_seconds)
        with stream_epochs(urls, sizes, args) as make_epoch:
            segdist = time_epochs(make_epoch, lambda b: len(b["key"]), args.min_seconds)
        limit = decode_limit(urls, args.size, args.workers, args.min_seconds)
        load_after = os.getloadavg()[0]
        rss = {}
        if args.rss:
            rss_s = min(3.0, max(args.min_seconds, 0.5))
            rss = {"rss_shards_1x": len(urls), "rss_1x_mb": round(stream_rss(urls, sizes, args, rss_s), 1),
                   "rss_shards_10x": 10 * len(urls),
                   "rss_10x_mb": round(stream_rss(*repeated(urls, sizes, 10), args, rss_s), 1)}
    augment_ms = augment_ms_per_batch(args.batch, args.size, device)
    return {
        "course_img_s": round(course.img_s, 1),
        "segdist_img_s": round(segdist.img_s, 1),
        "decode_img_s": round(limit.img_s, 1),
        "speedup_vs_course": round(segdist.img_s / course.img_s, 3),
        "fraction_of_decode_limit": round(segdist.img_s / limit.img_s, 3),
        "augment_ms_per_batch": round(augment_ms, 2),
        "device": device.type,
        "size": args.size, "batch": args.batch, "workers": args.workers,
        "max_side": args.max_side if not args.shards else None,
        "shards": args.shards or "built on the fly (jpeg q95)", "split": args.split,
        "samples_course": len(rows), "samples_segdist": sum(sizes), "num_shards": len(urls),
        "measured_s": {"course": round(course.seconds, 2), "segdist": round(segdist.seconds, 2),
                       "decode": round(limit.seconds, 2)},
        "epochs": {"course": course.epochs, "segdist": segdist.epochs},
        "baseline_rss_mb": round(baseline_mb, 1),
        "peak_rss_mb": {"course": round(course.peak_rss_mb, 1), "segdist": round(segdist.peak_rss_mb, 1),
                        "decode": round(limit.peak_rss_mb, 1)},
        "background_cpus": {"course": round(course.other_cpus, 2), "segdist": round(segdist.other_cpus, 2),
                            "decode": round(limit.other_cpus, 2)},
        **rss,
        "cpus": os.cpu_count(), "cpu": cpu_model(),
        "load_avg_1m": {"before": round(load_before, 2), "after": round(load_after, 2)},
    }


def format_table(r: dict) -> str:
    rows = [("course (cv2 + albumentations, float)", r["course_img_s"], r["peak_rss_mb"]["course"]),
            ("segdist stream (uint8)", r["segdist_img_s"], r["peak_rss_mb"]["segdist"]),
            ("decode limit (read + decode only)", r["decode_img_s"], r["peak_rss_mb"]["decode"])]
    lines = [f"segdist bench data: size {r['size']}, batch {r['batch']}, workers {r['workers']}, "
             f"{r['samples_segdist']} samples in {r['num_shards']} shards (max_side {r['max_side']}), "
             f"{r['cpus']} CPUs, load {r['load_avg_1m']['before']} -> {r['load_avg_1m']['after']}",
             f"{'loader':<38} {'img/s':>8} {'x course':>9} {'peak RSS MB':>12}"]
    for name, img_s, rss in rows:
        lines.append(f"{name:<38} {img_s:>8.1f} {img_s / r['course_img_s']:>8.2f}x {rss:>12.1f}")
    lines.append(f"speedup vs course {r['speedup_vs_course']:.2f}x; "
                 f"fraction of decode limit {r['fraction_of_decode_limit']:.2f}")
    lines.append(f"augment on {r['device']}: {r['augment_ms_per_batch']:.1f} ms/batch "
                 f"(not in the loader's img/s: it runs on the accelerator)")
    busy = max(r["background_cpus"].values())
    if busy > 0.1:
        lines.append(f"WARNING: other processes kept {busy:.2f} CPUs busy during a measurement; "
                     f"re-run on an idle machine")
    if "rss_1x_mb" in r:
        lines.append(f"stream peak RSS: {r['rss_1x_mb']:.1f} MB with {r['rss_shards_1x']} shards, "
                     f"{r['rss_10x_mb']:.1f} MB with {r['rss_shards_10x']} shards")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- decoders
def _cv2_full(data: bytes, size: int) -> np.ndarray:
    return decode_image(data, size, reduced=False)


def _cv2_reduced(data: bytes, size: int) -> np.ndarray:
    return decode_image(data, size, reduced=True)


def _pil_draft(data: bytes, size: int) -> np.ndarray:
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (size, size))  # libjpeg DCT scaling, keeps both sides >= size
    return resize_square(np.asarray(im.convert("RGB")), size)


def _torchvision(data: bytes, size: int) -> np.ndarray:
    from torchvision.io import ImageReadMode, decode_jpeg

    img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return resize_square(img.permute(1, 2, 0).numpy(), size)


def _simplejpeg(data: bytes, size: int) -> np.ndarray:
    import simplejpeg

    return resize_square(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size, min_width=size), size)


DECODERS: dict[str, Callable[[bytes, int], np.ndarray]] = {
    "cv2": _cv2_full, "cv2-reduced (stream)": _cv2_reduced, "pil-draft": _pil_draft,
    "torchvision-cpu": _torchvision, "simplejpeg": _simplejpeg,
}
"""JPEG bytes -> uint8 (S, S, 3) RGB; all resize the same way, so they differ only in decoding."""


def run_decode_bench(urls: list[str], size: int, min_seconds: float = 2.0) -> dict:
    """Single-thread img/s of each JPEG decoder (+ the same resize) over the shards' JPEG images.

    ``mean_abs_diff`` is against full-size OpenCV decoding: reduced (DCT-scaled) decoders trade
    a little detail for speed, and a wrong decoder (channel order, orientation) shows here.
    """
    jpegs = [s["image.jpg"] for u in urls for s in read_samples(u) if "image.jpg" in s]
    if not jpegs:
        raise UserError("the shards hold no JPEG images to decode; build them with --reencode jpeg or --max-side")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = [_cv2_full(d, size).astype(np.int16) for d in jpegs]
        out = {}
        for name, fn in DECODERS.items():
            try:
                fn(jpegs[0], size)
            except ImportError:
                out[name] = None  # not installed
                continue
            diff = float(np.mean([np.abs(fn(d, size).astype(np.int16) - r).mean() for d, r in zip(jpegs, ref)]))
            n, t0 = 0, time.perf_counter()
            while n == 0 or time.perf_counter() - t0 < min_seconds:  # whole passes, at least one
                for d in jpegs:
                    fn(d, size)
                n += len(jpegs)
            out[name] = {"img_s": round(n / (time.perf_counter() - t0), 1), "mean_abs_diff": round(diff, 2)}
    finally:
        torch.set_num_threads(torch_threads)
    return {"decoders": out, "images": len(jpegs), "size": size, "threads": 1, "cpu": cpu_model()}


def format_decode_table(r: dict) -> str:
    lines = [f"segdist bench decode: {r['images']} JPEGs -> {r['size']} px RGB, 1 thread, {r['cpu']}",
             f"{'decoder':<22} {'img/s':>8} {'mean |diff| vs cv2 full':>24}"]
    for name, v in r["decoders"].items():
        lines.append(f"{name:<22} {'not installed':>8}" if v is None else
                     f"{name:<22} {v['img_s']:>8.1f} {v['mean_abs_diff']:>24.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def _source_args(parser, min_seconds: float, what: str) -> None:
    """The options both benches share: which samples, at what size, for how long, printed how."""
    parser.add_argument("--shards", help=f"shard folder to {what} (default: build one from --source into a temp dir)")
    parser.add_argument("--source", default=DEFAULT_SOURCE,
                        help=f"folder with train.csv (images,masks columns) or the CSV (default {DEFAULT_SOURCE})")
    parser.add_argument("--split", default="train", help="shard split to use (default train)")
    parser.add_argument("--size", type=int, default=320, help="output side in pixels (default 320)")
    parser.add_argument("--max-side", type=int, default=0,
                        help="when building shards: downscale so the longer side is <= N (0 = keep originals)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N rows of the CSV (0 = all)")
    parser.add_argument("--min-seconds", type=float, default=min_seconds,
                        help=f"measure each candidate at least this long (default {min_seconds:g})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def add_cli(sub) -> None:
    """Register ``segdist bench data`` and ``segdist bench decode`` on an argparse sub-parsers object."""
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    d = bsub.add_parser("data", help="course loader vs segdist stream vs decode limit, one run",
                        description="The course loader vs the segdist stream vs the decode limit, in one run "
                                    "(see docs/benchmarks.md).")
    _source_args(d, 10.0, "stream")
    d.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    d.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    d.add_argument("--rss", action="store_true", help="also measure the stream's peak RSS with 1x and 10x shards")
    d.set_defaults(func=_cmd_data)
    k = bsub.add_parser("decode", help="JPEG decoders compared on the same shard bytes (speed, difference)",
                        description="Single-thread speed of each JPEG decoder (+ the same resize) on the shards' "
                                    "images, and its mean difference from full-size OpenCV decoding.")
    _source_args(k, 2.0, "decode")
    k.set_defaults(func=_cmd_decode)


def _cmd_data(args) -> int:
    result = run_data_bench(BenchArgs(shards=args.shards, source=args.source, split=args.split, size=args.size,
                                      batch=args.batch, workers=args.workers, max_side=args.max_side,
                                      limit=args.limit, min_seconds=args.min_seconds, rss=args.rss))
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _cmd_decode(args) -> int:
    _check(BenchArgs(size=args.size, max_side=args.max_side, limit=args.limit, min_seconds=args.min_seconds))
    with tempfile.TemporaryDirectory(prefix="segdist-bench-") as tmp:
        if args.shards:
            shard_dir = args.shards
        else:
            rows = read_course_csv(source_csv(args.source), args.limit)
            shard_dir = str(build_bench_shards(rows, Path(tmp) / "shards", args.max_side, 2))
        urls, _ = open_shards(shard_dir).split(args.split)
        result = run_decode_bench(urls, args.size, args.min_seconds)
    result["max_side"] = args.max_side if not args.shards else None
    print(json.dumps(result) if args.json else format_decode_table(result))
    return 0
