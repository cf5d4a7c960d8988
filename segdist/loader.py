"""The process machinery behind :mod:`segdist.stream`: worker processes, pipes, a shared-memory ring.

:class:`Loader` is one rank's batches over consecutive epochs. One process per slot of this
rank (see :class:`~segdist.stream.ShardStream`), alive for the whole run, decodes batch after
batch straight into its ring of shared-memory batch slots and runs on into the next epoch
while the training process finishes the current one. Only keys cross the pipe, so the
training process's cost per batch is one memcpy (``docs/benchmarks.md``: 0.90 of the
read+decode limit on 2 cores, where a ``DataLoader`` returning the same batches reached 0.45).

What it guarantees, each with a test in ``tests/test_loader.py``: a dead worker is an error,
never a hang; workers exit when the training process dies; a worker never runs more than
``prefetch`` messages ahead; batches the caller holds stay valid after the ring wraps.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import time
import traceback
import weakref
from typing import Iterator

import numpy as np
import torch

from .errors import UserError
from .stream import ShardStream, to_batch

__all__ = ["Loader", "EpochBatches", "OneEpoch", "check_shared_memory"]

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
    # Ctrl-C and stop signals are the training process's to handle: SLURM signals every process
    # of the job, and a decoder dying first would turn a graceful pause into a crash. Workers
    # still end on close(), when the trainer dies (they poll it), and on SIGKILL. They start
    # with these signals blocked (see Loader._start), so none can arrive before this.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if _CAN_BLOCK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
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
        user = isinstance(e, UserError)
        try:
            conn.send(("error", epoch, 0, str(e) if user else traceback.format_exc(), user))
        except OSError:
            pass
    finally:
        conn.close()


def _shutdown(procs: list, stop, readers: list, timeout: float = 5.0) -> None:
    stop.set()
    for r in readers:
        r.close()  # a worker blocked sending gets a broken pipe and exits
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(deadline - time.monotonic(), 0.01))
    for p in procs:
        if p.is_alive():
            p.kill()  # workers ignore SIGTERM (see _worker_loop)
            p.join(timeout=5)


def check_shared_memory(need: int, path: str = "/dev/shm", ranks: int = 1) -> None:
    """Refuse up front when the batch rings cannot fit: a full /dev/shm is a SIGBUS mid-run, not an error.

    ``ranks``: processes on this node allocating the same (they all check the same free space).
    """
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


_STOP_SIGNALS = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, n)}
_CAN_BLOCK = hasattr(signal, "pthread_sigmask")  # POSIX
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
        nwk, b, (h, w) = s.workers, s.batch_size, s.image_hw
        ctx = torch.multiprocessing.get_context(self.start_method)
        check_shared_memory(nwk * self.prefetch * b * h * w * 4, ranks=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self._images = torch.empty((nwk, self.prefetch, b, h, w, 3), dtype=torch.uint8).share_memory_()
        self._masks = torch.empty((nwk, self.prefetch, b, h, w), dtype=torch.uint8).share_memory_()
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
        # Blocked across the forks: a child gets them only once it ignores them (a signal in the
        # window between fork and its handler set-up would kill a decoder); pending ones then
        # reach this process's own handlers.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if _CAN_BLOCK else None
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
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
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
            return to_batch(image, mask, keys, extra)

    def _iter(self, epoch: int, start: int) -> Iterator[dict]:
        if self._closed:
            raise ValueError("this Loader is closed")
        if epoch < self._reading:  # its messages were already read past (and dropped)
            raise ValueError(f"epoch {epoch} cannot be read after epoch {self._reading}")
        self._reading = epoch
        s = self.stream
        if s.num_workers == 0:
            for images, masks, keys, jpegs in s.slot_batches(epoch, 0, start):
                batch = to_batch(images, masks, keys, jpegs)
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
