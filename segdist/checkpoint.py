"""Checkpoints: resumable training states and SMP ``save_pretrained`` model folders.

* ``runs/<name>/states/step-00000123/``: ``accelerator.save_state`` (model, optimiser,
  scheduler, scaler, per-rank RNG) plus ``loop.json`` (epoch, batch position, step, best
  metric) and ``files.json`` (size and sha256 of every other file). Written to
  ``.tmp-step-*`` and renamed, so a killed job leaves a hidden torn folder that
  ``train.resume=auto`` skips and reports, never a half-written state under a real name. A
  state damaged later (truncated, replaced) fails its ``files.json`` check by name, and
  ``train.resume=auto`` falls back to the previous one.
* ``runs/<name>/best/`` and ``last/``: the model in SMP format (``config.json`` +
  ``model.safetensors``), loadable with ``smp.from_pretrained``, plus ``segdist.json`` (what
  inference needs: image size, normalisation, class names).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from .atomic import atomic_dir, atomic_write_text, glob_escape, repair_swap, sha256_file
from .config import Config, config_from_dict
from .errors import UserError, disk_full, disk_full_reason, limit_reason
from .resize import as_hw
from .shards.classes import ClassTable


class DamagedState(UserError):
    """A state that cannot be trusted (a file missing, cut, changed or unreadable); ``train.resume=auto``
    falls back past it, an explicit ``train.resume=PATH`` stops with this message."""


STATE_RE = re.compile(r"^step-(\d{8})$")
LOOP_FILE = "loop.json"
FILES_FILE = "files.json"
META_FILE = "segdist.json"


RESUME_HINT = "run the same command with train.resume=auto"


def save_state(accelerator, states_dir: Path, step: int, loop: dict, keep_last: int,
               extras: dict | None = None, records: dict | None = None) -> Path:
    """All ranks call this together (save_state writes per-rank RNG files).

    ``extras`` (name -> module, e.g. the EMA model) go to ``<name>.safetensors``: accelerate's
    ``register_for_checkpointing`` would pickle them and load with ``weights_only=False``.
    ``records`` (name -> JSON-able, e.g. the dataset fingerprint) go to ``<name>.json``, hashed in
    ``files.json`` like the rest. A failed write on any rank (a full disk: :class:`DiskFull`) removes
    the temp folder on every rank together; the previous states stay as they were.
    """
    final = states_dir / f"step-{step:08d}"
    tmp = states_dir / f".tmp-step-{step:08d}"
    main = accelerator.is_main_process

    def begin() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def finish() -> None:
        if not main:
            return
        for name, module in (extras or {}).items():
            safetensors.torch.save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                                        str(tmp / f"{name}.safetensors"))
        for name, record in (records or {}).items():
            atomic_write_text(tmp / f"{name}.json", json.dumps(record, indent=1))
        files = {p.name: [p.stat().st_size, sha256_file(p)] for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_text(tmp / FILES_FILE, json.dumps(files, indent=1))
        atomic_write_text(tmp / LOOP_FILE, json.dumps(loop, indent=1))  # last: it marks the state complete
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_states(states_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    for part in (begin, lambda: accelerator.save_state(str(tmp), safe_serialization=True), finish):
        _on_every_rank(accelerator, part, tmp, final)
    return final


def _on_every_rank(accelerator, part, tmp: Path, final: Path) -> None:
    """Run one part of a state save on this rank; if it failed on any rank, all remove the temp folder and stop
    together (one rank alone would leave the others waiting in the next collective)."""
    error = None
    try:
        part()
    except Exception as e:  # noqa: BLE001 -- judged below: a full disk is the user's, anything else re-raised
        error = e
    failed = error is not None
    if accelerator.num_processes > 1:  # also the barrier between the parts
        flag = torch.tensor([float(failed)], device=accelerator.device)
        failed = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
    if not failed:
        return
    reason = (disk_full_reason(error) or limit_reason(tmp)) if error is not None else None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is not None and reason is None:
        raise error
    if error is None:
        raise UserError(f"saving state {final} failed on another process (its message says why)")
    raise disk_full(final, reason, RESUME_HINT)


def list_states(states_dir: Path) -> list[Path]:
    """Complete states, oldest first."""
    if not states_dir.is_dir():
        return []
    done = [p for p in states_dir.iterdir() if STATE_RE.match(p.name) and (p / LOOP_FILE).is_file()]
    return sorted(done, key=lambda p: p.name)


def torn_states(states_dir: Path) -> list[Path]:
    if not states_dir.is_dir():
        return []
    return sorted(p for p in states_dir.iterdir()
                  if p.name.startswith(".tmp-") or (STATE_RE.match(p.name) and not (p / LOOP_FILE).is_file()))


def find_resume(spec: str, states_dir: Path) -> list[Path]:
    """States to try, best first: ``auto`` -> complete states newest first; a path -> that state."""
    if not spec:
        return []
    if spec == "auto":
        return list_states(states_dir)[::-1]
    path = Path(spec)
    if not (path / LOOP_FILE).is_file():
        raise UserError(f"train.resume '{spec}' is not a complete state folder (no {LOOP_FILE}); "
                        f"use train.resume=auto or a folder under {states_dir}")
    return [path]


def damage(path: Path) -> str | None:
    """Why the state at ``path`` cannot be trusted (a file missing, cut or changed), or None."""
    try:
        files = json.loads((path / FILES_FILE).read_text())
    except FileNotFoundError:
        return None  # a state from before files.json: load_state's own errors still name the file
    except (OSError, ValueError) as e:
        return f"{FILES_FILE} is unreadable ({e})"
    for name, (size, digest) in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were saved (truncated or replaced)"
        if sha256_file(f) != digest:
            return f"{name} differs from what was saved (sha256 mismatch)"
    return None


def read_loop(path: Path) -> dict:
    """The training position saved in state ``path`` (``loop.json``); a torn or foreign file is a DamagedState."""
    try:
        loop = json.loads((path / LOOP_FILE).read_text())
    except (OSError, ValueError) as e:
        raise DamagedState(f"state {path} is damaged: {LOOP_FILE} is unreadable ({e})") from None
    if not isinstance(loop, dict):
        raise DamagedState(f"state {path} is damaged: {LOOP_FILE} holds {type(loop).__name__}, not a training position")
    return loop


def load_state(accelerator, path: Path, extras: dict | None = None) -> dict:
    """Load a state saved by :func:`save_state`; a damaged one is a UserError naming the file."""
    reason = damage(path)
    if reason is not None:
        raise DamagedState(f"state {path} is damaged: {reason}")
    try:
        accelerator.load_state(str(path))  # torch.load(weights_only=True) inside, safetensors for models
        for name, module in (extras or {}).items():
            module.load_state_dict(safetensors.torch.load_file(str(path / f"{name}.safetensors"),
                                                               device=str(accelerator.device)))
        return read_loop(path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- a truncated or foreign file; no code runs (weights_only)
        first = str(e).splitlines()[0] if str(e) else ""
        raise DamagedState(f"state {path} is damaged: {type(e).__name__}: {first}") from None


@dataclass(frozen=True)
class ModelMeta:
    """What using a saved model needs, saved beside its weights as ``segdist.json`` (the record timm keeps
    as a model's ``pretrained_cfg``): the training config -- its ``data.*`` resize rule and image size,
    its normalisation -- and the classes. The one record inference, evaluation, export and the model
    card read; nothing re-derives it."""

    config: Config
    class_names: tuple[str, ...]
    num_classes: int
    binary: bool  # one sigmoid logit per pixel; else num_classes softmax logits
    palette: list | dict | None = None  # class colours ([[r, g, b], ...] or {"colors", "void"}) for mask PNGs
    classes: ClassTable | None = None  # the data's class table (task, names, ids, ignore index); None: older folders
    dataset: dict | None = None  # the training data's fingerprint (digests per split, see shards.fingerprint.summary)

    @property
    def image_hw(self) -> tuple[int, int]:
        """``data.image_size`` as (H, W): the squash size, the crop and sliding window of training."""
        return as_hw(self.config.data.image_size)

    @property
    def mean(self) -> list[float]:
        return self.config.augment.mean

    @property
    def std(self) -> list[float]:
        return self.config.augment.std

    @property
    def class_table(self) -> ClassTable:
        """The class table the model was trained on; for folders saved before it was recorded, from the class
        names (segdist's binary task is exactly its 2-class one)."""
        if self.classes is not None:
            return self.classes
        return ClassTable("binary" if self.num_classes == 2 else "multiclass", self.class_names)

    @property
    def out_channels(self) -> int:
        """Logits per pixel: 1 (binary) or K."""
        return 1 if self.binary else self.num_classes

    def to_json(self) -> dict:
        """``segdist.json``: the config, the classes, and (for readers of older files) the input rule's keys."""
        return {"image_size": self.config.data.image_size, "mean": self.mean, "std": self.std,
                "class_names": list(self.class_names), "num_classes": self.num_classes, "binary": self.binary,
                "classes": self.class_table.record(), **({"dataset": self.dataset} if self.dataset else {}),
                "config": self.config.to_dict(), **({"palette": self.palette} if self.palette else {})}

    @classmethod
    def from_json(cls, data: dict, where: str | Path) -> ModelMeta:
        """From :meth:`to_json` output; keys a newer segdist added are skipped, a missing one is a UserError."""
        try:
            classes = ClassTable.from_record(data["classes"]) if isinstance(data.get("classes"), dict) else None
            return cls(config_from_dict(data["config"], strict=False), tuple(data["class_names"]),
                       int(data["num_classes"]), bool(data["binary"]), data.get("palette"), classes,
                       data.get("dataset"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{where} is not a segdist model description ({type(e).__name__}: {e}); the model "
                            f"folder is damaged: pass another one (runs/<name>/best or runs/<name>/last)") from None


def save_model(model, out: Path, meta: ModelMeta) -> None:
    """SMP ``save_pretrained`` + ``segdist.json``, swapped into ``out`` atomically (main process only); a full
    disk leaves the previous ``out`` as it was (:class:`DiskFull`)."""
    with atomic_dir(out, then=RESUME_HINT) as tmp:
        model.save_pretrained(str(tmp))
        atomic_write_text(tmp / META_FILE, json.dumps(meta.to_json(), indent=1))


def read_record(state: Path, name: str) -> dict | None:
    """Record ``name`` saved in ``state`` by :func:`save_state` (``<name>.json``); None in states saved before
    it was recorded; a torn or foreign one is a DamagedState."""
    path = Path(state) / f"{name}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DamagedState(f"state {state} is damaged: {path.name} is unreadable ({e})") from None
    if not isinstance(record, dict):
        raise DamagedState(f"state {state} is damaged: {path.name} holds {type(record).__name__}, not a record")
    return record


def read_meta(ckpt_dir: str | Path) -> ModelMeta:
    """The :class:`ModelMeta` of model folder ``ckpt_dir``; UserError for a folder without one or a damaged file."""
    path = Path(ckpt_dir) / META_FILE
    if not Path(ckpt_dir).exists() and interrupted_swap(Path(ckpt_dir)):
        raise UserError(f"'{ckpt_dir}' is missing: a save into it was killed between its two renames, and its "
                        f"previous copy is beside it; any `segdist train ... train.resume=auto` of the run puts it "
                        f"back, or rename {interrupted_swap(Path(ckpt_dir))} to {Path(ckpt_dir).name}")
    if not path.is_file():
        raise UserError(f"'{ckpt_dir}' is not a segdist model folder (no {META_FILE}); "
                        f"pass runs/<name>/best or runs/<name>/last")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); the model folder is damaged: "
                        f"pass another one (runs/<name>/best or runs/<name>/last)") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} holds {type(meta).__name__}, not a segdist model description; the folder is damaged")
    return ModelMeta.from_json(meta, path)


def interrupted_swap(folder: Path) -> str:
    """The name of the copy of ``folder`` that a killed swap left beside it (``.<name>.old-<pid>``), or ""."""
    olds = sorted(folder.parent.glob(f".{glob_escape(folder.name)}.old-*")) if folder.parent.is_dir() else []
    return olds[-1].name if olds else ""


def repair_run_folder(run_dir: Path) -> list[str]:
    """Finish or undo a save of ``best/`` or ``last/`` that a killed run left half done (see
    :func:`~segdist.atomic.repair_swap`); returns what was done. The caller holds the run folder's lock."""
    return [note for name in ("best", "last") for note in repair_swap(run_dir / name)]
