"""Stream shards into fixed-size uint8 batches: split by rank and worker, exact per epoch.

The pipeline is a chain of small stages over iterators of sample dicts, as in WebDataset:
``read units (tar -> {__key__, image.jpg, mask.png}) -> take n -> shuffle buffer -> decode+resize
-> batch``. Reading uses WebDataset's tar iterators, so local paths, ``http(s)://`` URLs and
``pipe:`` commands all work.

How work is split (the part that keeps DDP from hanging and metrics exact):

* A *unit* is a shard, or a strided part of one (samples ``i % parts == part``) when there are
  fewer shards than loader slots (``world_size x num_workers``), so every slot has work.
* **Train**: units are shuffled per (seed, epoch) and assigned to slots by size (greedy LPT).
  Every rank yields exactly ``batches_per_epoch(...)`` full batches; a slot whose units run
  out cycles over them again (training may resample), one with more stops early.
* **Val**: units are assigned once each, no cycling and no padding, so every sample is seen
  exactly once across all ranks; the last batch of a slot may be short. Ranks may see
  different batch counts, which is fine because evaluation reduces counts once at the end.
* **Resume**: the position is ``(epoch, batches consumed on this rank)``. Everything above is a
  pure function of the seed, so each slot skips the batches it had already delivered, and the
  round-robin over slots continues with the one that was next.

Who does the work (:class:`Loader`): one process per slot of this rank, alive for the whole
run, decodes batch after batch straight into its ring of shared-memory batch slots and runs on
into the next epoch while the training process finishes the current one. Only keys cross the
pipe, so the training process's cost per batch is one memcpy (measured in
``docs/benchmarks.md``: 0.90 of the read+decode limit on 2 cores, where a ``DataLoader``
returning the same batches reached 0.45).

Batches are dicts: ``image`` uint8 (B, 3, S, S) (RGB; a channels-last view), ``mask`` uint8
(B, S, S) (class ids, 255 = ignore), ``key`` list[str].
"""

from __future__ import annotations

import collections
import glob
import itertools
import math
import os
import struct
import weakref
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np
import torch

from .errors import UserError

cv2.setNumThreads(1)  # one decode per worker process; OpenCV's own pool only oversubscribes


# ------------------------------------------------------------------------- shard lists
def resolve_shards(spec: str, split: str) -> tuple[list[str], list[int]]:
    """Shard URLs and their sample counts for ``split``.

    ``spec`` is a shard folder or ``http(s)://`` base holding ``manifest.json`` (counts come
    from it), or a glob / brace pattern / list of URLs separated by ``::`` (counts are read
    by one pass over the tars).
    """
    from .shards import read_manifest, shard_sizes, shard_urls

    if any(c in spec for c in "*?{") or "::" in spec or spec.endswith(".tar"):
        urls = expand_urls(spec)
        return urls, [count_samples(u) for u in urls]
    manifest = read_manifest(spec)
    if split not in manifest["splits"]:
        raise UserError(f"shards '{spec}' have no '{split}' split (have: {', '.join(manifest['splits'])})")
    return shard_urls(spec, split), shard_sizes(spec, split)


def expand_urls(spec: str) -> list[str]:
    """Expand ``a::b``, brace patterns ``x-{000000..000009}.tar`` and local globs."""
    import braceexpand

    urls: list[str] = []
    for part in spec.split("::"):
        for url in braceexpand.braceexpand(part):
            if "://" not in url and not url.startswith("pipe:") and any(c in url for c in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    if not urls:
        raise UserError(f"shard pattern '{spec}' matches no files; check the path")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        raise UserError(f"shard file '{missing[0]}' not found ({len(missing)} missing)")
    return urls


def count_samples(url: str) -> int:
    return sum(1 for _ in read_samples(url))


def read_samples(url: str) -> Iterator[dict]:
    """Samples of one tar (local path, URL or ``pipe:``), in file order, as raw bytes."""
    import webdataset as wds

    try:
        yield from wds.tariterators.tarfile_samples([{"url": url}])
    except Exception as e:  # noqa: BLE001 -- any I/O or tar error is the user's data or URL
        raise UserError(f"cannot read shard '{url}': {e}; run `segdist shards verify` on it") from None


# ------------------------------------------------------------------------- planning (pure)
@dataclass(frozen=True)
class Unit:
    """Samples ``i`` of shard ``shard`` with ``i % parts == part``."""

    shard: int
    part: int
    parts: int
    size: int


@dataclass(frozen=True)
class SlotPlan:
    units: tuple[Unit, ...]
    num_batches: int | None
    """Train: exact full batches this slot yields. Val: None (all of its units, once)."""


def batches_per_epoch(sizes: list[int], batch_size: int, world_size: int) -> int:
    """Full training batches every rank yields per epoch (same on all ranks)."""
    return (sum(sizes) // world_size) // batch_size


def make_units(sizes: list[int], slots: int) -> list[Unit]:
    parts = max(1, math.ceil(slots / max(1, len(sizes))))
    units = []
    for s, n in enumerate(sizes):
        for p in range(parts):
            size = len(range(p, n, parts))
            if size:
                units.append(Unit(s, p, parts, size))
    return units


def assign_units(units: list[Unit], slots: int) -> list[list[Unit]]:
    """Greedy longest-first assignment to the least-loaded slot (stable for equal sizes)."""
    out: list[list[Unit]] = [[] for _ in range(slots)]
    load = [0] * slots
    for u in sorted(units, key=lambda u: -u.size):  # sort is stable: keeps the shuffled order on ties
        i = min(range(slots), key=lambda j: (load[j], j))
        out[i].append(u)
        load[i] += u.size
    return out


def plan_epoch(sizes: list[int], *, batch_size: int, world_size: int, workers: int, seed: int,
               epoch: int, train: bool) -> list[SlotPlan]:
    """Plans for all ``world_size * max(workers, 1)`` slots; slot id = rank * workers + worker."""
    nwk = max(workers, 1)
    slots = world_size * nwk
    units = make_units(sizes, slots)
    if train:
        order = np.random.default_rng([seed, epoch, 7]).permutation(len(units))
        units = [units[i] for i in order]
    assigned = assign_units(units, slots)
    if not train:
        return [SlotPlan(tuple(a), None) for a in assigned]
    per_rank = batches_per_epoch(sizes, batch_size, world_size)
    plans = []
    for slot, a in enumerate(assigned):
        w = slot % nwk
        n = per_rank // nwk + (w < per_rank % nwk)
        # A slot left without units (fewer non-empty units than slots) resamples all of them.
        plans.append(SlotPlan(tuple(a) if a else tuple(units), n))
    return plans


# ------------------------------------------------------------------------- stages
def iter_units(urls: list[str], units: tuple[Unit, ...]) -> Iterator[dict]:
    for u in units:
        for i, sample in enumerate(read_samples(urls[u.shard])):
            if i % u.parts == u.part:
                yield sample


def cycle_units(urls: list[str], units: tuple[Unit, ...], rng: np.random.Generator) -> Iterator[dict]:
    """Units in a fresh random order on every pass, forever (training resampling)."""
    while True:
        for i in rng.permutation(len(units)):
            yield from iter_units(urls, (units[i],))


def shuffle(samples: Iterator[dict], bufsize: int, rng: np.random.Generator) -> Iterator[dict]:
    """Reservoir-style shuffle buffer (encoded bytes only, so it is cheap to hold)."""
    buf: list[dict] = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], s = s, buf[i]
        yield s
    while buf:
        yield buf.pop(int(rng.integers(len(buf))))


def take(samples: Iterator[dict], n: int) -> Iterator[dict]:
    return itertools.islice(samples, n)  # stops without reading sample n + 1 (no extra tar opened)


# OpenCV >= 4.10 decodes straight to RGB (no BGR->RGB pass); the reduced-size flags carry the
# colour bit, so it is swapped for the RGB one.
_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header (SOFn), or None if there is none.

    A few dozen bytes of marker walking: ~10x cheaper than opening the image with PIL,
    which was ~5 % of the whole per-sample decode cost.
    """
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT/JPG/DAC)
            h, w = struct.unpack_from(">HH", data, i + 5)
            return w, h
        elif marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        else:
            i += 2 + struct.unpack_from(">H", data, i + 2)[0]
    return None


def decode_image(data: bytes, size: int, reduced: bool = True, out: np.ndarray | None = None) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 (size, size, 3) RGB (written into ``out`` when given).

    With ``reduced``, libjpeg decodes JPEGs at 1/2, 1/4 or 1/8 scale when the result is still at
    least ``size`` on its short side: fewer pixels decoded, same area-resized output quality.
    """
    flag = cv2.IMREAD_COLOR
    if reduced and data[:2] == b"\xff\xd8":
        wh = jpeg_size(data)  # None: a malformed header; full decode then fails with a clear error
        if wh is not None:
            flag = next((f for factor, f in _REDUCED if min(wh) // factor >= size), flag)
    if _RGB is not None:
        flag = (flag & ~cv2.IMREAD_COLOR) | _RGB
    # shards already have EXIF orientation applied
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise UserError("cannot decode an image in the shards; run `segdist shards verify`")
    if _RGB is None:  # OpenCV < 4.10: swap channels after the resize, on fewer pixels
        img = cv2.cvtColor(resize_square(img, size), cv2.COLOR_BGR2RGB)
        if out is None:
            return img
        out[...] = img
        return out
    return resize_square(img, size, out)


def resize_square(img: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W, C) -> (size, size, C), written straight into ``out`` (a batch row) when given.

    Area averaging only where aliasing would show (>= 2x down); below that bilinear is 3x cheaper
    and what the classic loader uses too.
    """
    interp = cv2.INTER_AREA if min(img.shape[:2]) >= 2 * size else cv2.INTER_LINEAR
    r = cv2.resize(img, (size, size), dst=out, interpolation=interp)
    if out is not None and r.ctypes.data != out.ctypes.data:  # OpenCV allocated instead (``out`` not contiguous)
        out[...] = r
        return out
    return r


def decode_mask(data: bytes, size: int) -> np.ndarray:
    """8-bit index PNG bytes -> uint8 (size, size), nearest resize (class ids stay ids)."""
    m = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if m is None or m.ndim != 2:
        raise UserError("a mask in the shards is not a 1-channel index PNG; rebuild with `segdist shards build`")
    return cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST)


def batched(samples: Iterator[dict], batch_size: int, size: int, reduced: bool, partial: bool,
            device_decode: bool = False, alloc=None) -> Iterator[tuple[np.ndarray, np.ndarray, list, list | None]]:
    """Decode samples into batch buffers; yield ``(images, masks, keys, jpegs)`` per batch.

    ``alloc()`` returns the buffers to fill, uint8 (B, S, S, 3) and (B, S, S): fresh arrays by
    default, or a slot of a worker's shared-memory ring (decoding writes straight into it).
    A short last batch (``partial``) yields views of its first rows.

    With ``device_decode``, JPEG images are not decoded here: their bytes travel in ``jpegs``
    (None for rows decoded on the CPU, e.g. PNGs) and :func:`to_device` decodes them on the
    accelerator (nvJPEG on CUDA); ``jpegs`` is None without it.
    """
    alloc = alloc or (lambda: (np.zeros((batch_size, size, size, 3), np.uint8),
                               np.empty((batch_size, size, size), np.uint8)))
    images = masks = None
    keys: list[str] = []
    jpegs: list = []
    for s in samples:
        if not keys:
            images, masks = alloc()
        img_key = "image.jpg" if "image.jpg" in s else "image.png"
        i = len(keys)
        if device_decode and s[img_key][:2] == b"\xff\xd8":
            jpegs.append(s[img_key])
        else:
            decode_image(s[img_key], size, reduced, out=images[i])
            jpegs.append(None)
        masks[i] = decode_mask(s["mask.png"], size)
        keys.append(s["__key__"])
        if len(keys) == batch_size:
            yield images, masks, keys, jpegs if device_decode else None
            keys, jpegs = [], []
    if keys and partial:
        n = len(keys)
        yield images[:n], masks[:n], keys, jpegs if device_decode else None


def _to_batch(images, masks, keys: list[str], jpegs: list | None) -> dict:
    images, masks = torch.as_tensor(images), torch.as_tensor(masks)
    # (B, S, S, 3) permuted is exactly a channels_last (B, 3, S, S) tensor: no copy on the CPU.
    batch = {"image": images.permute(0, 3, 1, 2), "mask": masks, "key": keys}
    if jpegs is not None:
        batch["jpeg"] = jpegs
    return batch


def to_device(batch: dict, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to ``device``: image uint8 (B, 3, S, S), mask uint8 (B, S, S).

    uint8 crosses the bus (4x less than float32); conversion happens on the device. Rows that
    arrive as JPEG bytes (``data.decode=device``) are decoded there with torchvision (nvJPEG
    on CUDA) and resized with antialiasing.
    """
    image = batch["image"].to(device, non_blocking=True)
    mask = batch["mask"].to(device, non_blocking=True)
    rows = [i for i, j in enumerate(batch.get("jpeg") or []) if j is not None]
    if rows:
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(batch["jpeg"][i]), dtype=torch.uint8) for i in rows]
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        size = image.shape[-2:]
        for i, img in zip(rows, decoded):
            img = torch.nn.functional.interpolate(img[None].float(), size=size, mode="bilinear",
                                                  antialias=True, align_corners=False)
            image[i] = img[0].round_().clamp_(0, 255).to(torch.uint8)
    return image, mask


# ------------------------------------------------------------------------- one rank's stream
class ShardStream:
    """What one rank streams, as pure functions of (epoch, slot): plans, batch counts, batches.

    Holds no state and no handles, so worker processes get it whole (pickled under ``spawn``).
    """

    def __init__(self, urls: list[str], sizes: list[int], *, batch_size: int, image_size: int,
                 train: bool, seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = 128, reduced_decode: bool = True, device_decode: bool = False):
        if len(urls) != len(sizes):
            raise ValueError("urls and sizes differ in length")
        self.urls, self.sizes = list(urls), list(sizes)
        self.batch_size, self.image_size, self.train = batch_size, image_size, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.workers = num_workers, max(num_workers, 1)
        self.shuffle_buffer, self.reduced_decode = shuffle_buffer, reduced_decode
        self.device_decode = device_decode
        if train and batches_per_epoch(sizes, batch_size, world_size) == 0:
            raise UserError(
                f"train split has {sum(sizes)} samples: too few for batch_size={batch_size} on "
                f"{world_size} process(es); lower data.batch_size or add data"
            )

    def plans(self, epoch: int) -> list[SlotPlan]:
        """This rank's slot plans (one per worker)."""
        nwk = self.workers
        return plan_epoch(self.sizes, batch_size=self.batch_size, world_size=self.world_size,
                          workers=self.num_workers, seed=self.seed, epoch=epoch,
                          train=self.train)[self.rank * nwk:(self.rank + 1) * nwk]

    def num_batches(self, epoch: int, start_batch: int = 0) -> int:
        """Batches this rank yields in ``epoch`` from ``start_batch`` on."""
        if self.train:
            return sum(p.num_batches for p in self.plans(epoch)) - start_batch
        return sum(math.ceil(sum(u.size for u in p.units) / self.batch_size) for p in self.plans(epoch))

    def delivered(self, w: int, start_batch: int) -> int:
        """Batches slot ``w`` had delivered when the rank had taken ``start_batch`` (round-robin)."""
        return start_batch // self.workers + (w < start_batch % self.workers)

    def slot_batches(self, epoch: int, w: int, skip: int = 0, alloc=None):
        """Slot ``w``'s batches of ``epoch`` after its first ``skip``, as :func:`batched` yields them."""
        plan = self.plans(epoch)[w]
        if not self.train:
            yield from batched(iter_units(self.urls, plan.units), self.batch_size, self.image_size,
                               self.reduced_decode, partial=True, device_decode=self.device_decode, alloc=alloc)
            return
        rng = np.random.default_rng([self.seed, epoch, self.rank * self.workers + w])
        # take, then shuffle: the buffer would otherwise read (not decode) up to shuffle_buffer
        # samples past the epoch's end, which nearly doubled tar reading per epoch here.
        samples = take(cycle_units(self.urls, plan.units, rng), plan.num_batches * self.batch_size)
        samples = shuffle(samples, self.shuffle_buffer, rng)
        for _ in range(skip * self.batch_size):  # skip without decoding
            next(samples, None)
        yield from batched(samples, self.batch_size, self.image_size, self.reduced_decode, partial=False,
                           device_decode=self.device_decode, alloc=alloc)


# ------------------------------------------------------------------------- loader
class _Stop(Exception):
    pass


def _worker_loop(stream: ShardStream, w: int, start_epoch: int, end_epoch: int | None, start_batch: int,
                 images: torch.Tensor, masks: torch.Tensor, free, conn, stop, parent: int,
                 inherited: list) -> None:
    """One worker process: slot ``w``'s batches for every epoch, decoded into its shared ring.

    Protocol (per worker, in order): every message holds one permit of the semaphore ``free``
    (``prefetch`` of them) until the training process has read it, so a worker runs at most
    ``prefetch`` messages ahead. A batch is decoded into the next ring slot, then
    ``("batch", epoch, n, keys, jpegs)`` is sent on ``conn``; after each epoch ``("end", epoch,
    ...)``. Ring slots are used round-robin on both sides, so messages carry no slot numbers.

    ``conn`` is a pipe whose write end only this process holds (``inherited`` are the other
    pipe ends a fork copied in; they are closed first): if it dies mid-message the training
    process reads end-of-file instead of waiting for the rest, and if the training process
    dies a blocked send fails instead of waiting forever.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a forked copy of the trainer's graceful-stop handler
    for c in inherited:
        c.close()
    torch.set_num_threads(1)
    ring_images, ring_masks = images[w].numpy(), masks[w].numpy()
    ring, taken = ring_images.shape[0], 0

    def permit() -> None:
        while True:
            if stop.is_set() or os.getppid() != parent:  # closed, or the training process died
                raise _Stop
            if free.acquire(timeout=1.0):
                return

    def alloc():
        nonlocal taken
        permit()
        slot = taken % ring
        taken += 1
        return ring_images[slot], ring_masks[slot]

    epoch = start_epoch
    try:
        while end_epoch is None or epoch < end_epoch:
            skip = stream.delivered(w, start_batch) if epoch == start_epoch else 0
            for _, _, keys, jpegs in stream.slot_batches(epoch, w, skip, alloc):
                conn.send(("batch", epoch, len(keys), keys, jpegs))
            permit()
            conn.send(("end", epoch, 0, None, None))
            epoch += 1
    except (_Stop, BrokenPipeError, ConnectionResetError):
        pass  # closed, or nobody is reading any more
    except BaseException as e:  # noqa: BLE001 -- reported to, and raised in, the training process
        import traceback

        user = isinstance(e, UserError)
        try:
            conn.send(("error", epoch, 0, str(e) if user else traceback.format_exc(), user))
        except OSError:
            pass
    finally:
        conn.close()


def _shutdown(procs: list, stop, readers: list, timeout: float = 5.0) -> None:
    import time

    stop.set()
    for r in readers:
        r.close()  # a worker blocked sending gets a broken pipe and exits
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(deadline - time.monotonic(), 0.01))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


def check_shared_memory(need: int, path: str = "/dev/shm", ranks: int = 1) -> None:
    """Refuse up front when the batch rings cannot fit: a full /dev/shm is a SIGBUS mid-run, not an error.

    ``ranks``: processes on this node allocating the same (they all check the same free space).
    """
    import shutil

    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return  # no /dev/shm (macOS, Windows): the OS backs shared memory otherwise
    if need * ranks > free:
        per = f" ({ranks} processes on this node x {need / 2**20:.0f} MiB)" if ranks > 1 else ""
        raise UserError(
            f"the loader needs {need * ranks / 2**20:.0f} MiB of shared memory for its batch buffers{per} but "
            f"{path} has {free / 2**20:.0f} MiB free; lower data.prefetch, data.num_workers or data.batch_size, "
            f"or give the container more (docker run --shm-size=8g)")


_LIVE: weakref.WeakSet = weakref.WeakSet()  # loaders with running workers (their pipe ends, for forks)


class Loader:
    """One rank's batches over consecutive epochs; the worker processes live across all of them.

    Workers decode straight into a ring of ``prefetch`` batch slots each, in shared memory,
    and run into the next epoch while the training process finishes the current one, so no
    batch is pickled and no process is forked per epoch. The training process copies each
    batch out of its slot (into pinned memory on CUDA) and frees the slot; a batch it holds
    stays valid. Batches come round-robin from the workers, as from a DataLoader.

    With ``num_workers=0`` batches are decoded in the calling process. ``end_epoch=None``
    keeps producing epochs until :meth:`close` (workers stay at most ``prefetch`` messages ahead).
    """

    def __init__(self, stream: ShardStream, *, start_epoch: int = 0, end_epoch: int | None = None,
                 start_batch: int = 0, pin_memory: bool | None = None, prefetch: int = 4,
                 start_method: str | None = None):
        self.stream, self.start_epoch, self.end_epoch, self.start_batch = stream, start_epoch, end_epoch, start_batch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch = max(prefetch, 1)
        # fork: no re-import and workers share torch's pages; spawn where fork does not exist
        self.start_method = start_method or ("fork" if os.name == "posix" else "spawn")
        if self.start_method not in ("fork", "spawn"):  # workers watch their parent: forkserver breaks that
            raise ValueError(f"start_method must be 'fork' or 'spawn', not {self.start_method!r}")
        self._next_epoch = start_epoch
        self._reading = start_epoch  # the epoch the workers' messages are being read for
        self._procs: list = []
        self._readers: list = []
        self._finalizer = None
        self._closed = False

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()

    def epoch(self, epoch: int) -> EpochBatches:
        """The batches of ``epoch`` (iterate once; epochs in increasing order)."""
        if epoch < self._next_epoch or (self.end_epoch is not None and epoch >= self.end_epoch):
            raise ValueError(f"epoch {epoch} is not ahead in this loader (next {self._next_epoch}, "
                             f"end {self.end_epoch})")
        self._next_epoch = epoch + 1
        start = self.start_batch if epoch == self.start_epoch else 0
        return EpochBatches(self, epoch, start, self.stream.num_batches(epoch, start))

    # -- internals
    def _start(self) -> None:
        s = self.stream
        nwk, b, px = s.workers, s.batch_size, s.image_size
        ctx = torch.multiprocessing.get_context(self.start_method)
        check_shared_memory(nwk * self.prefetch * b * px * px * 4, ranks=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self._images = torch.empty((nwk, self.prefetch, b, px, px, 3), dtype=torch.uint8).share_memory_()
        self._masks = torch.empty((nwk, self.prefetch, b, px, px), dtype=torch.uint8).share_memory_()
        self._ring_images, self._ring_masks = self._images.numpy(), self._masks.numpy()
        self._free = [ctx.Semaphore(self.prefetch) for _ in range(nwk)]
        pipes = [ctx.Pipe(duplex=False) for _ in range(nwk)]
        self._readers = [r for r, _ in pipes]
        self._stop = ctx.Event()
        self._taken = [0] * nwk
        # before any start: a failure half-way still stops the workers already running
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._stop, self._readers)
        fork = self.start_method == "fork"
        # A forked child gets copies of every open pipe end, also those of other live loaders (a
        # val loader forks while the train loader runs); it closes all but its own write end.
        others = [r for loader in _LIVE if loader is not self for r in loader._readers if not r.closed] if fork else []
        try:
            for w in range(nwk):
                inherited = [c for k, (r, wr) in enumerate(pipes) for c in (r, wr) if fork and (k != w or c is r)]
                p = ctx.Process(target=_worker_loop, daemon=True,
                                args=(s, w, self.start_epoch, self.end_epoch, self.start_batch, self._images,
                                      self._masks, self._free[w], pipes[w][1], self._stop, os.getpid(),
                                      inherited + others))
                p.start()
                self._procs.append(p)
        except BaseException:
            self.close()
            raise
        finally:
            for _, wr in pipes:
                wr.close()  # only the workers hold write ends now: a dead one reads as end-of-file
        _LIVE.add(self)

    def _died(self, w: int) -> UserError:
        p = self._procs[w]
        p.join(timeout=5)
        hint = " (killed: out of memory? lower data.num_workers or data.batch_size)" if p.exitcode == -9 else ""
        return UserError(f"data loader worker {w} died with exit code {p.exitcode}{hint}")

    def _receive(self, w: int, epoch: int) -> dict | None:
        """Worker ``w``'s next batch of ``epoch`` (None at its end); earlier epochs' leftovers dropped."""
        conn = self._readers[w]
        while True:
            if self._closed:
                raise ValueError("this Loader is closed")
            if epoch != self._reading:  # checked before reading: a stale iterator must not eat a batch
                raise ValueError(f"this iterator of epoch {epoch} is stale: epoch {self._reading} is being read")
            if not conn.poll(2.0):  # readable also at end-of-file, so a dead worker shows up here
                if not self._procs[w].is_alive() and not conn.poll(0):
                    raise self._died(w)
                continue
            try:
                kind, e, n, keys, extra = conn.recv()
            except (EOFError, OSError):  # OSError: end-of-file half-way through a message
                raise self._died(w) from None
            if kind == "error":
                if extra:
                    raise UserError(keys)
                raise RuntimeError(f"data loader worker {w} failed:\n{keys}")
            if kind == "end":
                self._free[w].release()
                if e == epoch:
                    return None
                continue
            slot = self._taken[w] % self.prefetch
            self._taken[w] += 1
            if e < epoch:  # a batch of an epoch the caller left early
                self._free[w].release()
                continue
            if e > epoch:  # cannot happen while epochs are read in order (checked above)
                raise RuntimeError(f"worker {w} sent epoch {e} while epoch {epoch} was read")
            try:
                image = torch.empty((n, *self._images.shape[3:]), dtype=torch.uint8, pin_memory=self.pin_memory)
                mask = torch.empty((n, *self._masks.shape[3:]), dtype=torch.uint8, pin_memory=self.pin_memory)
                # numpy's copy, not torch's: torch parallelises it over OpenMP threads whose spin-waits
                # took ~0.6 of a core from the decoders here (measured, 2 cores).
                np.copyto(image.numpy(), self._ring_images[w, slot, :n])
                np.copyto(mask.numpy(), self._ring_masks[w, slot, :n])
            finally:
                self._free[w].release()  # even when interrupted: a lost permit would stall the worker
            return _to_batch(image, mask, keys, extra)

    def _iter(self, epoch: int, start: int) -> Iterator[dict]:
        if self._closed:
            raise ValueError("this Loader is closed")
        if epoch < self._reading:  # its messages were already read past (and dropped)
            raise ValueError(f"epoch {epoch} cannot be read after epoch {self._reading}")
        self._reading = epoch
        s = self.stream
        if s.num_workers == 0:
            for images, masks, keys, jpegs in s.slot_batches(epoch, 0, start):
                batch = _to_batch(images, masks, keys, jpegs)
                if self.pin_memory:
                    batch["image"], batch["mask"] = batch["image"].pin_memory(), batch["mask"].pin_memory()
                yield batch
            return
        if not self._procs:
            self._start()
        # Round-robin over the workers, starting with the one whose batch was next at
        # ``start``; a worker that ends its epoch drops out (val: slots differ in length).
        order = collections.deque((start + k) % s.workers for k in range(s.workers))
        while order:
            w = order.popleft()
            batch = self._receive(w, epoch)
            if batch is not None:
                order.append(w)
                yield batch


class EpochBatches:
    """One epoch of a :class:`Loader`: ``len()`` batches, iterated once."""

    def __init__(self, loader: Loader, epoch: int, start: int, length: int):
        self.loader, self.epoch_index, self.start, self.length = loader, epoch, start, length
        self.iterated = False

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        if self.iterated:  # the workers have moved on: a second pass would mix in the next epoch
            raise ValueError(f"epoch {self.epoch_index} was already iterated; a Loader streams each epoch once")
        self.iterated = True
        return self.loader._iter(self.epoch_index, self.start)


class OneEpoch:
    """A single epoch with its own short-lived :class:`Loader` (validation, eval, tests)."""

    def __init__(self, stream: ShardStream, epoch: int, start_batch: int, **loader_kw):
        self.stream, self.epoch, self.start_batch, self.loader_kw = stream, epoch, start_batch, loader_kw

    def __len__(self) -> int:
        return self.stream.num_batches(self.epoch, self.start_batch)

    def __iter__(self) -> Iterator[dict]:
        with Loader(self.stream, start_epoch=self.epoch, end_epoch=self.epoch + 1, start_batch=self.start_batch,
                    **self.loader_kw) as loader:
            yield from loader.epoch(self.epoch)


def make_loader(urls: list[str], sizes: list[int], *, batch_size: int, image_size: int, train: bool,
                num_workers: int = 0, pin_memory: bool | None = None, epoch: int = 0, start_batch: int = 0,
                prefetch: int = 4, start_method: str | None = None, **stream_kw) -> OneEpoch:
    """One epoch of one rank's batches (``len()`` known up front); workers live for the epoch.

    Training over many epochs uses :class:`Loader` directly so its workers persist.
    """
    stream = ShardStream(urls, sizes, batch_size=batch_size, image_size=image_size, train=train,
                         num_workers=num_workers, **stream_kw)
    return OneEpoch(stream, epoch, start_batch, pin_memory=pin_memory, prefetch=prefetch,
                    start_method=start_method)
