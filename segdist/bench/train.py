"""``segdist bench train``: the course's training loop vs segdist's, in one run; or (``--sweep``) segdist's
loop alone over batch sizes (:mod:`.loop`).

Both loops train the same SMP Unet on ``tu-efficientnet_lite0`` (random init) with Dice + BCE and
Adam(3e-3) on one device (``--device``: the CPU, or a CUDA GPU), from the same CSV rows at the same size
and batch:

* **course** -- the course's loop: ``course_loader`` (cv2 + albumentations in DataLoader workers,
  float batches moved to the device as the course does, ``.to(DEVICE)``),
  ``zero_grad -> forward -> loss -> backward -> step -> loss.item()``.
* **segdist** -- ``segdist train``'s own loop: the trainer :func:`segdist.train.setup` builds, trained by
  :func:`segdist.train.train_one_epoch` (its augmentation, non-finite guard, reads and prefetch) over
  shards built from the same rows (JPEGs decoded on the GPU with ``--decode device``), with the course's
  recipe: Adam(3e-3) and flips (:data:`.loop.COURSE_AUGMENT_KW`).

Each loop runs in a fresh interpreter (spawn) for each glibc malloc setting (:data:`MALLOC_SETTINGS`),
so allocator settings and heap state never leak from one measurement into the next. After
``warmup`` untimed steps, ``steps`` are timed: images/s, the share of time spent waiting for a
batch, minor page faults (the process tree: training process, live and reaped loader workers)
per second and per step, peak RSS summed over the tree (sampled) and the training process's own
max RSS; on CUDA also the peak of allocated GPU memory during the timed steps. The clock is read after
``torch.cuda.synchronize()``, so queued GPU work is inside the timed span. Why page faults: see
:mod:`segdist.memory`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from ..errors import UserError
from ..memory import ENV, MALLOC_SETTINGS, USER_VARS, tune_malloc
from ..shards import open_shards
from .common import BenchArgs, OtherCpu, PeakRss, build_bench_shards, check_args, cpu_model, source_csv
from .course import course_stepper, read_course_csv
from .loop import sweep, timed_segdist


def _proc_minflt(pid: int) -> int:
    """Minor faults of live process ``pid`` and of its reaped children (/proc/PID/stat minflt + cminflt)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
    return int(fields[7]) + int(fields[8])


def minor_faults() -> tuple[int, int]:
    """(minor page faults of this process tree so far, of this process alone).

    The tree is this process, its reaped children (``RUSAGE_CHILDREN``) and its live descendants
    (/proc). A child alive at one reading and reaped by the next moves from the second term to
    the first with its whole count, so a difference of two readings counts each fault once.
    """

    own = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    total = own + resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(OSError):  # exited between listing and reading: counted once reaped
            total += _proc_minflt(child.pid)
    return total, own


@dataclass
class TrainArgs(BenchArgs):
    steps: int = 10
    """Measured optimiser steps per loop (after ``warmup``)."""
    warmup: int = 2
    """Steps run before the clock starts (first-touch allocations, kernel selection, worker start-up)."""
    malloc: tuple[str, ...] = ("default",)
    """Which :data:`MALLOC_SETTINGS` to measure, each in fresh processes."""
    precision: str = "auto"
    """segdist's ``train.mixed_precision``: ``auto`` (bf16 on CUDA), ``bf16`` or ``no``. The course loop is float32."""
    channels_last: str = "auto"
    """segdist's ``model.channels_last``: ``auto`` (on with CUDA), ``true`` or ``false``."""
    threads: int = 0
    """torch intra-op threads in both loops; 0 = torch's default (one per core)."""
    compile: str = "none"
    """segdist's ``train.compile`` mode; compiling happens in the warm-up steps (reported as ``compile_s``)."""
    sweep: tuple[int, ...] = ()
    """Batch sizes: measure segdist's loop alone (default recipe) at each, instead of the comparison."""
    device: str = "cpu"
    """Where both loops train: ``cpu`` or ``cuda`` (the current CUDA device)."""
    decode: str = "cpu"
    """segdist's JPEG decoding: ``cpu`` (loader workers) or ``device`` (nvJPEG on the GPU, ``data.decode``)."""


def _course_run(args: TrainArgs, rows: list, urls: list, sizes: list, shard_dir: str, stack):
    step = course_stepper(args, rows, urls, sizes, stack)
    return lambda n: sum(step() for _ in range(n))


def _segdist_run(args: TrainArgs, rows: list, urls: list, sizes: list, shard_dir: str, stack):
    return timed_segdist(args, urls, sizes, shard_dir, stack)


LOOPS = {"course": _course_run, "segdist": _segdist_run}
"""Training loops ``segdist bench train`` compares: (args, rows, urls, sizes, shard dir, exit stack) -> run(n),
which trains n steps and returns the seconds spent waiting for data."""

def users_start_method() -> None:
    """Give this process the platform's default multiprocessing start method back.

    A process started by spawn from a parent that never chose a start method (``segdist bench train``)
    gets spawn as its default, so the course's DataLoader would spawn fresh interpreters (importing
    torch, cv2 and albumentations) every epoch, where the user's script forks them (Linux, Python < 3.14).
    On an H100, where a step takes ~40 ms, that made the course loop wait for data 86 % of the time
    (2026-11-26). The CPU rows in docs/benchmarks.md were unaffected: their 2 warm-up + 10 timed steps
    never left the first epoch (19 steps of 16 over the 290 photos).
    """
    multiprocessing.set_start_method(None, force=True)


def _measure_loop(loop: str, args: TrainArgs, rows: list, urls: list, sizes: list, shard_dir: str,
                  malloc: str) -> dict:
    """Run in a fresh process: ``warmup`` steps, then ``steps`` timed ones; rates over the timed ones."""

    # segdist's loop starts as `segdist train` does (cli.main tunes malloc unless the environment
    # already does); the course loop gets it only under the "mallopt" setting.
    tuned = tune_malloc() if malloc == "mallopt" or loop == "segdist" else None
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = args.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    os.environ.setdefault("TQDM_DISABLE", "1")
    with contextlib.ExitStack() as stack:
        run = LOOPS[loop](args, rows, urls, sizes, shard_dir, stack)
        if args.warmup:
            run(args.warmup)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        faults0, own0 = minor_faults()
        t0 = time.perf_counter()
        with PeakRss() as rss, OtherCpu() as other:
            wait = run(args.steps)
            sync()
        seconds = time.perf_counter() - t0
        faults1, own1 = minor_faults()

    gpu = {"gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if cuda else {}

    return {"img_s": round(args.steps * args.batch / seconds, 3), "s_per_step": round(seconds / args.steps, 4),
            "data_wait": round(wait / seconds, 4),
            "minflt_per_s": round((faults1 - faults0) / seconds), "main_minflt_per_s": round((own1 - own0) / seconds),
            "minflt_per_step": round((faults1 - faults0) / args.steps),
            "peak_rss_mb": round(rss.mb, 1),
            "main_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "background_cpus": round(other.cpus, 2), "mallopt_applied": tuned, "torch_threads": torch.get_num_threads(),
            **gpu}


@contextlib.contextmanager
def _malloc_env(setting: str):
    """os.environ for a process started now under ``setting``: the user's MALLOC_* variables removed, and
    :data:`segdist.memory.ENV` added for ``env``. Restored afterwards."""

    saved = dict(os.environ)
    for var in USER_VARS:
        os.environ.pop(var, None)
    if setting == "env":
        os.environ.update(ENV)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _in_fresh_process(fn: Callable, *fn_args):
    """``fn(*fn_args)`` in a new interpreter (spawn), so allocator settings and heap state start clean; the
    interpreter starts its own processes the platform's way (:func:`users_start_method`)."""

    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=users_start_method) as pool:
        return pool.submit(fn, *fn_args).result()


def run_train_bench(args: TrainArgs) -> dict:
    """Both training loops under each malloc setting, each in its own fresh process, one after the other;
    with ``args.sweep``, segdist's loop alone at each batch size, in one fresh process."""
    check_args(args)
    checks = [(all(b >= 1 for b in args.sweep), f"--sweep takes batch sizes >= 1 (got {args.sweep})"),
              (args.compile in ("none", "default", "max-autotune", "reduce-overhead"),
               f"--compile takes none, default, max-autotune or reduce-overhead (got {args.compile})"),
              (args.steps >= 1, f"--steps must be >= 1 (got {args.steps})"),
              (args.warmup >= 0, f"--warmup must be >= 0 (got {args.warmup})"),
              (args.threads >= 0, f"--threads must be >= 0 (got {args.threads})"),
              (args.size % 32 == 0,
               f"--size must be a multiple of 32 (the encoder downsamples 5 times; got {args.size})"),
              (all(m in MALLOC_SETTINGS for m in args.malloc),
               f"--malloc takes {', '.join(MALLOC_SETTINGS)} or all (got {', '.join(args.malloc)})"),
              (args.device in ("cpu", "cuda"), f"--device takes cpu or cuda (got {args.device})"),
              (args.device != "cuda" or torch.cuda.is_available(),
               "--device cuda: torch sees no CUDA device here; run on a machine with an NVIDIA GPU "
               "or use --device cpu"),
              (args.decode in ("cpu", "device"), f"--decode takes cpu or device (got {args.decode})"),
              (args.decode == "cpu" or args.device == "cuda",
               "--decode device decodes JPEGs on the GPU (nvJPEG): it needs --device cuda")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    rows = read_course_csv(source_csv(args.source), args.limit)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="segdist-bench-") as tmp:
        shard_dir = args.shards or str(build_bench_shards(rows, Path(tmp) / "shards", args.max_side,
                                                          max(args.workers, 1)))
        urls, sizes = open_shards(shard_dir).split(args.split)
        if args.sweep:
            with _malloc_env("default"):
                swept = _in_fresh_process(sweep, args, urls, sizes, shard_dir)
        for setting in () if args.sweep else args.malloc:
            run = {}
            for loop in LOOPS:
                with _malloc_env(setting):
                    run[loop] = _in_fresh_process(_measure_loop, loop, args, rows, urls, sizes, shard_dir, setting)
            run["speedup_vs_course"] = round(run["segdist"]["img_s"] / run["course"]["img_s"], 3)
            runs[setting] = run
    common = {"size": args.size, "workers": args.workers, "steps": args.steps, "warmup": args.warmup,
              "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
              "max_side": args.max_side if not args.shards else None, "samples": sum(sizes), "device": args.device,
              "decode": args.decode, "cpus": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__}
    if args.sweep:
        return {**swept, **common, "sweep": list(args.sweep)}
    return {"runs": runs, "malloc_settings": {m: MALLOC_SETTINGS[m] for m in args.malloc}, "batch": args.batch,
            "threads": args.threads or torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, **common}


def format_train_table(r: dict) -> str:
    lines = [f"segdist bench train: size {r['size']}, batch {r['batch']}, {r['steps']} steps after {r['warmup']} "
             f"warm-up, {r['workers']} workers, segdist precision {r['precision']}, channels_last "
             f"{r['channels_last']}, compile {r['compile']}"
             f"{', nvJPEG decode' if r.get('decode') == 'device' else ''}; on {r.get('gpu') or 'the CPU'}; "
             f"{r['cpus']} CPUs ({r['cpu']})",
             f"{'malloc':<8} {'loop':<8} {'img/s':>7} {'x course':>9} {'data-wait':>10} {'faults/s':>10} "
             f"{'main f/s':>10} {'peak RSS MB':>12}{' GPU peak MB' if r.get('gpu') else ''}"]
    for setting, run in r["runs"].items():
        for loop in LOOPS:
            m = run[loop]
            lines.append(f"{setting:<8} {loop:<8} {m['img_s']:>7.2f} {m['img_s'] / run['course']['img_s']:>8.2f}x "
                         f"{100 * m['data_wait']:>9.1f}% {m['minflt_per_s']:>10} {m['main_minflt_per_s']:>10} "
                         f"{m['peak_rss_mb']:>12.1f}" + (f" {m['gpu_peak_mb']:>11.1f}" if r.get('gpu') else ""))
    busy = max(m["background_cpus"] for run in r["runs"].values() for m in (run["course"], run["segdist"]))
    if busy > 0.1:
        lines.append(f"WARNING: other processes kept {busy:.2f} CPUs busy during a measurement; "
                     f"re-run on an idle machine")
    return "\n".join(lines)
