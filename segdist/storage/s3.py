"""S3 and S3-compatible stores (MinIO, R2, Ceph) through boto3: URLs, one client per process, reads
that survive the network, listing, uploads. Why boto3 and not s3fs or obstore: ``docs/storage.md``.

* **Client**: one per process, made on first use, so a forked loader worker makes its own (a
  connection pool must never be shared across a fork). It comes from a fresh boto3 Session:
  credentials from the standard chain (environment, ``AWS_PROFILE``, config files, SSO, instance
  roles; refreshed by botocore when they expire), the endpoint from ``data.endpoint_url`` or
  botocore's own ``AWS_ENDPOINT_URL[_S3]``. Nothing here prints a credential.
* **Retries are all segdist's**: botocore's are off (``total_max_attempts=1``), because botocore
  retries a failed request but not a body cut short or stalled after its headers, and two layers
  of retries multiply their waits. Throttling (503 SlowDown), 5xx, connection resets and refusals,
  bodies cut short and read timeouts are retried with :class:`~.retry.Retrier`; the rest (no such
  key, access denied, bad credentials) is a one-line :class:`RemoteError` at once.
* **Reads resume**: :class:`.objects.ObjectReader` re-requests an object from the byte reached
  (``Range: bytes=N-``) pinned to the ETag of its first response (``If-Match``), so the bytes it
  yields are one version of the object or an error, never a mix.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from . import stats
from .retry import Exhausted, Retrier
from .settings import current

SCHEME = "s3://"


class RemoteError(UserError):
    """An object-store failure worded for the user, on one line.

    ``str()`` stays the message even after webdataset's tar reader appends its stream and URL to
    ``args`` (it does so to every exception that passes through it).
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(RemoteError):
    """No such bucket or key."""


class NoBucket(NotFound):
    """The bucket does not exist (at this endpoint)."""


class Changed(RemoteError):
    """The object was replaced (another ETag or size) while it was being read."""


class ShortBody(Exception):
    """A body that ended before its Content-Length without the HTTP layer noticing."""


# ----------------------------------------------------------------------------- URLs
@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"


def parse(url: str) -> S3Url:
    """``s3://bucket/some/key`` -> ``S3Url("bucket", "some/key")``; UserError without a bucket."""
    bucket, _, key = str(url)[len(SCHEME):].partition("/")
    if not str(url).startswith(SCHEME) or not bucket:
        raise UserError(f"'{url}' is not an S3 URL; write s3://BUCKET/PREFIX/")
    return S3Url(bucket, key)


# ----------------------------------------------------------------------------- client
_clients: dict[tuple, tuple] = {}  # (pid, endpoint, read timeout) -> (session, client)


def client(read_timeout: float = 60.0):
    """This process's boto3 S3 client for ``read_timeout`` (never one a fork copied from the parent)."""
    s, pid = current(), os.getpid()
    key = (pid, s.endpoint_url, float(read_timeout))
    if key not in _clients:
        for old in [k for k in _clients if k[0] != pid]:
            del _clients[old]  # the parent's, inherited through fork: dropped, not closed (its sockets are shared)
        _clients[key] = _make_client(s.endpoint_url, read_timeout)
    return _clients[key][1]


def _make_client(endpoint_url: str, read_timeout: float) -> tuple:
    try:  # lazy, as every boto3/botocore import here: boto3 is the `s3` extra, needed for s3:// URLs only
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError
    except ImportError:
        raise UserError("s3:// shards need boto3: pip install 'segdist[s3]' (or pip install boto3)") from None
    config = Config(retries={"total_max_attempts": 1}, connect_timeout=min(read_timeout, 10.0),
                    read_timeout=read_timeout, tcp_keepalive=True)
    try:
        session = boto3.session.Session()
        return session, session.client("s3", endpoint_url=endpoint_url or None, config=config)
    except (BotoCoreError, ValueError) as e:  # ProfileNotFound, a malformed endpoint URL...
        raise RemoteError(f"cannot set up the S3 client: {first_line(e)}; check AWS_PROFILE and "
                          f"data.endpoint_url / AWS_ENDPOINT_URL") from None


def forget_client(read_timeout: float) -> None:
    """Drop this process's client so the next request builds one with freshly resolved credentials."""
    s = current()
    _clients.pop((os.getpid(), s.endpoint_url, float(read_timeout)), None)


def endpoint(c) -> str:
    """The client's endpoint URL, without any user:password in it."""
    return re.sub(r"//[^/@]*@", "//", c.meta.endpoint_url)


def _credential_source() -> str:
    """Where the credentials in use came from (botocore's name for the method, never the keys)."""
    for session, _ in _clients.values():
        with contextlib.suppress(Exception):
            creds = session.get_credentials()
            return creds.method if creds is not None else "nowhere"
    return "unknown"


# ----------------------------------------------------------------------------- errors
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
                "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequestsException",
                "BandwidthLimitExceeded", "PriorRequestNotComplete"}
EXPIRED_CODES = {"ExpiredToken", "ExpiredTokenException", "RequestExpired", "TokenRefreshRequired"}


@functools.cache
def failures() -> tuple[type, ...]:
    """Exceptions a request or body read may raise that are about the store or the network (not bugs)."""
    import urllib3.exceptions  # lazy: see _make_client
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError, OSError, urllib3.exceptions.HTTPError, ShortBody


def error_code(e) -> tuple[str, int]:
    """``(error code, HTTP status)`` of a botocore ClientError; ``("", 0)`` for anything else."""
    err = getattr(e, "response", None)
    if not isinstance(err, dict):
        return "", 0
    return str(err.get("Error", {}).get("Code", "")), int(err.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def transient(e: BaseException, read_timeout: float) -> str | None:
    """A short cause when ``e`` is worth another try (throttled, 5xx, network, cut or stalled body), else None."""
    import urllib3.exceptions  # lazy: see _make_client
    from botocore import exceptions as bx

    if isinstance(e, bx.ClientError):
        code, status = error_code(e)
        if status in _RETRY_STATUS or code in _RETRY_CODES or code in EXPIRED_CODES:
            return f"{status} {code}"
        return None
    if isinstance(e, (bx.ReadTimeoutError, TimeoutError, urllib3.exceptions.ReadTimeoutError)):
        return f"no data for {read_timeout:g} s (data.read_timeout)"
    if isinstance(e, bx.EndpointConnectionError):
        return "cannot connect to the endpoint"
    if isinstance(e, bx.ConnectionClosedError):
        return "connection closed before a response"
    if isinstance(e, (bx.IncompleteReadError, bx.ResponseStreamingError, ShortBody,
                      urllib3.exceptions.ProtocolError)):
        return f"body cut short ({first_line(e)})"
    if isinstance(e, (bx.ConnectionError, bx.HTTPClientError, OSError, urllib3.exceptions.HTTPError)):
        return f"{type(e).__name__}: {first_line(e)}"
    return None  # other BotoCoreErrors: no credentials, a bad parameter, a checksum mismatch


def fatal(e: BaseException, url: str, c, offset: int | None = None) -> RemoteError:
    """``e`` (not transient) as a one-line error naming ``url`` and what to do."""
    from botocore import exceptions as bx  # lazy: see _make_client

    at = endpoint(c)
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return RemoteError(f"no usable credentials for {url}: set AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
                           f"AWS_SECRET_ACCESS_KEY (an S3-compatible store's access keys), or run `aws configure`")
    if isinstance(e, bx.ClientError):
        code, status = error_code(e)
        if code == "NoSuchBucket":
            return NoBucket(f"bucket '{parse(url).bucket}' does not exist at {at}; check the bucket in {url} "
                            f"(and data.endpoint_url / AWS_ENDPOINT_URL for an S3-compatible store)")
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(f"{url} not found at {at}; check the path (and the bucket)")
        if code == "PreconditionFailed" or status == 412:
            return Changed(f"{url} changed while it was read (its ETag is no longer the one pinned at byte 0) at "
                           f"byte {offset or 0}; shards must not be replaced during a run: upload a new set under "
                           f"a new prefix")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "AuthorizationHeaderMalformed"):
            return RemoteError(f"{at} refused the credentials for {url} ({code}; they came from "
                               f"{_credential_source()}); check AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        if code in ("AccessDenied", "403", "AllAccessDisabled", "Forbidden"):
            return RemoteError(f"access to {url} denied at {at} ({code}) for the credentials from "
                               f"{_credential_source()}; check the bucket policy or use another AWS_PROFILE")
        message = e.response.get("Error", {}).get("Message", "")
        return RemoteError(f"{url}: {status} {code} from {at}{': ' + message if message else ''}")
    return RemoteError(f"{url}: {type(e).__name__}: {first_line(e)} (endpoint {at})")


def exhausted(what: str, url: str, x: Exhausted, cause: str, c, offset: int = 0, size: int | None = None,
              ) -> RemoteError:
    """The one line for retries that ran out: URL, byte offset, cause, how long it tried."""
    of = f" of {size}" if size is not None else ""
    return RemoteError(f"{what} {url} failed at byte {offset}{of} after {x.retries} retries in {x.seconds:.1f} s "
                       f"(last: {cause}; endpoint {endpoint(c)}); check the network and the store, or raise "
                       f"data.retries")


def request(what: str, url: str, call: Callable, read_timeout: float = 60.0):
    """``call(client)`` with segdist's retries; a failure that is not transient is a :class:`RemoteError` at once."""
    retry = Retrier()
    while True:
        c = client(read_timeout)
        try:
            out = call(c)
            retry.succeeded()
            return out
        except failures() as e:
            cause = transient(e, read_timeout)
            if cause is None:
                raise fatal(e, url, c) from None
            if error_code(e)[0] in EXPIRED_CODES:
                forget_client(read_timeout)
            try:
                retry.failed()
            except Exhausted as x:
                raise exhausted(what, url, x, cause, c) from None


def head(url: str, read_timeout: float = 60.0) -> tuple[str, int]:
    """``(ETag, size in bytes)`` of object ``url``."""
    loc = parse(url)
    r = request("HEAD", url, lambda c: c.head_object(Bucket=loc.bucket, Key=loc.key), read_timeout)
    stats.add(heads=1)
    return r["ETag"], int(r["ContentLength"])


# ----------------------------------------------------------------------------- listing
def list_objects(prefix_url: str) -> Iterator[tuple[str, int]]:
    """``(URL, size)`` of every object under ``prefix_url``, page by page (``list_page_size`` keys each)."""
    loc = parse(prefix_url)
    token = None
    while True:
        kw = {"Bucket": loc.bucket, "Prefix": loc.key, "MaxKeys": current().list_page_size}
        if token:
            kw["ContinuationToken"] = token
        page = request("listing", prefix_url, lambda c, kw=kw: c.list_objects_v2(**kw))
        stats.add(lists=1)
        for obj in page.get("Contents", []):
            yield f"{SCHEME}{loc.bucket}/{obj['Key']}", int(obj["Size"])
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


def glob(pattern: str) -> list[str]:
    """Object URLs matching ``pattern`` (``*``, ``?``, ``[...]`` within a path segment, ``**`` across), sorted."""
    loc = parse(pattern)
    first = min((i for i, ch in enumerate(loc.key) if ch in "*?["), default=len(loc.key))
    regex = re.compile(_glob_regex(loc.key))
    prefix = f"{SCHEME}{loc.bucket}/{loc.key[:first]}"
    return sorted(url for url, _ in list_objects(prefix) if regex.fullmatch(parse(url).key))


def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            j = i + 1 + (pattern[i + 1:i + 2] == "!")
            j += pattern[j:j + 1] == "]"  # a ']' right after '[' or '[!' is a member, as in fnmatch
            end = pattern.find("]", j)
            if end < 0:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1:end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
                i = end + 1
                continue
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


# ----------------------------------------------------------------------------- writing
def check_bucket(url: str) -> None:
    """The bucket of ``url`` exists and these credentials reach it (a build fails now, not after an hour)."""
    loc = parse(url)
    try:
        request("checking the bucket of", url, lambda c: c.head_bucket(Bucket=loc.bucket))
    except NotFound:  # HEAD answers a bare 404: say which thing is missing
        raise NoBucket(f"bucket '{loc.bucket}' does not exist at {endpoint(client())}; create it first or check "
                       f"the bucket in {url} (and the endpoint for an S3-compatible store)") from None


SINGLE_PUT_MAX = 4 << 30
"""Files up to this size are one PUT (S3 allows 5 GB), retried whole; larger ones go multipart."""


def put_file(path: Path, url: str) -> None:
    """Upload file ``path`` to ``url``: one PUT, retried whole on a transient failure (multipart past
    :data:`SINGLE_PUT_MAX`, whose parts s3transfer retries itself)."""
    loc = parse(url)

    def put(c):
        with open(path, "rb") as f:  # opened per attempt: a retry sends the file from its start
            return c.put_object(Bucket=loc.bucket, Key=loc.key, Body=f)

    if Path(path).stat().st_size <= SINGLE_PUT_MAX:
        request("uploading to", url, put)
    else:
        from boto3.exceptions import S3UploadFailedError  # lazy: see _make_client

        try:
            request("uploading to", url, lambda c: c.upload_file(str(path), loc.bucket, loc.key))
        except S3UploadFailedError as e:  # s3transfer's wrapper of whatever failed
            raise RemoteError(f"uploading to {url} failed: {first_line(e)}") from None
    stats.add(puts=1)


def put_bytes(data: bytes, url: str) -> None:
    loc = parse(url)
    request("uploading to", url, lambda c: c.put_object(Bucket=loc.bucket, Key=loc.key, Body=data))
    stats.add(puts=1)


def delete(url: str) -> None:
    """Delete object ``url`` (no error when it is not there)."""
    loc = parse(url)
    request("deleting", url, lambda c: c.delete_object(Bucket=loc.bucket, Key=loc.key))
