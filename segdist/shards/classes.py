"""Class identity: the class table of a shard set or a model, its self-consistency, and how two differ.

A class table is the task (``binary`` | ``multiclass``), the class names in id order and the
ignore index. A shard manifest states it (``task``, ``num_classes``, ``class_names``, plus per-split
``class_pixels`` counts that must agree); a model folder records the one it was trained on.
Scores, predictions and resumed training are only meaningful when the two are the same table, so
``segdist eval``, ``predict``, resume and the shard readers compare them with :func:`differences`.

Standard library only: training imports it with :mod:`.manifest`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import UserError
from .reader import IGNORE_INDEX

TASKS = ("binary", "multiclass")


@dataclass(frozen=True)
class ClassTable:
    """Task, class names (index = class id) and ignore index of a dataset or a model."""

    task: str
    names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def record(self) -> dict:
        """As JSON: what model folders (``segdist.json``) and states record."""
        return {"task": self.task, "num_classes": self.num_classes, "names": list(self.names),
                "ids": list(range(self.num_classes)), "ignore_index": self.ignore_index}

    @classmethod
    def from_record(cls, record: dict) -> ClassTable:
        return cls(record["task"], tuple(record["names"]), int(record.get("ignore_index", IGNORE_INDEX)))

    @classmethod
    def from_manifest(cls, manifest: dict) -> ClassTable:
        """The table a manifest states (checked first by :func:`check_manifest_classes`)."""
        return cls(manifest["task"], tuple(manifest["class_names"]), int(manifest.get("ignore_index", IGNORE_INDEX)))

    def __str__(self) -> str:
        shown = ", ".join(self.names[:6]) + (", ..." if self.num_classes > 6 else "")
        return f"{self.task}, {self.num_classes} classes ({shown})"


def differences(a: ClassTable, b: ClassTable) -> list[str]:
    """What changes from table ``a`` to ``b``, in words (empty: the same table)."""
    out = []
    if a.task != b.task:
        out.append(f"task {a.task} -> {b.task}")
    if a.num_classes != b.num_classes:
        out.append(f"{a.num_classes} -> {b.num_classes} classes")
    renamed = [f"class {i} '{x}' -> '{y}'" for i, (x, y) in enumerate(zip(a.names, b.names)) if x != y]
    out += renamed[:3] + ([f"{len(renamed) - 3} more renamed"] if len(renamed) > 3 else [])
    if a.ignore_index != b.ignore_index:
        out.append(f"ignore index {a.ignore_index} -> {b.ignore_index}")
    return out


def same_classes(model: ClassTable, data: ClassTable, what_model: str, what_data: str, fix: str) -> None:
    """A model's class table and its data's must be the same table; UserError naming the differences and ``fix``.

    Only the names matter for a list that states no task (``predict --classes``): pass its ``task`` as the
    model's. Scores, masks or a resumed run on another table would be plausible numbers for the wrong thing.
    """
    diff = differences(model, data)
    if diff:
        raise UserError(f"{what_model} was trained on {model} but {what_data} holds {data} ({'; '.join(diff)}); "
                        f"{fix}")


def out_channels_for(cfg, shards) -> int:
    """The model's logits per pixel for ``shards`` (a :class:`~segdist.shards.manifest.ShardSet`): 1 for binary
    (sigmoid), K for K classes; ``cfg.model.num_classes`` may restate it (1 or 2 for binary). Another count (a
    binary model on multi-class masks, or the reverse) is a UserError."""
    if shards.task is None:
        raise UserError(f"data.shards '{shards.spec}' names shard files without a manifest.json beside them, so "
                        f"the task and classes are unknown; point data.shards at the shard folder instead")
    want = 1 if shards.task == "binary" else shards.num_classes
    got = cfg.model.num_classes or want
    if got != want and not (shards.task == "binary" and got == 2):
        raise UserError(f"config key 'model.num_classes' is {got} but the shards hold a {shards.task} task with "
                        f"{shards.num_classes} classes; use model.num_classes=0 (take it from the manifest)")
    return got


def check_manifest_classes(manifest: dict, base) -> None:
    """A manifest's class statements must agree with each other: task, ``num_classes``, ``class_names``, each
    split's ``class_pixels`` and the palette. A hand-edited one is a UserError naming the contradiction."""
    task, k, names = manifest.get("task"), manifest.get("num_classes"), manifest.get("class_names")
    problems = []
    if task not in TASKS:
        problems.append(f"task is {json.dumps(task)} (binary or multiclass)")
    if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= IGNORE_INDEX:
        problems.append(f"num_classes is {json.dumps(k)} (a number 2..255)")
    elif task == "binary" and k != 2:
        problems.append(f"task is binary but num_classes is {k}")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problems.append("class_names is not a list of names")
    elif isinstance(k, int) and len(names) != k:
        problems.append(f"num_classes is {k} but class_names lists {len(names)}")
    for split, body in (manifest.get("splits") or {}).items():
        pixels = body.get("class_pixels") if isinstance(body, dict) else None
        if isinstance(k, int) and isinstance(pixels, list) and len(pixels) != k:
            problems.append(f"num_classes is {k} but splits.{split}.class_pixels counts {len(pixels)} classes")
    palette = manifest.get("palette")
    if isinstance(k, int) and isinstance(palette, list) and len(palette) != k:
        problems.append(f"num_classes is {k} but the palette has {len(palette)} colours")
    if problems:
        raise UserError(f"{base}: manifest.json contradicts itself ({'; '.join(problems[:3])}); it was edited by "
                        f"hand or damaged: rebuild the shards with `segdist shards build`")
