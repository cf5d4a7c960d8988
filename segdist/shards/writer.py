"""Where a build writes: one build per output (the lock), what ``--out`` may replace, and the tar writer.

The build itself (:mod:`.build`) writes into a temp folder beside ``--out`` and swaps it in at the
end (:func:`segdist.atomic.atomic_dir`); a swap a killed build left half done is repaired first
(:func:`remove_stale`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from ..atomic import repair_swap, sha256_file
from ..errors import UserError
from .discover import Discovery
from .manifest import FORMAT, MANIFEST

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


class ShardSink:
    """Writes one split through ``webdataset.ShardWriter``; records name/samples/bytes/sha256 per shard."""

    def __init__(self, folder: Path, split: str, maxcount: int, maxsize: float):
        import webdataset as wds  # lazy: only a build writes tars, and reading shards never needs WebDataset

        self.folder = folder
        self.records: list[dict] = []
        self._files: dict[str, object] = {}
        self._counts: Counter = Counter()
        # encoder=False: values are already encoded bytes; mtime=0 makes rebuilds byte-identical.
        # A bare-name pattern + opener: a '%' in the output path cannot break `pattern % index`, and
        # webdataset's URL handling (gopen, WDS_SECURE) stays out of local writes.
        self._writer = wds.ShardWriter(f"{split}-%06d.tar", maxcount=maxcount, maxsize=maxsize,
                                       post=self._finished, opener=self._open, verbose=0,
                                       encoder=False, mtime=0)

    def _open(self, name: str):
        f = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _finished
        self._files[name] = f
        return f

    def _finished(self, name: str) -> None:
        f = self._files.pop(name)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        path = self.folder / name
        self.records.append({"name": name, "samples": self._counts[name], "bytes": path.stat().st_size,
                             "sha256": sha256_file(path)})

    def write(self, key: str, image: bytes, image_ext: str, mask: bytes) -> str:
        self._writer.write({"__key__": key, f"image.{image_ext}": image, "mask.png": mask})
        name = self._writer.fname
        self._counts[name] += 1
        return name

    def close(self) -> list[dict]:
        self._writer.close()
        return self.records

    def abort(self) -> None:
        """Close everything (the temp folder is about to be removed). The tar is ended, not just its
        file closed: otherwise tarfile's finaliser later writes into the closed file and prints
        ``Exception ignored ... write to closed file`` after the user's one-line error."""
        with contextlib.suppress(Exception):  # already failing; the folder goes anyway
            self._writer.close()
        for f in self._files.values():
            f.close()
        self._files.clear()


_LOCK_WAIT_S = 15.0


@contextlib.contextmanager
def build_lock(out: Path):
    """Hold ``.<out>.lock`` beside ``out``: one build per output at a time (released even on kill -9).

    The file is removed on exit; a waiter that locked the removed file notices (inode changed) and
    retries, so two builds never both hold "the" lock.
    """
    if fcntl is None:  # pragma: no cover - not POSIX: no lock, builds must not overlap
        yield
        return
    lock_path = out.parent / f".{out.name}.lock"
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"--out {out}: cannot create its lock file {lock_path} ({e.strerror}); "
                            f"pass a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if same_file(fd, lock_path):
                break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise UserError(f"another 'segdist shards build' is writing {out} (lock {lock_path}); "
                                "wait for it to finish")
        os.close(fd)
        time.sleep(0.1)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def remove_stale(out: Path) -> list[str]:
    """Finish or undo what a killed build left beside ``out`` (caller holds the lock): an old copy moved aside
    with no ``out`` is put back, never deleted before a new one is in place (:func:`repair_swap`)."""
    notes = repair_swap(out)
    for note in notes:
        print(f"segdist: {note}", file=sys.stderr)
    return notes


def check_out(out: Path, discovery: Discovery, force: bool) -> None:
    sources = [discovery.root] + [Path(v) for k, v in discovery.extra.items() if k in ("images", "masks", "manifest")]
    resolved = out.resolve()
    for s in sources:
        s = s.resolve()
        if s == resolved or resolved in s.parents:
            raise UserError(f"--out {out} would replace the source data at {s}; choose another output folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_shard_folder(out) and not force:
        raise UserError(f"--out {out} is a non-empty folder that is not a shard folder; "
                        "pass --force to replace it, or choose another path")


def is_shard_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False
