"""When to try a request again, and for how long: exponential backoff with jitter, bounded.

One :class:`Retrier` follows one request, or one object read: :meth:`failed` is called with the
byte offset reached, so a read that advanced since its last failure starts its count over (a
stream cut every few MB still finishes) while one that stays put runs out after ``retries``
failures. The worst case before an error is therefore bounded:
``sum(min(RETRY_CAP, backoff * 2**k) for k in range(retries))`` seconds of waiting, plus at
most ``retries + 1`` attempts each limited by the connect and read timeouts.
"""

from __future__ import annotations

import random
import time

from . import stats
from .settings import RETRY_CAP, current

_jitter = random.SystemRandom()  # not the module's Random: forked workers would all draw the same waits


class Exhausted(Exception):
    """Retries ran out: ``retries`` of them at the last offset, ``seconds`` since the first failure of
    this run of failures (the caller words the error)."""

    def __init__(self, retries: int, seconds: float):
        super().__init__(retries, seconds)
        self.retries, self.seconds = retries, seconds


class Retrier:
    """Backoff state of one request or read; settings from :func:`segdist.storage.settings.current`."""

    def __init__(self, retries: int | None = None, backoff: float | None = None, sleep=time.sleep):
        s = current()
        self.sleep = sleep  # an Event's wait() makes the waits interruptible
        self.retries = s.retries if retries is None else retries
        self.backoff = s.retry_backoff if backoff is None else backoff
        self.failures = 0  # in a row, at one offset
        self.offset = -1  # where the last failure happened
        self.first_failure: float | None = None  # start of the current run of failures

    def failed(self, offset: int = 0) -> None:
        """A transient failure at byte ``offset``: wait before the next try, or raise :class:`Exhausted`."""
        now = time.monotonic()
        if offset > self.offset:  # progress since the last failure: a fresh budget
            self.failures = 0
        self.offset = offset
        if self.first_failure is None:
            self.first_failure = now
        if self.failures >= self.retries:
            raise Exhausted(self.failures, now - self.first_failure)
        delay = min(RETRY_CAP, self.backoff * 2 ** self.failures) * _jitter.uniform(0.5, 1.0)
        self.failures += 1
        stats.add(retries=1)
        self.sleep(delay)

    def succeeded(self) -> None:
        """A response arrived: the time since the first failure of this run was lost to retrying."""
        if self.first_failure is not None:
            stats.add(retry_s=time.monotonic() - self.first_failure)
            self.first_failure = None
