"""On-device augmentation: the uint8 batch from the loader in, a normalised float batch out.

:class:`DeviceAugment` runs on the accelerator right after the batch is moved there, so the
data workers only decode. One Kornia ``AugmentationSequential`` holds every enabled op and
draws one set of parameters per sample, applied to image and mask alike:

    geometric (image + mask):   RandomResizedCrop -> flips -> RandomAffine (rotation)
    photometric (image only):   ColorJitter -> GaussianBlur -> GaussianNoise

Masks are resampled with nearest neighbour, so class ids are never blended. Pixels that a
rotation pulls in from outside the source get :data:`segdist.IGNORE_INDEX`: the mask is shifted
by +1 before the warp, so the warp's zero padding is the only 0 left, then 0 -> 255 and every
other value -1 (original void 255 -> 256 -> 255).

``normalize`` is the same maths inference uses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import kornia.augmentation as K
import torch

from .shards import IGNORE_INDEX
from .config import AugmentConfig, validate_section
from .errors import UserError

NOISE_STD = 0.03
"""Std of the additive Gaussian noise on the [0, 1] image (about 8/255)."""
BLUR_KERNEL = 5
BLUR_SIGMA = (0.1, 1.5)
"""Blur strength range in pixels; a 5x5 kernel covers sigma <= 1.5 well enough."""


# ------------------------------------------------------------------------------------------
# Normalisation (shared with inference)
@functools.lru_cache(maxsize=64)
def _channel_stats(values: tuple[float, ...], channels: int, device: torch.device) -> torch.Tensor:
    """``values`` as a (1, C, 1, 1) float32 tensor on ``device``.

    Cached: building it per batch would be a blocking host-to-device copy on the hot path.
    One value is broadcast to every channel; RGB stats on a grayscale (C=1) image are averaged,
    which is what an RGB-pretrained encoder sees for a gray pixel on average.
    """
    vals = list(values)
    if len(vals) == 3 and channels == 1:
        vals = [sum(vals) / 3]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise UserError(f"augment mean/std have {len(values)} values but the images have {channels} "
                        f"channels; give {channels} values (or one) in augment.mean and augment.std")
    return torch.tensor(vals, dtype=torch.float32, device=device).view(1, channels, 1, 1)


def _affine_stats(x: torch.Tensor, mean: Sequence[float],
                  std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim != 4:
        raise ValueError(f"expected an image batch (B, C, H, W) or one image (C, H, W); got {tuple(x.shape)}")
    c = x.shape[1]
    return _channel_stats(tuple(mean), c, x.device), _channel_stats(tuple(std), c, x.device)


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, C, H, W) or (C, H, W) uint8 [0, 255] (or float [0, 1]) -> float32 ``(x/255 - mean) / std``."""
    x = image.to(torch.float32)
    if image.dtype == torch.uint8:
        x = x / 255.0
    squeeze = x.ndim == 3
    m, s = _affine_stats(x[None] if squeeze else x, mean, std)
    out = (x - m) / s
    return out[0] if squeeze else out


# ------------------------------------------------------------------------------------------
# Op builders: each returns a Kornia augmentation, or None when the config disables it
# (p = 0 or strength 0), so disabled ops cost nothing per batch.
Builder = Callable[[AugmentConfig, int, tuple[int, int]], "K.AugmentationBase2D | None"]


def _resized_crop(cfg: AugmentConfig, channels: int, size: tuple[int, int]):
    lo, hi = cfg.crop_scale
    if cfg.crop_p <= 0 or lo >= 1:
        return None
    # cropping_mode="resample": one batched warp for the whole batch (Kornia's default "slice" mode
    # crops and resizes one sample at a time, so its cost grows with the batch). Image and mask go
    # through the same transform; the mask is resampled nearest. align_corners=False: the half-pixel
    # grid, as the rest of segdist's resizing uses.
    # Kornia applies this op's p per batch (all samples or none), unlike the other ops' per-sample p.
    return K.RandomResizedCrop(size, scale=(lo, hi), p=cfg.crop_p, align_corners=False, cropping_mode="resample")


def _hflip(cfg: AugmentConfig, channels: int, size: tuple[int, int]):
    return K.RandomHorizontalFlip(p=cfg.hflip) if cfg.hflip > 0 else None


def _vflip(cfg: AugmentConfig, channels: int, size: tuple[int, int]):
    return K.RandomVerticalFlip(p=cfg.vflip) if cfg.vflip > 0 else None


def _rotate(cfg: AugmentConfig, channels: int, size: tuple[int, int]):
    if cfg.rotate <= 0 or cfg.affine_p <= 0:
        return None
    # Zero padding: the shifted mask reads 0 there, which becomes IGNORE_INDEX.
    return K.RandomAffine(degrees=cfg.rotate, p=cfg.affine_p, padding_mode="zeros")


def _color_jitter(cfg: AugmentConfig, channels: int, size: tuple[int, int]):
    if cfg.color_jitter <= 0 or cfg.color_p <= 0:
        return None
    rgb = channels == 3  # saturation and hue are undefined on a single channel
    return K.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter,
                         saturation=cfg.color_jitter if rgb else 0.0,
                         hue=cfg.color_jitter / 4 if rgb else 0.0, p=cfg.color_p)


def _blur(cfg: AugmentConfig, channels: int, size: tuple[int, int]):
    return K.RandomGaussianBlur(BLUR_KERNEL, BLUR_SIGMA, p=cfg.blur_p) if cfg.blur_p > 0 else None


def _noise(cfg: AugmentConfig, channels: int, size: tuple[int, int]):
    return K.RandomGaussianNoise(std=NOISE_STD, p=cfg.noise_p) if cfg.noise_p > 0 else None


# Order matters: geometry first, so its random draws do not depend on which photometric ops are on.
OPS: dict[str, Builder] = {
    "crop": _resized_crop, "hflip": _hflip, "vflip": _vflip, "rotate": _rotate,
    "color": _color_jitter, "blur": _blur, "noise": _noise,
}


def build_ops(cfg: AugmentConfig, channels: int, size: tuple[int, int]) -> list:
    """The enabled Kornia ops for (C, H, W) batches, in application order."""
    return [op for build in OPS.values() if (op := build(cfg, channels, size)) is not None]


# ------------------------------------------------------------------------------------------
class DeviceAugment(torch.nn.Module):
    """uint8 batch -> (normalised float32 image, int64 mask), randomly augmented when training.

    forward(image (B, C, H, W) uint8, mask (B, H, W) uint8) -> (image (B, C, H, W) float32, mask (B, H, W) int64).
    H, W are kept. Mask values out are a subset of the values in plus :data:`IGNORE_INDEX` (padding).

    Random only when built with ``train=True``, ``cfg.enabled`` and the module is in training
    mode; otherwise (validation, inference) it only converts and normalises, identically on every
    rank. Randomness comes from torch's global CPU generator (Kornia draws parameters there), so
    seed each rank differently for different augmentations. Holds no per-batch state: the Kornia
    pipeline is built on first use for each (channels, height, width) and then reused.
    """

    def __init__(self, cfg: AugmentConfig, train: bool):
        super().__init__()
        validate_section(cfg)
        self.cfg = cfg
        self.random = bool(train and cfg.enabled)
        self._pipelines: dict[tuple[int, int, int], K.AugmentationSequential | None] = {}

    def pipeline(self, channels: int, height: int, width: int) -> K.AugmentationSequential | None:
        """The Kornia pipeline for this batch shape, or None when every op is disabled."""
        key = (channels, height, width)
        if key not in self._pipelines:
            ops = build_ops(self.cfg, channels, (height, width))
            self._pipelines[key] = K.AugmentationSequential(*ops, data_keys=["input", "mask"]) if ops else None
        return self._pipelines[key]

    @torch.no_grad()
    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.ndim != 4 or mask.shape != (image.shape[0], *image.shape[-2:]):
            raise ValueError(f"DeviceAugment expects image (B, C, H, W) and mask (B, H, W); "
                             f"got {tuple(image.shape)} and {tuple(mask.shape)}")
        # Interpolation and colour maths in half precision would shift colours and class borders.
        with torch.autocast(device_type=image.device.type, enabled=False):
            pipe = self.pipeline(*image.shape[1:]) if self.random and self.training else None
            if pipe is None:
                return normalize(image, self.cfg.mean, self.cfg.std), mask.to(torch.int64)
            x = image.to(torch.float32) / 255.0
            # +1 keeps 0 free for the warp's zero padding. 256 does not fit uint8, and float32 (exact
            # up to 2**24) is the dtype Kornia resamples masks in anyway.
            shifted = mask.to(torch.float32).unsqueeze(1) + 1
            x, shifted = pipe(x, shifted)
            x = x.clamp_(0, 1)  # noise may leave [0, 1]; the colour ops already clamp
            out = shifted.squeeze(1).to(torch.int64)
            out = torch.where(out == 0, IGNORE_INDEX, out - 1)
            return normalize(x, self.cfg.mean, self.cfg.std), out

    def extra_repr(self) -> str:
        names = [name for name, build in OPS.items() if build(self.cfg, 3, (32, 32)) is not None]
        return f"random={self.random}, ops={names if self.random else []}"
