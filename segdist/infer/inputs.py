"""What ``segdist predict`` reads: image files, folders, globs and shard folders, as :class:`Job` s.

Each job knows how the summary names it, its output name (``sub/x.png``), how to get its bytes
and whether EXIF orientation applies (files) or was applied when the shards were built.
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..shards import IMAGE_EXTS, open_shards
from ..shards import ShardId, image_bytes, read_samples
from ..shards.classes import ClassTable, same_classes
from ..shards.fingerprint import class_table


@dataclass(frozen=True)
class Job:
    """One input of ``segdist predict``: how the summary names it, its output name (``sub/x.png``),
    how to get its bytes, and whether EXIF orientation applies (files) or was applied (shards)."""

    label: str
    name: str
    read: Callable[[], bytes]
    orient: bool = True


def list_images(spec: str | Path) -> tuple[list[Path], Path]:
    """An image file, a folder of images (recursive) or a glob -> (files, the folder names are relative to)."""
    path = Path(spec)
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
        if files:
            return files, path
        raise UserError(f"folder '{path}' holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    if glob.has_magic(str(spec)):
        files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True)
                       if Path(p).suffix.lower() in IMAGE_EXTS and Path(p).is_file())
        if not files:
            raise UserError(f"pattern '{spec}' matches no images ({', '.join(sorted(IMAGE_EXTS))})")
        base = Path(*itertools.takewhile(lambda part: not glob.has_magic(part), path.parts))
        return files, base
    raise UserError(f"input '{path}' does not exist; pass image files, folders, globs or a shard folder")


def output_names(files: list[Path], base: Path) -> list[str]:
    """``sub/x.png`` for ``base/sub/x.jpg``; ``x_jpg.png`` when ``x.jpg`` and ``x.png`` both exist."""
    rel = [f.relative_to(base) for f in files]
    stems = [str(r.with_suffix("")) for r in rel]
    return [f"{s}_{r.suffix[1:]}.png" if stems.count(s) > 1 else f"{s}.png" for s, r in zip(stems, rel)]


def shard_jobs(urls: list[str], ids: list[ShardId]) -> Iterator[Job]:
    """The samples of shards (read one tar at a time, each checked against its manifest entry ``ids``):
    named by their keys, orientation already applied."""
    for url, ident in zip(urls, ids):
        for s in read_samples(url, ident):
            data = image_bytes(s)
            yield Job(s["__key__"], f"{s['__key__']}.png", lambda data=data: data, orient=False)


def find_inputs(inputs: Iterable[str | Path], split: str = "val",
                classes: ClassTable | None = None) -> tuple[int, Iterator[Job]]:
    """Files, folders, globs and shard folders (a folder holding manifest.json: its ``split``) ->
    (how many images, the jobs). A file named twice is predicted once; output names that would
    collide (the same name under two inputs) get ``_2``, ``_3``... A shard folder whose class table
    differs from the model's ``classes`` is a UserError naming the differences."""
    files: dict[Path, Job] = {}
    shards = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir() and (path / "manifest.json").is_file():
            shard_set = open_shards(str(path))
            if classes is not None:
                same_classes(classes, class_table(shard_set), "the model", f"shard folder '{path}'",
                             "predict with a model trained on its classes, or pass its images as files")
            shards.append((shard_set.split(split)[0], shard_set.identity(split)))
            continue
        found, base = list_images(spec)
        for f, name in zip(found, output_names(found, base)):
            files.setdefault(f.resolve(), Job(str(f.relative_to(base)), name, f.read_bytes))
    jobs = itertools.chain(files.values(), *(shard_jobs(*s) for s in shards))
    return len(files) + sum(i.samples for _, ids in shards for i in ids), unique_names(jobs)


def unique_names(jobs: Iterable[Job]) -> Iterator[Job]:
    seen: set[str] = set()
    for job in jobs:
        name, n = job.name, 1
        while name in seen:
            n += 1
            name = f"{job.name[:-4]}_{n}.png"
        seen.add(name)
        yield job if name == job.name else Job(job.label, name, job.read, job.orient)
