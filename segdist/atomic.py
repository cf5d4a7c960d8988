"""Atomic writes (a file or folder appears complete under its final name, or not at all) and
the checksum that proves a written file is still what was written.

A folder is replaced by two renames (old aside, new in place) and the old copy is deleted only
once the new one is in place. A process killed between them leaves ``.<name>.old-<pid>`` and
maybe no ``<name>``: :func:`repair_swap` (run by :func:`atomic_dir` before every swap, and by the
commands that own such folders when they start) puts the old copy back, or deletes it once the
new one is there. A full disk is :class:`~segdist.errors.DiskFull` naming the path, with the
partial files removed.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

from .errors import UserError, writing


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder + ``os.replace``."""
    path = Path(path)
    with writing(path):
        _write_bytes(path, data)


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_out_dir(out: str | os.PathLike, flag: str = "--out") -> None:
    """``flag DIR`` is a folder, or can be made as one, that this process can write into; UserError otherwise.

    Called before the work, so a bad folder fails in a second instead of after the whole run. Creates
    nothing: a run that fails later for another reason leaves no empty folder behind.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; pass a folder")
    existing = out.absolute()
    while not existing.exists():  # the nearest folder that exists is where the first mkdir happens
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {out}: {existing} is a file, so no folder can be made there; pass another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: {existing} is not writable; pass a folder you can write to")


def check_out_file(out: str | os.PathLike, flag: str) -> None:
    """``flag FILE`` can be written: not a folder, and its folder exists (or is created) and is writable."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder; pass a file path (it may be inside that folder)")
    check_out_dir(out.parent, flag=f"{flag}'s folder")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True, then: str = ""):
    """Yield a temp folder beside ``final``; on success swap it in as ``final``.

    On any exception the temp folder is removed and ``final`` is untouched (a full disk is a
    :class:`~segdist.errors.DiskFull` naming ``final``; ``then`` says what to do once space is
    free). A killed process leaves a hidden ``.<name>.tmp-<pid>-*`` or ``.<name>.old-<pid>``
    folder, never a partial ``final``, and the next swap (or :func:`repair_swap`) cleans up.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    repair_swap(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        with writing(final, then):
            yield tmp
        crash_point("swap:ready")
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            # Two renames, never a half-deleted tree; the old copy goes only once the new one is in place.
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            crash_point("swap:old-aside")
            os.replace(tmp, final)
            crash_point("swap:new-in-place")
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _owner_gone(name: str) -> bool:
    """Whether the process whose pid ends a ``.x.old-<pid>`` / ``.x.tmp-<pid>-*`` name is gone (same host)."""
    tail = name.rsplit(".old-", 1)[-1] if ".old-" in name else name.rsplit(".tmp-", 1)[-1].split("-")[0]
    if not tail.isdigit() or int(tail) == os.getpid():
        return True  # no pid (older segdist), or this process, which swaps one folder at a time
    try:
        os.kill(int(tail), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def repair_swap(final: str | os.PathLike) -> list[str]:
    """Finish or undo what a killed swap left beside ``final``; returns what was done, in words.

    ``.<name>.old-<pid>`` without ``<name>`` (killed between the two renames): renamed back.
    Beside a complete ``<name>``: deleted (the swap had finished). ``.<name>.tmp-<pid>-*`` of a
    process that is gone: deleted (never swapped in). Leftovers of a live process are left alone.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    done = []
    olds = sorted((p for p in final.parent.glob(f".{glob_escape(final.name)}.old-*") if _owner_gone(p.name)),
                  key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        os.replace(olds.pop(), final)  # the newest old copy: the state just before the interrupted swap
        done.append(f"restored {final} from the copy an interrupted swap had moved aside")
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
        done.append(f"removed {old.name}, the previous copy of {final.name} left by an interrupted swap")
    for tmp in final.parent.glob(f".{glob_escape(final.name)}.tmp-*"):
        if tmp.is_dir() and _owner_gone(tmp.name):
            shutil.rmtree(tmp, ignore_errors=True)
            done.append(f"removed {tmp.name}, an unfinished copy of {final.name} left by a killed process")
    return done


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped (a run or shard folder may be called ``a[1]``)."""
    return glob.escape(name)


def crash_point(where: str) -> None:
    """Fault injection for the swap tests: SIGKILL this process at ``where`` when ``SEGDIST_CRASH_AT`` names it
    (a real kill between two real renames; costs one environment lookup otherwise)."""
    if os.environ.get("SEGDIST_CRASH_AT") == where:
        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    umask = os.umask(0)  # the only way to read the umask is to set it
    os.umask(umask)
    return umask


def shared_mode_dir(path: str | os.PathLike) -> None:
    """Give a folder made by ``mkdtemp`` (mode 0700) the mode ``mkdir`` would: ``0o777 & ~umask``.

    For output meant to be shared (datasets, shard folders) that is built in an :func:`atomic_dir`.
    """
    os.chmod(path, 0o777 & ~_umask())
