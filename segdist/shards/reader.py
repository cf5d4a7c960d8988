"""Reading shards: the one tar reader, the one member picker, and each shard's identity check.

Every part of segdist that reads a shard goes through here: training and validation
(:mod:`segdist.stream`), ``segdist eval``/``predict``/``export`` on shard folders, the sample
count of a shard pattern (:mod:`.manifest`) and ``segdist shards verify``.

* :func:`open_shard`: a binary stream of a local path, ``file://``, ``http(s)://`` (a socket
  timeout bounds every wait for data; transient statuses are retried) or ``pipe:`` command.
* :func:`tar_samples`: a tar stream -> sample dicts ``{"__key__", "image.jpg" | "image.png",
  "mask.png"}`` grouped as WebDataset groups them (key = the name up to the first dot of the
  file name). Each member's size is read from its tar header before its bytes: an empty
  member, one over ``max_member`` bytes (never read into memory), a name that climbs out of
  the shard (``../``, absolute) or a member repeated in a sample is an error naming the shard.
* :func:`read_samples`: one shard checked against what its manifest says it is
  (:class:`ShardId`): every sample has an image and a mask, its keys are the manifest's keys in
  order, a tar read to its end holds the manifest's sample count, bytes and sha256 -- computed
  while the bytes stream past, no second pass. A swapped, rebuilt, cut or replaced shard is an
  error naming it, never a silently different epoch.
* :func:`image_bytes` / :func:`mask_bytes`: which member of a sample is the image and the mask.

Standard library only at import time: training workers import this without WebDataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .. import storage
from ..errors import UserError

IMAGE_MEMBERS = ("image.jpg", "image.png")
"""A sample's image member: the source JPEG's bytes, or a PNG (re-encoded or lossless source)."""
MASK_MEMBER = "mask.png"
"""A sample's mask member: an 8-bit one-channel PNG of class ids (:data:`IGNORE_INDEX` = ignore)."""
IGNORE_INDEX = 255
"""Mask value excluded from losses and metrics (void pixels, augmentation padding)."""
MAX_MEMBER_BYTES = 256 << 20
"""Default largest member a reader accepts (``data.max_member_mb``): a 2 GiB member is refused from its
tar header instead of being read whole into a worker."""


def image_key(sample: dict) -> str:
    """The member name (``image.jpg`` or ``image.png``) that holds ``sample``'s image."""
    return IMAGE_MEMBERS[0] if IMAGE_MEMBERS[0] in sample else IMAGE_MEMBERS[1]


def image_bytes(sample: dict) -> bytes:
    """The encoded image of a sample :func:`read_samples` yielded (it checked there is one)."""
    return sample[image_key(sample)]


def mask_bytes(sample: dict) -> bytes:
    """The encoded mask (index PNG) of a sample :func:`read_samples` yielded."""
    return sample[MASK_MEMBER]


# ----------------------------------------------------------------------------- opening
_TRANSIENT = {408, 429, 500, 502, 503, 504}  # the HTTP statuses curl's --retry retries
_RETRIES, _RETRY_DELAY = 30, 2.0  # what webdataset's curl command used (--retry 30 --retry-delay 2)


def is_url(spec: str) -> bool:
    """Whether ``spec`` has a URL scheme (``http://``, ``file://``, ``s3://``, ...)."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(spec)))


def open_shard(url: str, read_timeout: float = 60.0) -> BinaryIO:
    """A binary stream of one tar: ``s3://`` through :mod:`segdist.storage`, a local path or ``file://`` URL,
    ``http(s)://`` through urllib, or a ``pipe:`` command through WebDataset's gopen.

    webdataset's gopen runs ``curl --connect-timeout 30 --retry 30`` for http(s), with no limit
    on a transfer that stalls: a stalled server hung the reader forever. A socket timeout
    bounds every wait for data instead; transient statuses are retried as curl did.
    """
    if storage.is_remote(url):
        return storage.open_remote(url, read_timeout)  # retried, resumed, ETag-pinned (segdist.storage)
    if url.startswith("file://"):
        url = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen  # only pipe: commands need WebDataset's process plumbing

        return gopen(url)
    if not url.startswith(("http://", "https://")):
        return open(url, "rb")
    for attempt in range(_RETRIES + 1):
        try:
            return urllib.request.urlopen(url, timeout=read_timeout)
        except urllib.error.HTTPError as e:
            if e.code not in _TRANSIENT or attempt == _RETRIES:
                raise
        time.sleep(_RETRY_DELAY)
    raise AssertionError("unreachable")


def is_stall(e: BaseException) -> bool:
    """Whether ``e`` is a read that got no data within :func:`open_shard`'s ``read_timeout``."""
    return isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)


def verify_hint(url: str) -> str:
    """What to run on a shard that failed a check: ``segdist shards verify`` on its local folder, or a
    look at the URL and the server."""
    if is_url(url) and not url.startswith("file://"):
        return "check the URL and the server"
    folder = url.rsplit("/", 1)[0] if "/" in url and not url.startswith("pipe:") else ""
    return f"run `segdist shards verify {folder}`" if folder else "run `segdist shards verify` on its folder"


# ----------------------------------------------------------------------------- the tar reader
def split_name(name: str) -> tuple[str, str] | tuple[None, None]:
    """``dir/key.image.jpg`` -> (``dir/key``, ``image.jpg``): WebDataset's rule (first dot of the file name)."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def _unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/")


def tar_samples(fileobj: BinaryIO, where: str, max_member: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """The samples of a tar stream in file order: dicts of ``__key__`` and one ``bytes`` per member suffix.

    Reads sequentially (tar stream mode), so it works on pipes and sockets. Non-file members and
    WebDataset's ``__meta__``-style members are skipped. Raises UserError naming ``where`` (the
    shard) for an unsafe member name, an empty or oversized member (judged from its header,
    before reading it) or a member name repeated within one sample.
    """
    sample: dict | None = None
    with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
        for member in tf:
            name = member.name
            if not member.isreg() or re.match(r"__[^/]*__($|/)", name):
                continue
            if _unsafe(name):
                raise UserError(f"shard '{where}' has a member named '{name}' that points outside the shard; "
                                f"rebuild it with `segdist shards build`")
            if member.size == 0:
                raise UserError(f"shard '{where}': member '{name}' is empty (0 bytes); {verify_hint(where)}")
            if member.size > max_member:
                raise UserError(f"shard '{where}': member '{name}' is {member.size / 2**20:.0f} MiB, over the "
                                f"{max_member / 2**20:.0f} MiB limit (data.max_member_mb); raise it if that is "
                                f"really one image, or rebuild the shards with --max-side")
            key, suffix = split_name(name)
            if key is None:
                continue
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            if suffix in sample:
                raise UserError(f"shard '{where}': member '{name}' appears twice in sample '{key}'; "
                                f"{verify_hint(where)}")
            sample[suffix] = tf.extractfile(member).read()
            tf.members = []  # tarfile keeps every header it read otherwise: memory grows per member
    if sample is not None:
        yield sample


def check_members(sample: dict, where: str) -> None:
    """A sample the decoder can use: ``image.jpg`` or ``image.png``, and ``mask.png``; UserError otherwise."""
    missing = [what for what, names in (("image", IMAGE_MEMBERS), ("mask", (MASK_MEMBER,)))
               if not any(n in sample for n in names)]
    if missing:
        members = ", ".join(k for k in sample if not k.startswith("__")) or "none"
        raise UserError(f"sample '{sample['__key__']}' in shard '{where}' has no {' and no '.join(missing)} "
                        f"(members: {members}); rebuild the shards or {verify_hint(where)}")


# ----------------------------------------------------------------------------- one shard, checked
@dataclass(frozen=True)
class ShardId:
    """What a shard is, per its manifest entry: sample count, and where the manifest has them, its size in
    bytes, sha256 and sample keys in order (None: not recorded, not checked)."""

    samples: int | None = None
    bytes: int | None = None
    sha256: str | None = None
    keys: tuple[str, ...] | None = None

    @classmethod
    def of(cls, entry: dict, keys: tuple[str, ...] | None = None) -> ShardId:
        """From a manifest's shard entry (``name``, ``samples``, ``bytes``, ``sha256``)."""
        return cls(entry.get("samples"), entry.get("bytes"), entry.get("sha256"), keys)


class _Hashing:
    """A read-only stream that hashes (sha256) and counts the bytes read through it."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha, self.n = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha.update(data)
        self.n += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) what tarfile leaves after the end marker: zero blocks up to the record size."""
        while self.read(1 << 20):
            pass


def read_samples(url: str, expected: ShardId | int | None = None, read_timeout: float = 60.0,
                 max_member: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Samples of one shard (local path, URL or ``pipe:``), in file order, as raw bytes, checked.

    Every sample must hold an image and a mask. With ``expected`` (a :class:`ShardId` from the
    manifest, or just its sample count): each sample's key must be the manifest's key at that
    position (a swapped or rebuilt shard fails at its first sample), a sample past the count fails
    at once, and a shard read to its end must have exactly the count, bytes and sha256 recorded
    (a tar cut at a member boundary is still a valid, shorter tar: only the count tells; same-keyed
    other bytes: only the hash). A reader that stops early (``take``) gets the key checks only. An
    http(s) read that gets no data for ``read_timeout`` seconds fails.
    """
    want = expected if isinstance(expected, ShardId) else ShardId(samples=expected)
    n, stream, hashing = 0, None, None
    try:
        stream = open_shard(url, read_timeout)
        hashing = _Hashing(stream)
        samples = tar_samples(hashing, url, max_member)
        for sample in samples:
            check_members(sample, url)
            if want.samples is not None and n >= want.samples:
                n += 1 + sum(1 for _ in samples)  # the error path only: the exact count helps
                break
            if want.keys is not None and sample["__key__"] != want.keys[n]:
                raise UserError(f"shard '{url}' holds sample '{sample['__key__']}' where its manifest lists "
                                f"'{want.keys[n]}': the shard was replaced or rebuilt since the manifest was "
                                f"written; {verify_hint(url)}")
            n += 1
            yield sample
        else:
            hashing.drain()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- any I/O or tar error is the user's data or URL
        if is_stall(e):
            raise UserError(f"no data from {url} for {read_timeout:g} s (data.read_timeout); "
                            "is the server up?") from None
        raise UserError(f"cannot read shard '{url}': {e}; {verify_hint(url)}") from None
    finally:
        if stream is not None:
            with contextlib.suppress(OSError):  # a pipe: command's exit status when left early
                stream.close()
    if want.samples is not None and n != want.samples:
        raise UserError(f"shard '{url}' holds {n} samples but its manifest says {want.samples}: it is truncated "
                        f"or was replaced; {verify_hint(url)}")
    if want.sha256 is not None and (hashing.n != want.bytes or hashing.sha.hexdigest() != want.sha256):
        raise UserError(f"shard '{url}' differs from its manifest ({hashing.n} bytes, sha256 "
                        f"{hashing.sha.hexdigest()[:12]}...; the manifest says {want.bytes} bytes, "
                        f"{want.sha256[:12]}...): it was replaced or rebuilt; {verify_hint(url)}")
