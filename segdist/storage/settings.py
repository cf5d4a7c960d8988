"""How this process talks to object storage: endpoint, retries, cache; set once from the ``data.*`` keys.

The settings are process-global because the code that opens a shard (``open_shard(url)``, deep in
a loader worker) has only the URL. :func:`configure` is called in the training (or evaluating)
process before its loader workers fork, so the workers inherit them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import UserError

RETRY_CAP = 10.0
"""Longest wait (s) between two retries: the backoff doubles from ``retry_backoff`` up to this."""


@dataclass(frozen=True)
class Settings:
    endpoint_url: str = ""
    """S3-compatible endpoint (MinIO, R2, Ceph...); "" = botocore's own (AWS_ENDPOINT_URL[_S3], profile, AWS)."""
    retries: int = 10
    """Retries of one request, or of one read position, before it fails (a read that advances starts over)."""
    retry_backoff: float = 0.5
    """First wait (s) before a retry; doubles per retry up to :data:`RETRY_CAP`, jittered to 0.5-1x."""
    cache_dir: str = ""
    """Node-local folder for whole shards (see :mod:`.cache`); "" = stream without a cache."""
    cache_limit: int = 0
    """Bytes the cache may hold; 0 = until 10 % of its disk is left free."""
    list_page_size: int = 1000
    """Keys per listing request (S3's maximum; tests lower it to show that listing paginates)."""


_current = Settings()

_KEYS = ("endpoint_url", "retries", "retry_backoff", "cache_dir", "cache_limit")
"""The ``data.*`` config keys that carry storage settings (same names as :class:`Settings` fields)."""


def current() -> Settings:
    return _current


def configure(**changes) -> Settings:
    """Change this process's settings (``cache_limit`` may be text like ``"50GB"``); returns the new ones."""
    global _current
    if isinstance(changes.get("cache_limit"), str):
        changes["cache_limit"] = parse_size(changes["cache_limit"])
    _current = replace(_current, **changes)
    return _current


def configure_from(data) -> Settings:
    """:func:`configure` from a ``DataConfig`` (duck-typed: storage sits below :mod:`segdist.config`)."""
    return configure(**{k: getattr(data, k) for k in _KEYS if hasattr(data, k)})


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text, key: str = "data.cache_limit") -> int:
    """Bytes in ``"50GB"`` (decimal units), ``"200GiB"`` (binary), ``"1000000"`` or an int; "" or 0 = 0."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    if str(text).strip() == "":
        return 0
    if not m or unit not in _UNITS:
        raise UserError(f"config key '{key}' must be a size like 50GB, 200GiB or a number of bytes; got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])
