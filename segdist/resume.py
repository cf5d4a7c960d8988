"""Where a run starts: a fresh start, or a resume from a saved state, and what may change between them.

:class:`Loop` is the training position saved as ``loop.json`` in every state. :func:`resume_or_start`
picks the state to continue from (``train.resume=auto``: the newest undamaged one, falling back past
damaged ones on every rank together), or starts at step 0 in a folder without a previous run
(a rerun into one is refused unless ``train.overwrite`` says so). :func:`elastic` lets a resume
use another world size, worker count or batch size; :func:`rescored` restarts the best-model
comparison when the way val is scored changed; :func:`same_data` refuses a resume onto other data
(another dataset fingerprint) unless ``train.allow_new_data`` says so, and never onto other classes.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import DamagedState, find_resume, list_states, load_state, read_loop, read_record, torn_states
from .config import Config
from .distributed import agree
from .errors import UserError
from .shards.fingerprint import class_changes, data_changes
from .stream import PLAN_KEYS

__all__ = ["Loop", "STREAM_VERSION", "elastic", "rescored", "resume_or_start", "same_data", "scored_at",
           "start_fresh"]

STREAM_VERSION = 2
"""Sample-order version in the resume plan; 2 = take before shuffle (older states resume differently)."""


@dataclass
class Loop:
    """Where the run is; saved as ``loop.json`` in every state, so a resume continues exactly here."""

    epoch: int = 0
    batch: int = 0  # batches this rank has consumed in ``epoch``
    step: int = 0  # optimiser steps taken
    best_iou: float = -1.0
    best_at: str = ""  # how best_iou was scored (see scored_at); "" in states from before it was recorded
    nonfinite: int = 0  # skipped non-finite steps, in all
    nonfinite_run: int = 0  # ... and in a row (the run stops at train.max_nonfinite)
    plan: dict = field(default_factory=dict)  # what the sample order depends on
    carry: list = field(default_factory=list)  # earlier runs in this epoch with other plans (elastic resume)


def resume_or_start(cfg: Config, acc, run_dir: Path, extras: dict, log, dataset: dict | None = None) -> Loop:
    """The newest undamaged state when resuming (model, optimiser, scheduler, scaler, RNG, position,
    and ``extras`` such as the EMA weights), else step 0 in a run folder that holds no previous run.
    ``train.resume=auto`` falls back past damaged states, saying so; ``log`` (the run's
    :class:`~segdist.track.RunLog`) drops what a killed run logged after the state it resumes.
    ``dataset`` (this run's fingerprint) must match the state's, see :func:`same_data`."""
    states_dir = run_dir / "states"
    # The sample plan depends on these; a resume must see the same ones to continue exactly.
    plan = {"world_size": acc.num_processes, "num_workers": cfg.data.num_workers, "batch_size": cfg.data.batch_size,
            "accumulate": cfg.optim.accumulate, "seed": cfg.train.seed, "stream": STREAM_VERSION}
    for torn in torn_states(states_dir):
        acc.print(f"ignoring torn state {torn} (left by a killed job)")
    candidates = find_resume(cfg.train.resume, states_dir)
    for path in candidates:
        try:
            elastic(as_loop(read_loop(path), path), plan, path, lambda _: None)  # a changed seed: refused first
            new_data = same_data(read_record(path, "dataset"), dataset, path, cfg.train.allow_new_data, acc.print)
            loop, failed = as_loop(load_state(acc, path, extras), path), ""
        except DamagedState as e:
            loop, failed = None, str(e)
        (any_failed,) = agree(acc, bool(failed))  # every rank falls back together
        if not any_failed:
            if acc.is_main_process:
                log.truncate_after(loop.step)  # drop what the killed run logged after this state
            acc.print(f"resumed from {path}: epoch {loop.epoch}, batch {loop.batch}, step {loop.step}")
            if new_data:  # scores on other val data are not comparable: the next evaluation sets best/ anew
                loop = dataclasses.replace(loop, best_iou=-1.0)
            return elastic(rescored(loop, cfg, acc.print), plan, path, acc.print)
        if cfg.train.resume != "auto":
            raise UserError(failed or f"state {path} is damaged on another process")
        acc.print(f"{failed or f'state {path} is damaged on another process'}; falling back to the previous state")
    if candidates:
        raise UserError(f"every state in {states_dir} is damaged (see above); start over with "
                        f"train.overwrite=true or choose another train.name")
    start_fresh(run_dir, acc, cfg.train.overwrite)
    return Loop(plan=plan)


def same_data(saved: dict | None, current: dict | None, path: Path, allow_new: bool, say) -> bool:
    """Whether the resume from ``path`` continues on other data than its state was trained on (fingerprints
    ``saved`` vs ``current``). Another class table is refused (the model's head is made for its classes);
    other shards are refused unless ``allow_new`` (``train.allow_new_data``), then said and True is returned."""
    if saved is None or current is None:
        return False  # a state from before fingerprints were recorded: nothing to compare
    classes = class_changes(saved, current)
    if classes:
        raise UserError(f"cannot resume from {path}: the class table changed ({'; '.join(classes)}); a model cannot "
                        f"change its classes mid-run: start a new run (train.name=...) and fine-tune with "
                        f"model.pretrained={path / 'model.safetensors'}")
    if saved["digest"] == current["digest"]:
        return False
    changes = "; ".join(data_changes(saved, current)) or "shard identities differ"
    if not allow_new:
        raise UserError(f"cannot resume from {path}: the dataset changed since it was saved ({changes}); point "
                        f"data.shards at the data it was trained on, pass train.allow_new_data=true to continue on "
                        f"this data (best/ is then chosen anew), or start a new run (train.name=...)")
    say(f"train.allow_new_data=true: continuing on changed data ({changes}); best IoU tracking restarts: the next "
        f"evaluation replaces best/")
    return True


def scored_at(cfg: Config) -> str:
    """Which score picks ``best/``: network-input resolution, or full resolution with its TTA."""
    return f"full_res+{cfg.train.eval_tta}" if cfg.train.eval_full_res else "input"


def rescored(loop: Loop, cfg: Config, say) -> Loop:
    """A resume that changes how val is scored (``train.eval_full_res``/``eval_tta``) must not compare
    the new scores with a best from the old ones: the next evaluation replaces ``best/``."""
    if not loop.best_at or loop.best_at == scored_at(cfg) or loop.best_iou < 0:
        return loop
    say(f"best/ was scored {loop.best_at} (IoU {loop.best_iou:.4f}) and this run scores {scored_at(cfg)}; "
        f"the next evaluation replaces best/ and is compared from there on")
    return dataclasses.replace(loop, best_iou=-1.0, best_at=scored_at(cfg))


def as_loop(saved: dict, path: Path) -> Loop:
    """State ``path``'s saved ``loop.json`` as a :class:`Loop`; other keys mean a foreign or damaged state."""
    try:
        return Loop(**saved)
    except TypeError as e:
        raise DamagedState(f"state {path} is damaged: loop.json does not hold a training position ({e})") from None


def elastic(saved: Loop, plan: dict, path: Path, print_fn) -> Loop:
    """Continue ``saved`` under ``plan``. The seed and sample-order version must match; other
    processes, workers or batch size are fine: the interrupted epoch's rest becomes a carry."""
    fixed = {k: (saved.plan.get(k), plan[k]) for k in ("seed", "stream") if saved.plan.get(k) != plan[k]}
    if fixed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in fixed.items())
        raise UserError(f"cannot resume from {path}: the sample order changed ({what}); resume with the same "
                        f"train.seed, or start a new run (train.name=...)")
    changed = {k: (saved.plan.get(k), v) for k, v in plan.items() if saved.plan.get(k) != v}
    if not changed:
        return saved
    print_fn("resuming with " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) +
             " (the learning-rate schedule keeps its step count; its length follows the new steps per epoch)")
    carry = list(saved.carry)
    if saved.batch and any(k in changed for k in PLAN_KEYS):
        carry.append({"plan": {k: saved.plan[k] for k in PLAN_KEYS}, "batch": saved.batch})
        return dataclasses.replace(saved, plan=plan, carry=carry, batch=0)
    return dataclasses.replace(saved, plan=plan)


def start_fresh(run_dir: Path, accelerator, overwrite: bool) -> None:
    """Step 0 in ``run_dir``: refused if a previous run is there, unless ``train.overwrite`` says delete it."""
    states = run_dir / "states"
    old = [p for p in (states, run_dir / "metrics.jsonl", run_dir / "overlays")
           if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    if old and not overwrite:
        newest = list_states(states)
        what = f"states up to {newest[-1].name}" if newest else ", ".join(p.name for p in old)
        raise UserError(f"{run_dir} holds a previous run ({what}); continue it with train.resume=auto, "
                        f"start over with train.overwrite=true (deletes its states and metrics), "
                        f"or choose another train.name")
    accelerator.wait_for_everyone()  # every rank has seen the old run before it goes
    if old and accelerator.is_main_process:
        accelerator.print(f"train.overwrite=true: removing the previous run's {', '.join(p.name for p in old)} "
                          f"in {run_dir}")
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    accelerator.wait_for_everyone()
