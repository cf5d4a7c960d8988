"""Atomic writes (a file or folder appears complete under its final name, or not at all) and
the checksum that proves a written file is still what was written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


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
def atomic_dir(final: str | os.PathLike, overwrite: bool = True):
    """Yield a temp folder beside ``final``; on success rename it to ``final``.

    On any exception the temp folder is removed and ``final`` is untouched. A killed process
    leaves only a hidden ``.<name>.tmp-*`` folder, never a partial ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            # Move the old one aside first so the swap is two renames, never a half-deleted tree.
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)  # the only way to read the umask is to set it
    os.umask(umask)
    return umask


def shared_mode_dir(path: str | os.PathLike) -> None:
    """Give a folder made by ``mkdtemp`` (mode 0700) the mode ``mkdir`` would: ``0o777 & ~umask``.

    For output meant to be shared (datasets, shard folders) that is built in an :func:`atomic_dir`.
    """
    os.chmod(path, 0o777 & ~_umask())
