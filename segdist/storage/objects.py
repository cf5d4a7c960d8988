"""Reading one object: a binary stream that survives the network (see :class:`ObjectReader`).

A thread reads ahead while the caller parses the tar; a cut, reset or stalled body is resumed with a
ranged GET from the byte reached, pinned to the object's first ETag, so a replaced object is an
error (:class:`~segdist.storage.s3.Changed`), never a mix of two versions.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading

from . import stats
from .retry import Exhausted, Retrier
from .s3 import (EXPIRED_CODES, Changed, RemoteError, ShortBody, client, error_code, exhausted, failures, fatal,
                 first_line, forget_client, parse, transient)

CHUNK = 256 << 10
"""Bytes asked of the HTTP layer per read."""
READAHEAD = 16
"""Chunks a reader's thread may hold ahead of the caller (4 MiB)."""


class _Stopped(Exception):
    """The reader was closed: its read-ahead thread ends without a word."""


class ObjectReader(io.RawIOBase):
    """One object as a forward-only binary stream that resumes where a cut, reset or stalled body stopped.

    Every retry is a GET from the byte reached (``Range: bytes=N-``) with ``If-Match`` set to the
    ETag of the first response (or ``etag`` when the caller knows it from a HEAD): a replaced object
    answers 412 and becomes a :class:`Changed` error. The first GET happens here, so a missing key
    fails on open, as a missing file would.

    A thread reads ahead (up to ``READAHEAD`` chunks of ``CHUNK`` bytes) while the caller parses
    what arrived, so waiting for the store overlaps the tar reader's work; its failures and retries
    reach the caller in order, as the exception of a read. Wrap it in ``io.BufferedReader``
    (:func:`open_object`).
    """

    def __init__(self, url: str, read_timeout: float = 60.0, etag: str | None = None, size: int | None = None):
        super().__init__()
        self.url, self.loc, self.read_timeout = url, parse(url), read_timeout
        self.etag, self.size, self.pos = etag, size, 0  # pos: bytes received (by the read-ahead thread)
        self._body = None
        self._stop = threading.Event()
        self._retry = Retrier(sleep=self._stop.wait)  # close() cuts a backoff short
        self._unreported = 0  # bytes not yet added to stats (one shared-memory update per MB, not per read)
        self._connect()
        self._chunks: queue.Queue = queue.Queue(READAHEAD)
        self._pending = memoryview(b"")
        self._error: BaseException | None = None
        self._ended = False
        self._thread = threading.Thread(target=self._pump, name="segdist-s3-readahead", daemon=True)
        self._thread.start()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._error is not None:
            raise self._error
        if not self._pending:
            if self._ended:
                return 0
            item = self._chunks.get()  # bounded: the thread's every wait is (read timeout, retries)
            if isinstance(item, BaseException):
                self._error = item
                raise item
            if not item:
                self._ended = True
                return 0
            self._pending = memoryview(item)
        n = min(len(b), len(self._pending))
        memoryview(b).cast("B")[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            # The thread sees this within a queue wait or a backoff and ends; one blocked on the socket ends
            # with its read timeout. Not joined: close() must not wait for the network.
            self._stop.set()
        super().close()

    # -- the read-ahead thread
    def _pump(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._next_chunk()
                if not self._put(chunk) or not chunk:
                    return
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 -- handed to the reading thread, raised there
            self._put(e)
        finally:
            self._drop_body()
            self._report()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._chunks.put(item, timeout=0.25)
                return True
            except queue.Full:
                continue
        return False

    def _next_chunk(self) -> bytes:
        """The next piece of the body (b"" at its end), resuming and retrying as needed."""
        if self.pos >= self.size:
            self._finish()
            return b""
        while True:
            if self._body is None:
                self._connect()
            try:
                # At most CHUNK per read: urllib3 fills a read before returning, so a body that stalls or
                # is cut loses (and fetches again) at most this much.
                data = self._body.read(min(CHUNK, self.size - self.pos))
                if not data:
                    raise ShortBody(f"the body ended at byte {self.pos} of {self.size}")
            except failures() as e:
                self._failed(e)
                continue
            self.pos += len(data)
            self._unreported += len(data)
            if self._unreported >= 1 << 20:
                self._report()
            return data

    def _connect(self) -> None:
        """GET from ``pos`` until a response arrives (retried), leaving its body in ``_body``."""
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                self._body = self._get(client(self.read_timeout))
                self._retry.succeeded()
                return
            except failures() as e:
                self._failed(e)

    def _get(self, c):
        kw = {"Bucket": self.loc.bucket, "Key": self.loc.key}
        if self.pos:
            kw["Range"] = f"bytes={self.pos}-"
        if self.etag:
            kw["IfMatch"] = self.etag
        r = c.get_object(**kw)
        stats.add(gets=1)
        body, etag, n = r["Body"], r.get("ETag"), int(r["ContentLength"])
        problem = ""
        if self.pos and not r.get("ContentRange"):
            problem = "the endpoint ignored the Range header of a resumed read"
        elif self.etag and etag and etag != self.etag:
            problem = f"its ETag went from {self.etag} to {etag}"
        elif self.size is not None and self.pos + n != self.size:
            problem = f"its size went from {self.size} to {self.pos + n} bytes"
        if problem:
            body.close()
            raise Changed(f"{self.url} changed while it was read ({problem}) at byte {self.pos}; shards must not be "
                          f"replaced during a run: upload a new set under a new prefix")
        self.etag = self.etag or etag
        self.size = self.pos + n if self.size is None else self.size
        return body

    def _failed(self, e: BaseException) -> None:
        """Wait before the next try after a transient failure; a RemoteError when it is not one, or retries ran out."""
        self._drop_body()
        if self._stop.is_set():  # closed: the failure may be our own close
            raise _Stopped
        c = client(self.read_timeout)
        cause = transient(e, self.read_timeout)
        if cause is None:
            raise fatal(e, self.url, c, self.pos) from None
        if error_code(e)[0] in EXPIRED_CODES:
            forget_client(self.read_timeout)
        try:
            self._retry.failed(self.pos)
        except Exhausted as x:
            raise exhausted("reading", self.url, x, cause, c, self.pos, self.size) from None
        if self._stop.is_set():
            raise _Stopped

    def _finish(self) -> None:
        """At the end: one more read lets botocore check the length and, for a whole-object GET, the checksum."""
        if self._body is None:
            return
        try:
            self._body.read(1)
        except failures() as e:
            raise RemoteError(f"{self.url}: the data read does not match what the store holds ({first_line(e)}); "
                              f"read it again") from None
        finally:
            self._drop_body()

    def _drop_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def _report(self) -> None:
        if self._unreported:
            stats.add(mb=self._unreported / 2**20)
            self._unreported = 0


def open_object(url: str, read_timeout: float = 60.0, etag: str | None = None,
                size: int | None = None) -> io.BufferedReader:
    """A buffered binary stream of object ``url`` (see :class:`ObjectReader`)."""
    return io.BufferedReader(ObjectReader(url, read_timeout, etag, size), buffer_size=1 << 20)


