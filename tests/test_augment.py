"""DeviceAugment: image and mask stay aligned, masks keep their ids, eval is plain normalisation.

The alignment tests use synthetic batches whose mask is a pure function of the image (one
distinct colour per class id), so after any geometric augmentation the class can be read
back from the image and compared with the augmented mask pixel by pixel.
"""

from __future__ import annotations

import dataclasses

import kornia.augmentation as K
import pytest
import torch
import torch.nn.functional as F

from segdist import IGNORE_INDEX
from segdist.augment import DeviceAugment, build_ops, normalize
from segdist.config import AugmentConfig
from segdist.errors import UserError


def denormalize(image: torch.Tensor, mean, std) -> torch.Tensor:
    """Inverse of ``normalize``: float (B, C, H, W) or (C, H, W) -> uint8 [0, 255]."""
    shape = (-1, 1, 1)
    m, s = torch.tensor(mean).view(shape).to(image.device), torch.tensor(std).view(shape).to(image.device)
    return (image.float() * s + m).clamp_(0, 1).mul_(255).round_().to(torch.uint8)


# Sparse ids on purpose: a blended (bilinear) mask would produce values outside this set.
PALETTE = {0: (128, 128, 128), 3: (230, 30, 30), 17: (30, 200, 40), 42: (40, 60, 220),
           255: (240, 220, 20)}
PAD_RGB = (0, 0, 0)  # what zero padding looks like after denormalisation; reads as IGNORE_INDEX

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]

GEOMETRY_ONLY = AugmentConfig(hflip=0.5, vflip=0.5, crop_scale=[0.3, 1.0], crop_p=1.0, rotate=30.0, affine_p=1.0,
                              color_jitter=0.0, blur_p=0.0, noise_p=0.0)
ALL_OPS = dataclasses.replace(GEOMETRY_ONLY, color_jitter=0.4, color_p=1.0, blur_p=1.0, noise_p=1.0)


def palette_batch(b: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rectangles and ellipses of each class on a background: (B,3,H,W) uint8, (B,H,W) uint8."""
    g = torch.Generator().manual_seed(seed)
    ids = list(PALETTE)
    mask = torch.zeros(b, h, w, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    for i in range(b):
        for shape in range(8):
            cy, cx = torch.rand(2, generator=g) * torch.tensor([h, w])
            ry, rx = (0.08 + 0.2 * torch.rand(2, generator=g)) * torch.tensor([h, w])
            if shape % 2:
                region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                region = ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx)
            mask[i][region] = ids[1 + int(torch.randint(len(ids) - 1, (1,), generator=g))]
    lut = torch.zeros(256, 3, dtype=torch.uint8)
    for cls, rgb in PALETTE.items():
        lut[cls] = torch.tensor(rgb, dtype=torch.uint8)
    image = lut[mask.long()].permute(0, 3, 1, 2).contiguous()
    return image, mask


def labels_from_image(image: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Read the class back from an augmented (normalised) image: nearest palette colour, padding -> 255."""
    rgb = denormalize(image, cfg.mean, cfg.std).float().cpu()  # (B,3,H,W)
    colours = torch.tensor([*PALETTE.values(), PAD_RGB], dtype=torch.float32)  # (K,3)
    classes = torch.tensor([*PALETTE.keys(), IGNORE_INDEX])
    dist = ((rgb[:, None] - colours[None, :, :, None, None]) ** 2).sum(2)  # (B,K,H,W)
    return classes[dist.argmin(1)]


def interior(labels: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """True where the (2r+1)^2 neighbourhood holds one label: away from interpolation borders."""
    x = labels.float()[:, None]
    k = 2 * radius + 1
    hi = F.max_pool2d(x, k, stride=1, padding=radius)
    lo = -F.max_pool2d(-x, k, stride=1, padding=radius)
    return (hi == lo)[:, 0]


def agreement(image: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig) -> float:
    """Share of interior pixels where the image's colour class equals the mask (both-255 pixels excluded)."""
    labels, mask = labels_from_image(image, cfg), mask.cpu()
    keep = interior(labels) & ~((labels == IGNORE_INDEX) & (mask == IGNORE_INDEX))
    return (labels == mask)[keep].float().mean().item()


def run(cfg: AugmentConfig, image, mask, seed: int, device: str = "cpu", train: bool = True):
    torch.manual_seed(seed)
    return DeviceAugment(cfg, train=train)(image.to(device), mask.to(device))


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_geometry_keeps_image_and_mask_aligned(device):
    image, mask = palette_batch(8, 128, 128, seed=1)
    assert agreement(normalize(image, GEOMETRY_ONLY.mean, GEOMETRY_ONLY.std), mask, GEOMETRY_ONLY) == 1.0
    for seed in range(3):
        out_img, out_mask = run(GEOMETRY_ONLY, image, mask, seed, device)
        # the augmentation really moved things, and it padded (rotation with affine_p=1)
        assert (out_mask.cpu() != mask.long()).float().mean() > 0.2
        assert (out_mask == IGNORE_INDEX).any()
        assert set(out_mask.unique().tolist()) <= set(PALETTE) | {IGNORE_INDEX}
        assert agreement(out_img, out_mask, GEOMETRY_ONLY) >= 0.995, f"seed {seed}"


@pytest.mark.parametrize("device", DEVICES)
def test_colour_blur_noise_never_touch_the_mask(device):
    image, mask = palette_batch(8, 96, 96, seed=2)
    geo_img, geo_mask = run(GEOMETRY_ONLY, image, mask, seed=7, device=device)
    all_img, all_mask = run(ALL_OPS, image, mask, seed=7, device=device)
    # geometry draws come first, so the same seed gives the same warp; colour ops must leave it alone
    assert torch.equal(geo_mask, all_mask)
    assert (all_img - geo_img).abs().mean() > 0.05  # the photometric ops did run on the image


def test_strong_rotation_pads_with_ignore_and_keeps_void():
    cfg = AugmentConfig(hflip=0.0, crop_p=0.0, rotate=45.0, affine_p=1.0, color_jitter=0.0)
    image, mask = palette_batch(6, 64, 64, seed=3)
    mask[:, 28:36, 28:36] = 255  # void in the centre, which a rotation about the centre keeps
    image[:, :, 28:36, 28:36] = torch.tensor(PALETTE[255], dtype=torch.uint8)[:, None, None]
    aug = DeviceAugment(cfg, train=True)
    torch.manual_seed(0)
    out_img, out_mask = aug(image, mask)
    # angles are uniform in [-45, 45]; a near-zero one leaves the corners inside the source
    (step,) = aug.pipeline(3, 64, 64)._params
    strong = step.data["angle"].abs() > 5
    assert strong.sum() >= 3
    corners = out_mask[strong][:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == IGNORE_INDEX).all()
    pad_value = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), cfg.mean, cfg.std)[0, :, 0, 0]
    assert torch.allclose(out_img[strong][:, :, 0, 0], pad_value.expand(int(strong.sum()), 3), atol=1e-5)
    # the void block stays void, and the image there is the void colour, not padding black
    assert (out_mask[:, 30:34, 30:34] == IGNORE_INDEX).all()
    centre = denormalize(out_img[:, :, 30:34, 30:34], cfg.mean, cfg.std)
    assert (centre == torch.tensor(PALETTE[255], dtype=torch.uint8)[:, None, None]).all()
    assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist()) | {IGNORE_INDEX}


def test_mask_values_stay_a_subset_with_every_op():
    image, mask = palette_batch(6, 80, 80, seed=4)
    for seed in range(3):
        _, out_mask = run(ALL_OPS, image, mask, seed)
        assert out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist()) | {IGNORE_INDEX}


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_dtypes(channels):
    image = torch.randint(0, 256, (4, channels, 64, 96), dtype=torch.uint8)
    mask = torch.randint(0, 5, (4, 64, 96), dtype=torch.uint8)
    for train in (True, False):
        out_img, out_mask = run(ALL_OPS, image, mask, seed=0, train=train)
        assert out_img.shape == (4, channels, 64, 96) and out_img.dtype == torch.float32
        assert out_mask.shape == (4, 64, 96) and out_mask.dtype == torch.int64
        assert torch.isfinite(out_img).all()


def test_eval_is_deterministic_plain_normalisation():
    cfg = ALL_OPS
    image, mask = palette_batch(4, 64, 64, seed=5)
    expected = normalize(image, cfg.mean, cfg.std)
    manual = (image.float() / 255 - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]
    assert torch.allclose(expected, manual, atol=1e-6)
    out_a = run(cfg, image, mask, seed=0, train=False)
    out_b = run(cfg, image, mask, seed=1, train=False)
    disabled = run(dataclasses.replace(cfg, enabled=False), image, mask, seed=2, train=True)
    in_eval_mode = DeviceAugment(cfg, train=True).eval()(image, mask)
    for img, msk in (out_a, out_b, disabled, in_eval_mode):
        assert torch.equal(img, expected)
        assert torch.equal(msk, mask.long())


def test_disabled_ops_are_left_out_of_the_pipeline():
    none = AugmentConfig(hflip=0.0, crop_scale=[1.0, 1.0], color_jitter=0.0)
    assert build_ops(none, 3, (64, 64)) == []
    assert DeviceAugment(none, train=True).pipeline(3, 64, 64) is None
    image, mask = palette_batch(2, 64, 64)
    img, msk = run(none, image, mask, seed=0)
    assert torch.equal(img, normalize(image, none.mean, none.std)) and torch.equal(msk, mask.long())

    kinds = [type(op) for op in build_ops(AugmentConfig(), 3, (64, 64))]
    assert kinds == [K.RandomResizedCrop, K.RandomHorizontalFlip, K.ColorJitter]
    kinds = [type(op) for op in build_ops(dataclasses.replace(ALL_OPS, rotate=0.0), 3, (64, 64))]
    assert K.RandomAffine not in kinds and K.RandomGaussianBlur in kinds and K.RandomGaussianNoise in kinds


def test_autocast_keeps_augmentation_in_float32():
    image, mask = palette_batch(2, 64, 64, seed=6)
    ref_img, ref_mask = run(ALL_OPS, image, mask, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img, msk = run(ALL_OPS, image, mask, seed=3)
    assert img.dtype == torch.float32
    assert torch.equal(img, ref_img) and torch.equal(msk, ref_mask)


def test_normalize_roundtrip_and_grayscale_stats():
    image = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    cfg = AugmentConfig()
    assert torch.equal(denormalize(normalize(image, cfg.mean, cfg.std), cfg.mean, cfg.std), image)
    assert torch.equal(denormalize(normalize(image[0], cfg.mean, cfg.std), cfg.mean, cfg.std), image[0])
    gray = normalize(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8), cfg.mean, cfg.std)
    assert torch.allclose(gray, torch.tensor((1 - sum(cfg.mean) / 3) / (sum(cfg.std) / 3)))


def test_bad_config_values_raise_user_errors():
    with pytest.raises(UserError, match="augment.hflip"):
        DeviceAugment(AugmentConfig(hflip=1.5), train=True)
    with pytest.raises(UserError, match="augment.color_jitter"):
        DeviceAugment(AugmentConfig(color_jitter=2.5), train=True)
    with pytest.raises(UserError, match="augment.mean"):
        DeviceAugment(AugmentConfig(mean=[0.5, 0.5], std=[0.2, 0.2]), train=False)(
            torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1, 4, 4, dtype=torch.uint8))
