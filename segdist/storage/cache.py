"""A node-local LRU cache of whole shards, shared by every rank and loader worker on the node.

Layout of ``data.cache_dir``: ``<entry>`` complete shards, ``<entry>.<bytes>.part`` downloads in
flight (``<bytes>`` = the size they reserve), ``.lock``. An entry's name holds a hash of its URL
and of its ETag (one HEAD the first time a process opens the URL says which), so a replaced object
is another entry: a stale copy is never read, and the old one ages out.

Every lock is an ``fcntl.flock``, which the kernel drops when a process dies, so a killed worker
never wedges the cache:

* a **reader** holds a shared lock on the entry it reads; eviction takes an exclusive lock
  without waiting and skips what it cannot lock: no file is deleted under a reader;
* a **downloader** holds an exclusive lock on its ``.part``; others that want the same shard wait
  for that lock, then open the entry: each shard is fetched once per node. A ``.part`` whose lock
  is free belongs to a dead process and is removed; a failed download removes its own;
* ``.lock`` is held only while the cache is counted and room is made, and while a ``.part`` is
  created or renamed into place. So the entries' bytes plus the sizes the ``.part`` files reserve
  never exceed ``data.cache_limit``; a shard that cannot fit (everything else is being read)
  streams past the cache instead.

LRU order is each entry's mtime, set on every open. Needs a local POSIX filesystem (flock on
NFS is not reliable): ``cache_dir`` is meant to be a node's local disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO

from ..errors import UserError
from . import objects, s3, stats

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK = ".lock"
FREE_SHARE = 0.10
"""With no ``data.cache_limit`` the cache grows until this share of its disk is left free."""


def entry_name(url: str, etag: str) -> str:
    """``<hash of URL + ETag>-<the object's own name>``: one version of one object."""
    digest = hashlib.sha256(f"{url}\n{etag}".encode()).hexdigest()[:24]
    return f"{digest}-{re.sub(r'[^A-Za-z0-9._-]', '_', url.rsplit('/', 1)[-1])[-80:]}"


class ShardCache:
    """Whole objects under ``folder``, at most ``limit`` bytes (0: until :data:`FREE_SHARE` of the disk is free)."""

    def __init__(self, folder: str | os.PathLike, limit: int = 0):
        if fcntl is None:
            raise UserError("data.cache_dir needs a POSIX system (file locks); leave it empty to stream without one")
        self.dir, self.limit = Path(folder), limit
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"data.cache_dir {self.dir} cannot be created ({e.strerror}); pass a writable local "
                            f"folder") from None

    def open(self, url: str, read_timeout: float = 60.0) -> BinaryIO:
        """A binary stream of ``url``'s bytes: the cached copy, fetched first if this node has none."""
        etag, size = _version(url, read_timeout)
        entry = self.dir / entry_name(url, etag)
        part = entry.with_name(f"{entry.name}.{size}.part")
        while True:
            f, busy, fits, fd = _open_entry(entry), False, True, -1
            if f is None:
                with self._locked():
                    f = _open_entry(entry)
                    busy = f is None and _busy(part)
                    if f is None and not busy:
                        fits = self._make_room(size)
                        fd = _create_locked(part) if fits else -1
            if not fits:  # the rest of the cache is being read: stream this one past it
                stats.add(cache_bypass=1)
                return objects.open_object(url, read_timeout, etag, size)
            if f is not None:
                os.utime(f.fileno())  # most recently used
                stats.add(cache_hits=1)
                return f
            if busy:
                _wait(part)  # another process fetches it; then it is an entry (or, if that failed, ours to fetch)
                continue
            f = self._fetch(url, read_timeout, etag, size, entry, part, fd)
            if f is not None:
                return f

    def usage(self) -> int:
        """Bytes held: complete entries plus what downloads in flight reserve."""
        entries, reserved = self._scan()
        return sum(n for _, n, _ in entries) + reserved

    # -- internals
    @contextlib.contextmanager
    def _locked(self):
        with open(self.dir / LOCK, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def _fetch(self, url: str, read_timeout: float, etag: str, size: int, entry: Path, part: Path,
               fd: int) -> BinaryIO | None:
        """Download into ``part`` (whose exclusive lock ``fd`` holds), rename it to ``entry``, open that."""
        try:
            with os.fdopen(os.dup(fd), "wb") as out, objects.ObjectReader(url, read_timeout, etag, size) as src:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())  # a crash must not leave a complete-looking entry with holes
            with self._locked():
                os.rename(part, entry)
                os.close(fd)  # releases the download lock: waiters open the entry now
                fd = -1
                f = _open_entry(entry)  # its shared lock is taken before .lock is free: no eviction between
            stats.add(cache_fetches=1)
            return f
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)  # before the lock goes: a waiter then finds neither part nor entry, and fetches
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    def _scan(self) -> tuple[list[tuple[float, int, Path]], int]:
        """``([(mtime, bytes, path) of entries], bytes reserved by live .part files)``; dead ones' .part removed."""
        entries, reserved = [], 0
        for p in self.dir.iterdir():
            if p.name.startswith("."):
                continue
            if p.name.endswith(".part"):
                if _busy(p):
                    reserved += int(p.name.rsplit(".", 2)[-2])
                continue
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                entries.append((st.st_mtime, st.st_size, p))
        return entries, reserved

    def _make_room(self, need: int) -> bool:
        """Evict least recently used entries nobody reads until ``need`` more bytes fit (caller holds .lock)."""
        entries, reserved = self._scan()
        used = sum(n for _, n, _ in entries) + reserved
        limit = self.limit
        if not limit:
            disk = shutil.disk_usage(self.dir)
            limit = used + disk.free - int(FREE_SHARE * disk.total)
        for _, n, path in sorted(entries):
            if used + need <= limit:
                break
            if _remove_unheld(path):  # nobody reads it (a reader holds a shared lock)
                used -= n
                stats.add(cache_evictions=1)
        return used + need <= limit


_versions: dict[str, tuple[str, int]] = {}  # url -> (ETag, size) this process (or its parent, before a fork) saw


def _version(url: str, read_timeout: float) -> tuple[str, int]:
    """``(ETag, size)`` of ``url``: one HEAD the first time this process opens it, then the same version for
    the process's life (a persistent loader worker's warm epochs make no request at all; an object replaced
    meanwhile is pinned like a read's ETag, and fetching it again fails as :class:`~.s3.Changed`)."""
    if url not in _versions:
        _versions[url] = s3.head(url, read_timeout)
    return _versions[url]


def _open_entry(path: Path) -> BinaryIO | None:
    """``path`` opened with a shared lock held, or None if it is not there (or was evicted meanwhile)."""
    try:
        f = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 -- the caller reads and closes it
    except FileNotFoundError:
        return None
    fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # waits only for an evictor, which holds its lock for an unlink
    try:
        same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # evicted between our open and our lock: that copy is gone
        f.close()
        return None
    return f


def _busy(part: Path) -> bool:
    """Whether a live process is writing ``part``; a dead process's leftover is removed."""
    return not _remove_unheld(part)


def _create_locked(part: Path) -> int:
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _wait(part: Path) -> None:
    """Block until the download writing ``part`` has ended (renamed into place, or failed and removed)."""
    try:
        fd = os.open(part, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _remove_unheld(path: Path) -> bool:
    """Unlink ``path`` unless a live process holds a lock on it; True if it is gone (or was never there).
    A lock dies with its process, so a killed writer's or reader's file counts as unheld."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    finally:
        os.close(fd)
