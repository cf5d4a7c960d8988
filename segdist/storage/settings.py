"""How this process talks to object storage: endpoint, retries, cache; set once from the ``data.*`` keys.

The settings are process-global because the code that opens a shard (``open_shard(url)``, deep in
a loader worker) has only the URL. :func:`configure` is called in the training (or evaluating)
process before its loader workers fork, so the workers inherit them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import stats

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



def current() -> Settings:
    return _current


def configure(**changes) -> Settings:
    """Change this process's settings (``cache_limit`` in bytes); returns the new ones. Also allocates the
    traffic counters (:mod:`.stats`) here, before the caller's loader workers fork, so theirs are shared."""
    global _current
    _current = replace(_current, **changes)
    stats.allocate()
    return _current


def configure_from(data) -> Settings:
    """:func:`configure` from a ``DataConfig`` (duck-typed: storage sits below :mod:`segdist.config`, which
    parses ``cache_limit`` text such as ``50GB`` into ``cache_limit_bytes``)."""
    return configure(endpoint_url=data.endpoint_url, retries=data.retries, retry_backoff=data.retry_backoff,
                     cache_dir=data.cache_dir, cache_limit=data.cache_limit_bytes)
