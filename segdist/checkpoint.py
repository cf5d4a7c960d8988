"""Checkpoints: resumable training states and SMP ``save_pretrained`` model folders.

* ``runs/<name>/states/step-00000123/``: ``accelerator.save_state`` (model, optimiser,
  scheduler, scaler, per-rank RNG) plus ``loop.json`` (epoch, batch position, step, best
  metric). Written to ``.tmp-step-*`` and renamed, so a killed job leaves a hidden torn folder
  that ``--resume auto`` skips and reports, never a half-written state under a real name.
* ``runs/<name>/best/`` and ``last/``: the model in SMP format (``config.json`` +
  ``model.safetensors``), loadable with ``smp.from_pretrained``, plus ``segdist.json`` (what
  inference needs: image size, normalisation, class names).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import safetensors.torch

from .atomic import atomic_dir, atomic_write_text
from .errors import UserError

STATE_RE = re.compile(r"^step-(\d{8})$")
LOOP_FILE = "loop.json"
META_FILE = "segdist.json"


def save_state(accelerator, states_dir: Path, step: int, loop: dict, keep_last: int,
               extras: dict | None = None) -> Path:
    """All ranks call this together (save_state writes per-rank RNG files).

    ``extras`` (name -> module, e.g. the EMA model) go to ``<name>.safetensors``: accelerate's
    ``register_for_checkpointing`` would pickle them and load with ``weights_only=False``.
    """
    final = states_dir / f"step-{step:08d}"
    tmp = states_dir / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, module in (extras or {}).items():
            safetensors.torch.save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                                        str(tmp / f"{name}.safetensors"))
        atomic_write_text(tmp / LOOP_FILE, json.dumps(loop, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_states(states_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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


def find_resume(spec: str, states_dir: Path) -> Path | None:
    """``auto`` -> newest complete state (None if there is none); a path -> that state."""
    if not spec:
        return None
    if spec == "auto":
        states = list_states(states_dir)
        return states[-1] if states else None
    path = Path(spec)
    if not (path / LOOP_FILE).is_file():
        raise UserError(f"train.resume '{spec}' is not a complete state folder (no {LOOP_FILE}); "
                        f"use train.resume=auto or a folder under {states_dir}")
    return path


def load_state(accelerator, path: Path, extras: dict | None = None) -> dict:
    accelerator.load_state(str(path))  # torch.load(weights_only=True) inside, safetensors for models
    for name, module in (extras or {}).items():
        module.load_state_dict(safetensors.torch.load_file(str(path / f"{name}.safetensors"),
                                                           device=str(accelerator.device)))
    return json.loads((path / LOOP_FILE).read_text())


def save_model(model, out: Path, meta: dict) -> None:
    """SMP ``save_pretrained`` + ``segdist.json``, swapped into ``out`` atomically (main process only)."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1))


def read_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"'{ckpt_dir}' is not a segdist model folder (no {META_FILE}); "
                        f"pass runs/<name>/best or runs/<name>/last")
    return json.loads(path.read_text())
