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
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import torch

from ..augment import DeviceAugment
from ..config import AugmentConfig
from ..decode import decode_image, decode_mask
from ..loader import Loader
from ..shards import image_bytes, mask_bytes, open_shards, read_samples
from ..stream import ShardStream
from .common import (MB, BenchArgs, OtherCpu, PeakRss, Timing, build_bench_shards, check_args, cpu_model, repeated,
                     source_csv, time_epochs, tree_rss)
from .course import course_loader, read_course_csv




# ----------------------------------------------------------------------------- decode limit
def decode_sample(sample: dict, size: int, reduced: bool) -> None:
    """The stream's decode calls for one sample, results dropped."""
    decode_image(image_bytes(sample), size, reduced)
    decode_mask(mask_bytes(sample), size)


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


@contextlib.contextmanager
def stream_epochs(urls: list[str], sizes: list[int], args: BenchArgs, device_decode: bool = False):
    """``make_epoch(e)`` over one persistent :class:`Loader`, as ``segdist train`` streams; with
    ``device_decode`` JPEG rows arrive as bytes for :func:`segdist.decode.to_device` (``data.decode=device``)."""
    stream = ShardStream(urls, sizes, batch_size=args.batch, image_size=args.size, train=True,
                         num_workers=args.workers, device_decode=device_decode)
    with Loader(stream, pin_memory=torch.cuda.is_available()) as loader:
        yield loader.epoch


def stream_rss(urls: list[str], sizes: list[int], args: BenchArgs, seconds: float = 3.0) -> float:
    """Peak tree RSS (MB) of the stream over whole epochs lasting >= ``seconds``, sampled densely."""
    with stream_epochs(urls, sizes, args) as make_epoch:
        timing = time_epochs(make_epoch, lambda b: len(b["key"]), seconds, rss_interval=0.02)
    return timing.peak_rss_mb


def run_data_bench(args: BenchArgs) -> dict:
    """Measure all three loaders; return the result dict that ``--json`` prints."""
    check_args(args)
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
            urls10, sizes10 = repeated(urls, sizes, 10)
            rss = {"rss_shards_1x": len(urls), "rss_1x_mb": round(stream_rss(urls, sizes, args, rss_s), 1),
                   "rss_shards_10x": len(urls10), "rss_10x_mb": round(stream_rss(urls10, sizes10, args, rss_s), 1)}
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
