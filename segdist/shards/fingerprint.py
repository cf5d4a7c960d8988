"""Dataset identity: a fingerprint of a shard set, what changed between two, and split disjointness.

The fingerprint is each split's shard names with their sha256 (from the manifest: no pass over the
bytes; the readers check every shard against the same entries as they stream it) and the class
table. A run records it in every state (``dataset.json``), in ``config.yaml``'s header and in
every model folder (``segdist.json``, shown in the model card); a resume compares it with the
data it is given and names what changed (:func:`data_changes`, :func:`class_changes`).

A pattern spec (``data.shards='x-{0..9}.tar'``) has no manifest: its fingerprint holds the file
names and sample counts only (marked ``"weak"``).

Standard library only: training imports it with :mod:`.manifest`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath

from ..errors import UserError
from .classes import ClassTable, differences
from .manifest import ShardSet


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _shard_ids(shards: ShardSet, split: str) -> dict[str, str]:
    """Shard name -> its identity: the manifest's sha256, else (pattern specs) its sample count."""
    if shards.manifest is None:
        urls, sizes = shards.splits[split]
        return {PurePosixPath(u).name: f"{n} samples" for u, n in zip(urls, sizes)}
    entries = shards.manifest["splits"][split].get("shards", [])
    return {e["name"]: e.get("sha256") or f"{e.get('samples')} samples, {e.get('bytes')} bytes" for e in entries}


def class_table(shards: ShardSet) -> ClassTable | None:
    """The class table the shard set's manifest states (None: a pattern without a manifest beside it)."""
    if shards.task is None:
        return None
    return ClassTable(shards.task, tuple(shards.class_names or ()))


def fingerprint(shards: ShardSet) -> dict:
    """``{"digest", "classes", "splits": {split: {"digest", "shards": {name: sha256}}}}`` (+ ``"weak"``)."""
    table = class_table(shards)
    classes = table.record() if table else None
    splits = {}
    for split in shards.splits:
        ids = _shard_ids(shards, split)
        splits[split] = {"digest": _digest(ids), "shards": ids}
    fp = {"digest": _digest({"classes": classes, "splits": {s: v["digest"] for s, v in splits.items()}}),
          "classes": classes, "splits": splits}
    return fp if shards.manifest is not None else {**fp, "weak": "no manifest: shard names and sample counts only"}


def summary(fp: dict, spec: str = "") -> dict:
    """The short form model folders keep: digests and shard counts per split (the class table is beside it)."""
    return {"digest": fp["digest"], **({"spec": spec} if spec else {}),
            "splits": {s: {"digest": v["digest"], "shards": len(v["shards"])} for s, v in fp["splits"].items()}}


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def data_changes(old: dict, new: dict) -> list[str]:
    """What changed in the shards from fingerprint ``old`` to ``new``, per split, in words (empty: nothing)."""
    out = []
    for split in sorted(set(old["splits"]) | set(new["splits"])):
        if split not in new["splits"]:
            out.append(f"split '{split}' is gone")
            continue
        if split not in old["splits"]:
            out.append(f"split '{split}' is new")
            continue
        a, b = old["splits"][split]["shards"], new["splits"][split]["shards"]
        parts = [f"{what} {_names(names)}" for what, names in (
            ("changed", [n for n in b if n in a and a[n] != b[n]]), ("added", [n for n in b if n not in a]),
            ("removed", [n for n in a if n not in b])) if names]
        if parts:
            out.append(f"{split}: " + ", ".join(parts))
    return out


def class_changes(old: dict, new: dict) -> list[str]:
    """What changed in the class table from fingerprint ``old`` to ``new`` (empty: nothing, or unknown)."""
    if not old.get("classes") or not new.get("classes"):
        return []
    return differences(ClassTable.from_record(old["classes"]), ClassTable.from_record(new["classes"]))


def check_disjoint(shards: ShardSet) -> None:
    """Train and val must not share a sample: a pattern spec serves the same files as both, and a manifest
    may list one shard (by name or by content) in both splits. UserError naming the shared ones."""
    if shards.manifest is None:
        raise UserError(f"data.shards '{shards.spec}' names shard files, so the same files would serve as train "
                        f"and val (every val sample trained on); point data.shards at the shard folder, whose "
                        f"manifest.json splits them")
    if "train" not in shards.splits or "val" not in shards.splits:
        return
    train = shards.manifest["splits"]["train"].get("shards", [])
    val = shards.manifest["splits"]["val"].get("shards", [])
    names = {e["name"] for e in train} & {e["name"] for e in val}
    digests = {e.get("sha256") for e in train} & {e.get("sha256") for e in val} - {None}
    same = sorted(names) + sorted(e["name"] for e in val if e.get("sha256") in digests and e["name"] not in names)
    if same:
        raise UserError(f"data.shards '{shards.spec}': {_names(same)} serve(s) both train and val (the same shard "
                        f"listed in both splits, or the same bytes under two names), so val samples would be "
                        f"trained on; rebuild the shards with `segdist shards build`")
