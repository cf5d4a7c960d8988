"""Read shard folders: ``manifest.json`` (local, ``file://``, http(s) or ``s3://``), shard URLs and sample counts.

Training imports only this part of :mod:`segdist.shards`, so it imports the standard library and
:mod:`segdist.storage` (itself standard library only until an ``s3://`` URL is used) at module
level; ``braceexpand`` and ``webdataset`` load inside the functions that expand or count shard patterns.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .. import storage
from ..errors import UserError
from .classes import check_manifest_classes
from .reader import ShardId, is_url, read_samples

FORMAT = "segdist-shards"
VERSION = 1
MANIFEST = "manifest.json"


def local_path(base) -> Path:
    base = str(base)
    if base.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(base).path))
    return Path(base)


def _folder_of(base) -> str | Path:
    """Shard folder (Path) or URL prefix (str, no trailing slash) for a folder/URL/manifest path."""
    base = str(base)
    if is_url(base) and not base.startswith("file://"):
        base = base.rstrip("/")
        return base.rsplit("/", 1)[0] if base.endswith("/" + MANIFEST) else base
    path = local_path(base)
    return path.parent if path.name == MANIFEST and path.is_file() else path


def read_manifest(base) -> dict:
    """Load and check ``manifest.json`` of a shard folder, a manifest path or an http(s) URL prefix."""
    folder = _folder_of(base)
    if isinstance(folder, str) and storage.is_remote(folder):
        text = storage.read_manifest_text(folder, MANIFEST)
    elif isinstance(folder, str):
        if not folder.startswith(("http://", "https://")):
            raise UserError(f"unsupported shard URL {base}: use a local folder, an http(s):// or an s3:// URL")
        url = f"{folder}/{MANIFEST}"
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                text = r.read().decode("utf-8")
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise UserError(f"cannot fetch {url}: {getattr(e, 'reason', e)}")
    else:
        path = folder / MANIFEST
        if not path.is_file():
            raise UserError(f"{folder} has no {MANIFEST}: {_no_manifest_hint(Path(folder))}")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read {path}: {e}")
    return _check_manifest(text, base)


def _check_manifest(text: str, base) -> dict:
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{base}: {MANIFEST} is not valid JSON ({e.msg})")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{base}: {MANIFEST} is not a segdist shard manifest (format != {FORMAT!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise UserError(f"{base}: shard format version {version} is newer than this segdist reads ({VERSION}); "
                        "upgrade segdist or rebuild the shards")
    if not isinstance(manifest.get("splits"), dict):
        raise UserError(f"{base}: {MANIFEST} has no 'splits'")
    check_manifest_classes(manifest, base)
    return manifest


def _split_shards(base, split: str, manifest: dict | None) -> list[dict]:
    manifest = manifest or read_manifest(base)
    if split not in manifest["splits"]:
        raise UserError(f"split '{split}' is not in {base} (it has: {', '.join(manifest['splits']) or 'none'})")
    return manifest["splits"][split].get("shards", [])


def shard_urls(base, split: str, manifest: dict | None = None) -> list[str]:
    """Paths (local base) or URLs (http(s) base) of ``split``'s shards, in manifest order."""
    folder = _folder_of(base)
    shards = _split_shards(base, split, manifest)
    if isinstance(folder, str):
        return [f"{folder}/{s['name']}" for s in shards]
    return [str(folder / s["name"]) for s in shards]


def shard_sizes(base, split: str, manifest: dict | None = None) -> list[int]:
    """Number of samples in each of ``split``'s shards, in the same order as :func:`shard_urls`."""
    return [int(s["samples"]) for s in _split_shards(base, split, manifest)]


# ----------------------------------------------------------------------------- patterns
def is_pattern(spec: str) -> bool:
    """Whether ``spec`` names shard files itself (glob, brace pattern, ``a::b`` list, one ``.tar``)."""
    return any(c in spec for c in "*?{") or "::" in spec or spec.endswith(".tar")


def expand_urls(spec: str) -> list[str]:
    """Expand ``a::b``, brace patterns ``x-{000000..000009}.tar`` and local globs."""
    import braceexpand  # lazy: training reads a shard folder's manifest with the standard library only

    urls: list[str] = []
    for part in spec.split("::"):
        for url in braceexpand.braceexpand(part):
            if storage.is_remote(url) and any(c in url for c in "*?["):
                urls.extend(storage.glob(url))  # one listing of the prefix before the first wildcard
            elif "://" not in url and not url.startswith("pipe:") and any(c in url for c in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    if not urls:
        raise UserError(f"shard pattern '{spec}' matches no files; check the path")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        raise UserError(f"shard file '{missing[0]}' not found ({len(missing)} missing)")
    return urls


def _no_manifest_hint(folder: Path) -> str:
    """What to pass instead: the folder of a shard, a shard folder inside, or shards built from a dataset."""
    build = "build shards with `segdist shards build SRC --out DIR` and pass DIR"
    if folder.is_file():
        if folder.suffix == ".tar":
            return f"pass the shard folder that holds it ({folder.parent}), not one shard"
        return f"pass a shard folder, not a file; {build}"
    try:
        children = list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return build
    inner = sorted(p for p in children if (p / MANIFEST).is_file())
    if inner:
        return f"pass a shard folder inside it, e.g. {inner[0]}"
    dataset = {"images", "masks", "train.csv"} & {p.name.lower() for p in children} or any(
        p.suffix.lower() in (".jpg", ".jpeg", ".png", ".csv") for p in children)
    if dataset:
        return (f"it looks like a dataset, not shards: build them with "
                f"`segdist shards build {folder} --out {folder}-shards` and pass {folder}-shards")
    return build


def _count_samples(url: str, read_timeout: float = 60.0) -> int:
    """Samples in one tar (local path, URL or ``pipe:``), grouped as every reader groups them."""
    return sum(1 for _ in read_samples(url, read_timeout=read_timeout))


def _manifest_beside(url: str) -> dict | None:
    """The manifest of the folder (or URL prefix) that holds shard ``url``, or None where there is none."""
    if url.startswith("pipe:"):
        return None
    if "://" in url:
        try:
            return read_manifest(url.rsplit("/", 1)[0])
        except UserError:
            return None
    return read_manifest(Path(url).parent) if (Path(url).parent / MANIFEST).is_file() else None


# ----------------------------------------------------------------------------- read once
ANY_SPLIT = "*"
"""The one key of :attr:`ShardSet.splits` for a pattern spec: its shards serve every split."""


@dataclass(frozen=True)
class ShardSet:
    """A shard folder/URL base read once: task, classes and each split's shard URLs and sample counts.

    For a folder, manifest path or http(s) base, ``splits`` holds every split of its manifest and
    ``manifest`` the manifest itself. For a pattern spec ``manifest`` is None and ``splits`` holds
    one entry, :data:`ANY_SPLIT`: the same shards serve whatever split is asked for.
    """

    spec: str
    task: str | None  # manifest["task"]: "binary" | "multiclass"; None: a pattern without a manifest
    num_classes: int | None
    class_names: list[str] | None
    splits: dict[str, tuple[list[str], list[int]]]  # split -> (shard URLs, samples per shard)
    manifest: dict | None

    def split(self, name: str) -> tuple[list[str], list[int]]:
        """(shard URLs, samples per shard) of split ``name``; UserError naming the splits there are."""
        if self.manifest is None:
            return self.splits[ANY_SPLIT]
        if name not in self.splits:
            raise UserError(f"shards '{self.spec}' have no '{name}' split "
                            f"(have: {', '.join(self.splits) or 'none'})")
        return self.splits[name]

    @property
    def palette(self) -> list[list[int]] | None:
        """The class colours ``[[r, g, b], ...]`` the build recorded (multi-class palette masks), else None."""
        return (self.manifest or {}).get("palette")

    def identity(self, name: str) -> list[ShardId]:
        """What each of split ``name``'s shards must be, in :meth:`split`'s order: sample count, and from
        the manifest its bytes, sha256 and sample keys in order (checked by every reader as it streams)."""
        urls, sizes = self.split(name)
        if self.manifest is None:
            return [ShardId(samples=n) for n in sizes]
        return [ShardId.of(entry, self._keys.get(entry["name"])) for entry in self.manifest["splits"][name]["shards"]]

    @functools.cached_property
    def _keys(self) -> dict[str, tuple[str, ...]]:
        """Shard name -> its sample keys in file order, from the manifest's ``sources`` (in write order)."""
        keys: dict[str, list[str]] = {}
        for key, source in (self.manifest or {}).get("sources", {}).items():
            keys.setdefault(source.get("shard"), []).append(key)
        return {name: tuple(k) for name, k in keys.items()}


def open_shards(spec: str) -> ShardSet:
    """Read shard spec ``spec`` (``data.shards``) once into a :class:`ShardSet`.

    * A shard folder, a ``manifest.json`` path or an http(s) base: ``manifest.json`` is read
      once (one GET for a URL); URLs and counts of every split come from it.
    * A pattern (see :func:`is_pattern`): its files come from :func:`expand_urls` and their
      sample counts from one pass over each tar. Task and classes come from the
      ``manifest.json`` in the folder (or URL prefix) of the first matched file; where there is
      none (or a ``pipe:`` command) they are None: reading needs none, training refuses that.

    Raises UserError for an empty spec, naming the config key ``data.shards``.
    """
    spec = str(spec or "")
    if not spec:
        raise UserError("config key 'data.shards' is empty; set it to a shard folder built with "
                        "`segdist shards build` (e.g. data.shards=runs/shards)")
    if is_pattern(spec):
        urls = expand_urls(spec)
        labels = _manifest_beside(urls[0]) or {"task": None, "num_classes": None, "class_names": None}
        splits = {ANY_SPLIT: (urls, [_count_samples(u) for u in urls])}
        manifest = None
    else:
        labels = manifest = read_manifest(spec)
        splits = {s: (shard_urls(spec, s, manifest), shard_sizes(spec, s, manifest)) for s in manifest["splits"]}
    return ShardSet(spec, labels["task"], labels["num_classes"], labels["class_names"], splits, manifest)
