"""The exceptions that end a command without a traceback.

A :class:`UserError` carries a message that names the thing that is wrong and how to fix it;
the CLI prints it on one line and exits 2 (:class:`DiskFull` for a full disk, and :func:`os_error_line`
for a full disk or an unwritable folder that no caller named). :class:`Paused` is not an error: the run saved a
state on a stop signal and exits with :data:`REQUEUE_EXIT` so a scheduler can requeue it.
"""

import contextlib
import errno as _errno
import re
import resource
import shutil
from pathlib import Path

REQUEUE_EXIT = 75
"""Exit status of a run paused by SIGUSR1/SIGTERM after saving its state (EX_TEMPFAIL: try again)."""


class UserError(Exception):
    """Bad input from the user (path, file, config key, name...). ``str(e)`` is the message."""


class Paused(Exception):
    """The run saved a resumable state on a stop signal; ``str(e)`` says where and how to go on."""


# ----------------------------------------------------------------------------- full disks, read-only folders
DISK_FULL = {_errno.ENOSPC: "the disk is full", _errno.EDQUOT: "the disk quota is used up",
             _errno.EFBIG: "a file grew past the file size limit (ulimit -f) or the largest file the filesystem "
                           "allows"}
"""errno -> what it means for the user, for the errors that free space (or a higher limit) fixes."""
_DISK_FULL_TEXT = re.compile(r"os error (28|122|27)\b|(No space left on device|Disk quota exceeded|File too large)")
_DISK_FULL_WORDS = {"No space left on device": _errno.ENOSPC, "Disk quota exceeded": _errno.EDQUOT,
                    "File too large": _errno.EFBIG}
# Libraries that write in C or Rust report these in their own words: safetensors "File too large (os error 27)".
NOT_WRITABLE = {_errno.EROFS: "read-only filesystem", _errno.EACCES: "permission denied",
                _errno.EPERM: "operation not permitted"}


class DiskFull(UserError):
    """A write failed for lack of space or quota (ENOSPC, EDQUOT, EFBIG); partial files were removed."""


def disk_full_reason(e: BaseException | None) -> str | None:
    """What full-disk condition ``e`` (or an exception it was raised from) reports, in words; None if none."""
    while e is not None:
        code = getattr(e, "errno", None)
        if code in DISK_FULL:
            return DISK_FULL[code]
        m = _DISK_FULL_TEXT.search(str(e))
        if m:
            return DISK_FULL[int(m.group(1)) if m.group(1) else _DISK_FULL_WORDS[m.group(2)]]
        e = e.__cause__ or e.__context__
    return None


def limit_reason(folder) -> str | None:
    """For a write error that names no cause (torch's zip writer: "unexpected pos"): a full disk under
    ``folder`` (under 16 MiB free), or a file in it cut at the file size limit (``ulimit -f``); else None."""
    folder = Path(folder)
    try:
        if shutil.disk_usage(folder if folder.exists() else folder.parent).free < 16 << 20:
            return DISK_FULL[_errno.ENOSPC]
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and folder.is_dir() and any(
                f.is_file() and f.stat().st_size >= limit for f in folder.rglob("*")):
            return DISK_FULL[_errno.EFBIG]
    except OSError:
        return None
    return None


def disk_full(path, reason: str, then: str = "") -> DiskFull:
    """The one-line error for a write to ``path`` that failed with ``reason`` (see :func:`disk_full_reason`)."""
    return DiskFull(f"cannot write {path}: {reason}; what was being written was removed and earlier files are "
                    f"intact: free space (or raise the limit) and {then or 'run the same command again'}")


@contextlib.contextmanager
def writing(path, then: str = ""):
    """Turn a full-disk failure inside the block into :class:`DiskFull` naming ``path`` (the caller removes
    its partial files); other errors pass unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        reason = disk_full_reason(e)
        if reason is None:
            raise
        raise disk_full(path, reason, then) from None


def os_error_line(e: OSError) -> str | None:
    """The one-line message for an OSError no caller caught: a full disk or a folder that cannot be written
    to, naming the path; None for any other error (a bug: let its traceback show)."""
    where = f" {e.filename}" if e.filename else ""
    reason = disk_full_reason(e)
    if reason is not None:
        return f"cannot write{where}: {reason}; free space (or raise the limit) and run the same command again"
    if e.errno in NOT_WRITABLE:
        return (f"cannot write{where} ({NOT_WRITABLE[e.errno]}); run from, or point the output to, a folder you "
                f"can write to")
    return None
