"""Shards in object storage: ``s3://`` URLs read as plain binary streams, listed and uploaded, with an
optional node-local cache. See ``docs/storage.md``.

The bottom of segdist's layers: it imports :mod:`segdist.errors` and the standard library only
(boto3 is imported when an ``s3://`` URL is first used), so reading local shards never needs boto3.

* :func:`open_remote` -- one object as a binary stream (the tar reader consumes it like a local
  file), resumed across faults; through the cache when ``data.cache_dir`` is set.
* :func:`read_text`, :func:`read_manifest_text`, :func:`glob`, :func:`list_objects` -- what
  reading a shard set needs besides the shards.
* :func:`upload` -- files to a prefix, one named file last (readers never see half a set).
* :func:`configure_from` -- this process's settings from the ``data.*`` keys (before workers fork).
* :mod:`.stats` -- requests, retries and the time they cost, for the run's log.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import UserError
from . import objects, s3, stats
from .cache import ShardCache
from .s3 import Changed, NoBucket, NotFound, RemoteError, check_bucket, glob, list_objects
from .settings import Settings, configure, configure_from, current

__all__ = ["Changed", "NoBucket", "NotFound", "RemoteError", "Settings", "check_bucket", "configure",
           "configure_from", "current", "glob", "is_remote", "list_objects", "open_remote",
           "read_manifest_text", "read_text", "stats", "upload"]


def is_remote(url) -> bool:
    """Whether ``url`` names object storage (``s3://``) rather than a path, http(s) or ``pipe:``."""
    return str(url).startswith(s3.SCHEME)


def open_remote(url: str, read_timeout: float = 60.0) -> BinaryIO:
    """Object ``url`` as a binary stream: from the node's cache when ``data.cache_dir`` is set, else streamed.

    Transient faults are retried and the read resumes from the byte reached (``data.retries``,
    ``data.retry_backoff``); ``read_timeout`` bounds every wait for data. Errors are one-line
    :class:`RemoteError` s (a :class:`~segdist.errors.UserError`) naming the URL and, for a read,
    the byte offset.
    """
    s = current()
    if s.cache_dir:
        return ShardCache(s.cache_dir, s.cache_limit).open(url, read_timeout)
    return objects.open_object(url, read_timeout)


def read_text(url: str, read_timeout: float = 60.0) -> str:
    """A small object's text (UTF-8), never cached (a manifest may be replaced)."""
    with objects.open_object(url, read_timeout) as f:
        return f.read().decode("utf-8")


def read_manifest_text(folder: str, name: str) -> str:
    """The text of ``folder/name``; when the prefix has none, a :class:`NotFound` saying what is there instead."""
    folder = folder.rstrip("/")
    try:
        return read_text(f"{folder}/{name}")
    except NoBucket:
        raise
    except NotFound:
        pass
    tars = [u for u, _ in itertools.islice(list_objects(folder + "/"), 100_000) if u.endswith(".tar")]
    if tars:
        hint = (f"it holds {len(tars)} .tar objects: pass a pattern such as {folder}/*.tar, or upload the "
                f"shard folder they came from with `segdist shards upload DIR {folder}/`")
    else:
        hint = f"nothing is stored under it; build shards there with `segdist shards build SRC --out {folder}/`"
    raise NotFound(f"{folder}/ has no {name}: {hint}")


def upload(folder: str | Path, names: list[str], url: str, last: str,
           say: Callable[[str], None] = lambda line: None) -> int:
    """Upload ``folder/<name>`` for each of ``names``, then ``folder/<last>``, under prefix ``url``; returns bytes.

    ``last`` (a shard set's ``manifest.json``) is deleted from the prefix first and uploaded after
    everything else, so a reader finds either no set or a complete one, never a manifest naming
    shards that are not there yet.
    """
    folder, base = Path(folder), url.rstrip("/")
    missing = [n for n in [*names, last] if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder / missing[0]} not found ({len(missing)} missing); upload a complete folder")
    s3.check_bucket(f"{base}/")
    s3.delete(f"{base}/{last}")
    total = 0
    for i, name in enumerate([*names, last]):
        s3.put_file(folder / name, f"{base}/{name}")
        total += (folder / name).stat().st_size
        say(f"uploaded {i + 1}/{len(names) + 1}: {base}/{name}")
    return total
