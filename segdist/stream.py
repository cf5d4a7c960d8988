"""Stream shards into fixed-size uint8 batches: split by rank and worker, exact per epoch.

The pipeline is a chain of small stages over iterators of sample dicts, as in WebDataset:
``read units (tar -> {__key__, image.jpg, mask.png}) -> take n -> shuffle buffer -> decode+resize
-> batch``. Reading is :func:`segdist.shards.reader.read_samples`, so local paths, ``http(s)://``
URLs and ``pipe:`` commands all work; an http(s) read without data for ``data.read_timeout``
seconds fails. Each shard is checked against its manifest entry as it streams (keys in order;
count, bytes and sha256 when read to its end), and every sample has an image and a mask: a cut,
swapped or replaced shard is an error naming it, never a silently different epoch.

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
* **Elastic resume** (other world size, workers or batch size than the interrupted run): the
  samples the old plan had delivered are replayed as ``(shard, index)`` references, without
  reading a tar, and the rest of that epoch (``carry``) is spread over the new slots: every
  rank the same number of batches, sizes differing by at most one, every remaining sample
  exactly once. Later epochs use the new plan. Chains of such resumes compose.

Everything here is a pure function of (seed, epoch, slot) and testable on lists; the worker
processes that run it live in :mod:`segdist.loader`, and decoding in :mod:`segdist.decode`.

Batches are dicts: ``image`` uint8 (B, 3, S, S) (RGB; a channels-last view), ``mask`` uint8
(B, S, S) (class ids, 255 = ignore), ``key`` list[str].
"""

from __future__ import annotations

import collections
import itertools
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .config import DataConfig
from .decode import decode_image, decode_mask, place
from .resize import as_hw
from .errors import UserError
from .shards.reader import MAX_MEMBER_BYTES, ShardId, image_bytes, mask_bytes, read_samples

__all__ = ["ShardStream", "plan_epoch", "batches_per_epoch", "batched", "to_batch"]


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
Ref = tuple[int, int]
"""A sample's place: (shard index, position in the shard)."""


def iter_units(read: Callable[[int], Iterator], units: tuple[Unit, ...]) -> Iterator:
    """The units' samples in order. ``read(shard)`` yields a shard's samples in file order: the
    tar's (read whole, so its count is checked) or, for replaying a plan, :data:`Ref` tuples."""
    for u in units:
        for i, sample in enumerate(read(u.shard)):
            if i % u.parts == u.part:
                yield sample


def cycle_units(read: Callable[[int], Iterator], units: tuple[Unit, ...], rng: np.random.Generator) -> Iterator:
    """Units in a fresh random order on every pass, forever (training resampling)."""
    while True:
        for i in rng.permutation(len(units)):
            yield from iter_units(read, (units[i],))


def read_refs(read: Callable[[int], Iterator], refs: list[Ref]) -> Iterator:
    """The samples at ``refs`` (sorted; repeats yield a sample again), each shard read once, in order."""
    for shard, group in itertools.groupby(refs, key=lambda r: r[0]):
        want = collections.Counter(i for _, i in group)
        for i, sample in enumerate(read(shard)):
            for _ in range(want.get(i, 0)):
                yield sample


def spread(refs: list[Ref], world_size: int, workers: int, batch_size: int) -> tuple[list[list[tuple]], int]:
    """Spread what is left of an interrupted epoch over ``world_size x workers`` slots.

    Every rank gets the same number of batches (DDP steps in lockstep); batch sizes differ by at
    most one and none is empty; rank batch ``j`` comes from worker ``j % workers``. Each slot
    gets a contiguous run of the sorted ``refs`` (few tars to read). Returns, per rank and
    worker, ``(refs, batch sizes)``, and how many refs did not fit (only when fewer remain than
    there are ranks, or batch_size is 1 and they do not divide evenly).
    """
    n = -(-len(refs) // (world_size * batch_size))
    while n and world_size * n > len(refs):
        n -= 1
    total = world_size * n
    used = min(len(refs), total * batch_size)
    sizes = [used // total + (k < used % total) for k in range(total)] if total else []
    out, start = [], 0
    for r in range(world_size):
        rank = []
        for w in range(workers):
            mine = [sizes[r * n + j] for j in range(w, n, workers)]
            rank.append((refs[start:start + sum(mine)], mine))
            start += sum(mine)
        out.append(rank)
    return out, len(refs) - used


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


def batched(samples: Iterator[dict], batch_size: int, size, reduced: bool, partial: bool,
            device_decode: bool = False, alloc=None, sizes: Iterator[int] | None = None,
            placer: Callable | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, list, list | None]]:
    """Decode samples into batch buffers; yield ``(images, masks, keys, jpegs)`` per batch.

    ``size`` is S or (H, W). ``alloc()`` returns the buffers to fill, uint8 (B, H, W, 3) and
    (B, H, W): fresh arrays by default, or a slot of a worker's shared-memory ring (decoding
    writes straight into it). A short last batch (``partial``), or one shorter than
    ``batch_size`` because ``sizes`` says so (the rest of an interrupted epoch), yields views of
    its first rows. Samples are squashed to (H, W) unless ``placer(sample, image_row,
    mask_row)`` places them (crop/pad modes).

    With ``device_decode``, JPEG images are not decoded here: their bytes travel in ``jpegs``
    (None for rows decoded on the CPU, e.g. PNGs) and :func:`to_device` decodes them on the
    accelerator (nvJPEG on CUDA); ``jpegs`` is None without it.
    """
    hw = as_hw(size)
    alloc = alloc or (lambda: (np.zeros((batch_size, *hw, 3), np.uint8), np.empty((batch_size, *hw), np.uint8)))
    sizes = iter(sizes) if sizes is not None else itertools.repeat(batch_size)
    images = masks = None
    keys: list[str] = []
    jpegs: list = []
    want = 0
    for s in samples:
        if not keys:
            images, masks = alloc()
            want = next(sizes)
        image = image_bytes(s)
        i = len(keys)
        if placer is not None:
            placer(s, images[i], masks[i])
            jpegs.append(None)
        elif device_decode and image[:2] == b"\xff\xd8":
            jpegs.append(image)
            masks[i] = decode_mask(mask_bytes(s), hw)
        else:
            decode_image(image, hw, reduced, out=images[i])
            jpegs.append(None)
            masks[i] = decode_mask(mask_bytes(s), hw)
        keys.append(s["__key__"])
        if len(keys) == want:
            rows = slice(None) if want == batch_size else slice(want)
            yield images[rows], masks[rows], keys, jpegs if device_decode else None
            keys, jpegs = [], []
    if keys and partial:
        n = len(keys)
        yield images[:n], masks[:n], keys, jpegs if device_decode else None


def to_batch(images, masks, keys: list[str], jpegs: list | None) -> dict:
    images, masks = torch.as_tensor(images), torch.as_tensor(masks)
    # (B, S, S, 3) permuted is exactly a channels_last (B, 3, S, S) tensor: no copy on the CPU.
    batch = {"image": images.permute(0, 3, 1, 2), "mask": masks, "key": keys}
    if jpegs is not None:
        batch["jpeg"] = jpegs
    return batch



# ------------------------------------------------------------------------- one rank's stream
PLAN_KEYS = ("world_size", "num_workers", "batch_size", "seed")
"""What a training epoch's sample order depends on (a resume with others is elastic)."""


class ShardStream:
    """What one rank streams, as pure functions of (epoch, slot): plans, batch counts, batches.

    Holds no state and no handles, so worker processes get it whole (pickled under ``spawn``).
    ``carry`` continues epoch ``carry_epoch`` after runs with other plans were interrupted in
    it: ``({"plan": {world_size, num_workers, batch_size, seed}, "batch": batches taken per
    rank}, ...)``, oldest first. That epoch then holds exactly the samples those runs had not
    delivered (:func:`spread`); the others are as if nothing happened.
    """

    def __init__(self, urls: list[str], sizes: list[int], *, batch_size: int, image_size: int,
                 train: bool, seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = 128, reduced_decode: bool = True, device_decode: bool = False,
                 read_timeout: float = 60.0, carry: tuple = (), carry_epoch: int | None = None,
                 resize: str = "squash", short_side: int = 0, scale: tuple[float, float] = (1.0, 1.0),
                 ids: list[ShardId] | None = None, max_member: int = MAX_MEMBER_BYTES):
        if len(urls) != len(sizes) or (ids is not None and len(ids) != len(urls)):
            raise ValueError("urls, sizes and ids differ in length")
        self.urls, self.sizes = list(urls), list(sizes)
        self.ids = list(ids) if ids is not None else [ShardId(samples=n) for n in sizes]
        self.max_member = max_member
        self.batch_size, self.image_size, self.train = batch_size, image_size, train
        self.image_hw = as_hw(image_size)
        self.resize, self.short_side, self.scale = resize, short_side, tuple(scale)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.workers = num_workers, max(num_workers, 1)
        self.shuffle_buffer, self.reduced_decode = shuffle_buffer, reduced_decode
        self.device_decode, self.read_timeout = device_decode, read_timeout
        self.carry, self.carry_epoch = tuple(carry), carry_epoch
        if train and batches_per_epoch(sizes, batch_size, world_size) == 0:
            raise UserError(
                f"train split has {sum(sizes)} samples: too few for batch_size={batch_size} on "
                f"{world_size} process(es); lower data.batch_size or add data"
            )
        # Computed once here, before workers fork: they inherit it.
        self.spread, self.dropped = ((), 0)
        if self.carry:
            self.spread, self.dropped = spread(sorted(self._left(self.carry).elements()), world_size,
                                               self.workers, batch_size)

    @classmethod
    def from_config(cls, urls: list[str], sizes: list[int], data: DataConfig, *, train: bool, seed: int = 0,
                    rank: int = 0, world_size: int = 1, batch_size: int = 0, num_workers: int = -1,
                    **kw) -> ShardStream:
        """The stream that the ``data.*`` keys describe (``batch_size``/``num_workers`` may override them)."""
        return cls(urls, sizes, batch_size=batch_size or data.batch_size, image_size=data.image_size, train=train,
                   seed=seed, rank=rank, world_size=world_size,
                   num_workers=data.num_workers if num_workers < 0 else num_workers,
                   shuffle_buffer=data.shuffle_buffer, reduced_decode=data.reduced_decode,
                   device_decode=data.decode == "device", read_timeout=data.read_timeout, resize=data.resize,
                   short_side=data.short_side, scale=tuple(data.scale), max_member=int(data.max_member_mb * 2**20),
                   **kw)

    def plan(self) -> dict:
        return {"world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size,
                "seed": self.seed}

    def plans(self, epoch: int, rank: int | None = None) -> list[SlotPlan]:
        """A rank's slot plans (one per worker; this rank's by default)."""
        nwk, rank = self.workers, self.rank if rank is None else rank
        return plan_epoch(self.sizes, batch_size=self.batch_size, world_size=self.world_size,
                          workers=self.num_workers, seed=self.seed, epoch=epoch,
                          train=self.train)[rank * nwk:(rank + 1) * nwk]

    def num_batches(self, epoch: int, start_batch: int = 0) -> int:
        """Batches this rank yields in ``epoch`` from ``start_batch`` on."""
        if self.train and self.carry and epoch == self.carry_epoch:
            return sum(len(sizes) for _, sizes in self.spread[self.rank]) - start_batch
        if self.train:
            return sum(p.num_batches for p in self.plans(epoch)) - start_batch
        return sum(math.ceil(sum(u.size for u in p.units) / self.batch_size) for p in self.plans(epoch))

    def delivered(self, w: int, start_batch: int) -> int:
        """Batches slot ``w`` had delivered when the rank had taken ``start_batch`` (round-robin)."""
        return start_batch // self.workers + (w < start_batch % self.workers)

    def _reader(self, refs_only: bool) -> Callable[[int], Iterator]:
        if refs_only:
            return lambda shard: ((shard, i) for i in range(self.sizes[shard]))
        return lambda shard: read_samples(self.urls[shard], self.ids[shard], self.read_timeout, self.max_member)

    def train_order(self, epoch: int, w: int, rank: int | None = None,
                    refs_only: bool = False) -> tuple[Iterator, list[int]]:
        """Slot ``w``'s training samples of ``epoch`` in delivery order, and its batch sizes.

        ``refs_only`` gives :data:`Ref` tuples instead of samples, in the same order, without
        reading anything: what replays a plan for an elastic resume.
        """
        rank = self.rank if rank is None else rank
        read = self._reader(refs_only)
        if self.carry and epoch == self.carry_epoch:
            refs, sizes = self.spread[rank][w]
            rng = np.random.default_rng([self.seed, epoch, len(self.carry), rank * self.workers + w])
            samples = iter(refs) if refs_only else read_refs(read, refs)
            return shuffle(samples, self.shuffle_buffer, rng), sizes
        plan = self.plans(epoch, rank)[w]
        rng = np.random.default_rng([self.seed, epoch, rank * self.workers + w])
        # take, then shuffle: the buffer would otherwise read (not decode) up to shuffle_buffer
        # samples past the epoch's end, which nearly doubled tar reading per epoch here.
        samples = take(cycle_units(read, plan.units, rng), plan.num_batches * self.batch_size)
        return shuffle(samples, self.shuffle_buffer, rng), [self.batch_size] * plan.num_batches

    def placer(self, epoch: int) -> Callable | None:
        """Crop/pad placement of one sample into batch rows (None in ``squash`` mode). Training
        crops are random per (seed, epoch, key): a resume that skips samples draws the same ones."""
        if self.resize == "squash":
            return None

        def place_one(sample: dict, image_row: np.ndarray, mask_row: np.ndarray) -> None:
            key = sample["__key__"].encode()
            rng = np.random.default_rng([self.seed, epoch, zlib.crc32(key)]) if self.train else None
            place(image_bytes(sample), mask_bytes(sample), self.resize, self.image_hw, image_row, mask_row,
                  short_side=self.short_side, scale=self.scale, rng=rng, reduced=self.reduced_decode)

        return place_one

    def slot_batches(self, epoch: int, w: int, skip: int = 0, alloc=None):
        """Slot ``w``'s batches of ``epoch`` after its first ``skip``, as :func:`batched` yields them."""
        common = dict(device_decode=self.device_decode, alloc=alloc, placer=self.placer(epoch))
        if not self.train:
            samples = iter_units(self._reader(False), self.plans(epoch)[w].units)
            yield from batched(samples, self.batch_size, self.image_hw, self.reduced_decode, partial=True, **common)
            return
        samples, sizes = self.train_order(epoch, w)
        for _ in range(sum(sizes[:skip])):  # skip without decoding
            next(samples, None)
        yield from batched(samples, self.batch_size, self.image_hw, self.reduced_decode, partial=False,
                           sizes=sizes[skip:], **common)

    def epoch_refs(self, epoch: int, start_batch: int = 0, end_batch: int | None = None) -> collections.Counter:
        """Every rank's samples of ``epoch`` between rank batches ``start_batch`` and ``end_batch``, as refs."""
        out: collections.Counter = collections.Counter()
        for rank in range(self.world_size):
            for w in range(self.workers):
                refs, sizes = self.train_order(epoch, w, rank, refs_only=True)
                lo = sum(sizes[:self.delivered(w, start_batch)])
                hi = sum(sizes[:self.delivered(w, end_batch)]) if end_batch is not None else sum(sizes)
                out.update(itertools.islice(refs, lo, hi))
        return out

    def _left(self, segments: tuple) -> collections.Counter:
        """What epoch ``carry_epoch`` still owes after ``segments`` (each run delivered its batches)."""
        left = None
        for k, seg in enumerate(segments):
            plan = seg["plan"]
            kw = dict(batch_size=plan["batch_size"], image_size=self.image_size, train=True, seed=plan["seed"],
                      world_size=plan["world_size"], num_workers=plan["num_workers"],
                      shuffle_buffer=self.shuffle_buffer, carry=segments[:k], carry_epoch=self.carry_epoch)
            past = ShardStream(self.urls, self.sizes, **kw)
            if left is None:
                left = past.epoch_refs(self.carry_epoch)
            left -= past.epoch_refs(self.carry_epoch, 0, seg["batch"])
        return left
