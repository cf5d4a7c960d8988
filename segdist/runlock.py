"""One owner per run folder: ``runs/<name>/run.lock``, taken before the run writes anything.

The lock is a file holding its owner (pid, host, start time, command) and an exclusive POSIX
record lock (``lockf``) on it for as long as the owner lives. The kernel drops that lock when the
owner dies, however it dies, and forked loader workers do not inherit it (``flock`` would be kept
by them), so a lock file left by a ``kill -9``'d run is recognised as stale (its lock is free; on
the same host its pid is gone too) and taken over, saying so. POSIX locks also hold across NFS
clients. A second start
while the owner lives is refused with one line naming it. Only the job's main process (global
rank 0) holds it; the other ranks learn the outcome through one :func:`~segdist.distributed.agree`.
On a filesystem without such locks the pid (and, on Linux, the process start time, so a reused pid
is not mistaken for the owner) decides alone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .distributed import agree
from .errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: the pid check alone decides
    fcntl = None

LOCK_FILE = "run.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a run folder: written into ``run.lock`` as JSON."""

    pid: int
    host: str
    started: str  # local time, for people
    proc_start: str = ""  # /proc/<pid>/stat start time (Linux): tells a reused pid from the owner
    command: str = ""

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}" + (
            f" ({self.command})" if self.command else "")

    @classmethod
    def me(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S"), proc_start(os.getpid()),
                   " ".join(["segdist", *sys.argv[1:]])[:300])

    def gone(self) -> bool | None:
        """True when this holder's process no longer runs; None when that cannot be told (another host)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return bool(self.proc_start) and proc_start(self.pid) != self.proc_start  # the pid now names another


def proc_start(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or "" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in parentheses may hold spaces


def parse_holder(text: bytes) -> Holder | None:
    """The holder a lock file holds, or None when there is none (empty, torn or foreign)."""
    try:
        data = json.loads(text)
        return Holder(int(data["pid"]), str(data["host"]), str(data.get("started", "?")),
                      str(data.get("proc_start", "")), str(data.get("command", "")))
    except (ValueError, TypeError, KeyError):
        return None


def read_holder(path: Path) -> Holder | None:
    """The holder written in lock file ``path`` (None: none). Not for the holder itself: closing any file
    descriptor of the file drops a process's POSIX lock, so the holder reads through its own descriptor."""
    try:
        return parse_holder(path.read_bytes())
    except OSError:
        return None


class RunLock:
    """The lock of ``run_dir``; :meth:`acquire` takes it (or raises UserError), :meth:`release` gives it back."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.made_dir = False

    def acquire(self) -> str:
        """Take the lock; returns a note when a stale lock was taken over ("" otherwise)."""
        self.made_dir = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                if self._lock(fd):
                    break
        except OSError as e:
            self._undo_dir()
            raise UserError(f"cannot create the run folder lock {self.path} ({e.strerror}); set train.out_dir to a "
                            f"folder you can write to") from None
        self.fd = fd
        old = parse_holder(os.pread(fd, 1 << 16, 0))
        if old is not None and old.pid != os.getpid() and old.gone() is False:  # lock free, owner alive: no locks here
            os.close(fd)  # the file stays: it is the owner's
            self.fd = None
            raise self._held(old)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(Holder.me())) + "\n").encode(), 0)
        os.fsync(fd)
        if old is None or old.pid == os.getpid():
            return ""
        why = "that process is gone" if old.gone() else "its lock was released without removing the file"
        return f"took over the lock {self.path} left by {old} ({why}: killed or crashed)"

    def _lock(self, fd: int) -> bool:
        """Lock ``fd``; False (fd closed) when the file was removed meanwhile: the caller opens it again."""
        try:
            if fcntl is not None:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise self._held(self._holder_when_written()) from None
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            # no record locks here (some network filesystems): the pid check in acquire() decides alone
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino  # a releasing owner may have unlinked it
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
        return same

    def _holder_when_written(self, wait_s: float = 2.0) -> Holder | None:
        """The holder of a lock just found taken: it writes its name right after taking it, so wait that long."""
        deadline = time.monotonic() + wait_s
        while (holder := read_holder(self.path)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return holder

    def _held(self, holder: Holder | None) -> UserError:
        who = str(holder) if holder else "another process (its lock file is being written)"
        return UserError(f"run folder {self.run_dir} is in use by {who}; wait for that run to end, or choose "
                         f"another train.name")

    def release(self, failed: bool = False) -> None:
        """Remove the lock file and drop the lock; after a failed start, also the run folder it made (if empty)."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # before the lock goes: a waiter that opened it sees another inode
        os.close(self.fd)
        self.fd = None
        if failed:
            self._undo_dir()

    def _undo_dir(self) -> None:
        if self.made_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only when empty: a start that failed before writing leaves no folder


@contextlib.contextmanager
def hold_run_folder(accelerator, run_dir: Path):
    """The job holds ``run_dir`` for the ``with`` block: its main process takes :class:`RunLock` (ranks agree
    on the outcome, so none goes on alone); yields the take-over note ("" for none), released on the way out."""
    lock, note, error = RunLock(run_dir), "", None
    if accelerator.is_main_process:
        try:
            note = lock.acquire()
        except UserError as e:
            error = e
    (refused,) = agree(accelerator, error is not None)
    if error is not None:
        raise error
    if refused:
        raise UserError(f"the main process of this job could not take run folder {run_dir} (its message says why)")
    try:
        yield note
    except BaseException:
        lock.release(failed=True)
        raise
    lock.release()
