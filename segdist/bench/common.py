"""What every benchmark shares: timing, RSS and CPU accounting, the source CSV and the shards built from
it, the machine's description, the shared options. The course's own code is in :mod:`.course`."""

from __future__ import annotations

import csv
import platform
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..errors import UserError
from ..shards import build_shards

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


# ----------------------------------------------------------------------------- shards
def source_csv(source: str) -> Path:
    path = Path(source)
    if path.is_dir():
        path = path / "train.csv"
    if not path.is_file():
        raise UserError(f"bench source '{source}' has no train.csv; pass --source with a folder holding "
                        f"train.csv (columns images,masks) or the CSV itself")
    return path


def build_bench_shards(rows: list[tuple[str, str]], out: Path, max_side: int, workers: int,
                       samples_per_shard: int = 64) -> Path:
    """All ``rows`` as one train split (no val) in ``out``; downscaled images are re-encoded as JPEG."""
    src = out.parent / "source.csv"
    with open(src, "w", newline="") as f:  # absolute paths: the same samples the course reads
        w = csv.writer(f)
        w.writerow(["images", "masks"])
        w.writerows([(str(Path(i).resolve()), str(Path(m).resolve())) for i, m in rows])
    build_shards(src, out, val_fraction=0.0, max_side=max_side, reencode="jpeg", jpeg_quality=95,
                 workers=workers, progress=False, samples_per_shard=samples_per_shard)
    return out


def repeated(urls: list[str], sizes: list[int], times: int) -> tuple[list[str], list[int]]:
    return urls * times, sizes * times


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


def check_args(args: BenchArgs) -> None:
    checks = [(args.size >= 16, f"--size must be >= 16 (got {args.size})"),
              (args.batch >= 1, f"--batch must be >= 1 (got {args.batch})"),
              (args.workers >= 0, f"--workers must be >= 0 (got {args.workers})"),
              (args.max_side == 0 or args.max_side >= 16, f"--max-side must be 0 or >= 16 (got {args.max_side})"),
              (args.limit >= 0, f"--limit must be >= 0 (got {args.limit})"),
              (args.min_seconds >= 0, f"--min-seconds must be >= 0 (got {args.min_seconds})")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
