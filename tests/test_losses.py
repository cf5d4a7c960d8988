"""Losses: registry, ignore pixels contribute nothing, never NaN on an all-ignored batch, and each
loss equals its reference formula written out naively (per-pixel Python loops on tiny tensors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

from segdist import IGNORE_INDEX
from segdist.config import LossConfig, load_config
from segdist.errors import UserError
from segdist.losses import LOSSES, REGION, check_loss_config, class_weights, create_loss
from tests.conftest import CLOTHING, require_dataset

ALL = ["auto", *LOSSES]


def _batch(out_ch: int, seed: int = 0, shape=(2, 5, 6), void: float = 0.2):
    """Random logits (B, C, H, W) float32 and targets (B, H, W) int64 with ~``void`` of the pixels ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], out_ch, *shape[1:], generator=g) * 2
    target = torch.randint(0, max(out_ch, 2), shape, generator=g)
    target[torch.rand(shape, generator=g) < void] = IGNORE_INDEX
    return logits, target


def _pixels(logits: torch.Tensor, target: torch.Tensor):
    """(logit vector as floats, label) of every valid pixel, in row-major order."""
    b, _, h, w = logits.shape
    return [([float(v) for v in logits[n, :, i, j]], int(target[n, i, j]))
            for n in range(b) for i in range(h) for j in range(w) if target[n, i, j] != IGNORE_INDEX]


def _p_true(z: list[float], y: int) -> float:
    """Probability of class ``y``: softmax, or sigmoid for one logit (``y`` 1 = foreground)."""
    if len(z) == 1:
        p1 = 1 / (1 + math.exp(-z[0]))
        return p1 if y == 1 else 1 - p1
    return math.exp(z[y]) / sum(math.exp(v) for v in z)


def _ref_focal(logits, target, gamma: float, w=None) -> float:
    """sum_i w_yi (1 - p_i)^gamma (-log p_i) / sum_i w_yi over valid pixels (Lin et al. 2017, alpha_t = w_y)."""
    num = den = 0.0
    for z, y in _pixels(logits, target):
        p, wy = _p_true(z, y), 1.0 if w is None else float(w[y])
        num += wy * (1 - p) ** gamma * -math.log(p)
        den += wy
    return num / den if den else 0.0


def _ref_ohem(logits, target, keep: float, w=None) -> float:
    """The ceil(keep * n) valid pixels with the highest CE, their weighted mean."""
    losses = sorted(((-math.log(_p_true(z, y)), y) for z, y in _pixels(logits, target)), reverse=True)
    kept = losses[:math.ceil(keep * len(losses))]
    ws = [1.0 if w is None else float(w[y]) for _, y in kept]
    return sum(wy * loss for wy, (loss, _) in zip(ws, kept)) / sum(ws) if kept else 0.0


def _jaccard_loss(gt: list[int], mistakes: set[int]) -> float:
    """Jaccard loss of predicting class c when the pixels in ``mistakes`` are wrong: 1 - |G \\ M| / |G u M|."""
    g = {i for i, v in enumerate(gt) if v}
    return 1 - len(g - mistakes) / len(g | mistakes)


def _ref_lovasz(logits, target) -> float:
    """Berman et al. 2018 from the definition: sort the errors, weigh each by the Jaccard loss's increase
    when its pixel joins the mistakes; mean over the classes present (hinge on the logit for one channel)."""
    pix = _pixels(logits, target)
    c = logits.shape[1]
    losses = []
    for cls in [1] if c == 1 else range(c):
        gt = [int(y == cls) for _, y in pix]
        if c > 1 and not any(gt):
            continue
        if c == 1:
            errors = [max(0.0, 1 - z[0] * (2 * g - 1)) for (z, _), g in zip(pix, gt)]
        else:
            errors = [abs(g - _p_true(z, cls)) for (z, _), g in zip(pix, gt)]
        order = sorted(range(len(pix)), key=lambda i: -errors[i])
        total, prev, mistakes = 0.0, 0.0, set()
        for i in order:
            mistakes.add(i)
            now = _jaccard_loss(gt, mistakes)
            total += errors[i] * (now - prev)
            prev = now
        losses.append(total)
    return sum(losses) / len(losses) if losses else 0.0


# ----------------------------------------------------------------------------- every loss
@pytest.mark.parametrize("out_ch", [1, 4])
@pytest.mark.parametrize("name", ALL)
def test_losses_finite_and_ignore_aware(out_ch, name):
    loss = create_loss(LossConfig(name=name), out_ch)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, out_ch, 8, 8, generator=g, requires_grad=True)
    target = torch.randint(0, max(out_ch, 2), (2, 8, 8), generator=g)
    target[:, :2] = 255
    value = loss(logits, target)
    assert torch.isfinite(value)
    value.backward()
    assert logits.grad[:, :, :2].abs().sum() == 0  # ignored pixels get no gradient
    all_void = torch.full((2, 8, 8), 255)
    assert torch.isfinite(loss(logits, all_void))


@pytest.mark.parametrize("out_ch", [1, 3])
@pytest.mark.parametrize("name", ALL)
def test_all_ignored_batch_is_zero_with_zero_gradient(out_ch, name):
    w = None if name in REGION else torch.tensor([0.5, 2.0, 1.0][:max(out_ch, 2)])
    loss = create_loss(LossConfig(name=name), out_ch, w)
    logits = torch.randn(2, out_ch, 4, 4, requires_grad=True)
    value = loss(logits, torch.full((2, 4, 4), IGNORE_INDEX))
    assert value.item() == 0
    value.backward()
    assert logits.grad is None or logits.grad.abs().sum() == 0


def test_unknown_loss():
    with pytest.raises(UserError, match="config key 'loss.name' must be one of auto, dice_bce, .*; got 'tversky'"):
        create_loss(LossConfig(name="tversky"), 1)


# ----------------------------------------------------------------------------- reference formulas
@pytest.mark.parametrize("out_ch", [1, 4])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_equals_the_formula(out_ch, weighted, gamma):
    logits, target = _batch(out_ch, seed=1)
    w = torch.tensor([0.3, 1.7, 0.0, 2.5][:max(out_ch, 2)]) if weighted else None
    got = create_loss(LossConfig(name="focal", focal_gamma=gamma), out_ch, w)(logits, target)
    assert got.item() == pytest.approx(_ref_focal(logits, target, gamma, w), rel=1e-5)


@pytest.mark.parametrize("out_ch", [1, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_ce_is_focal_with_gamma_0_and_matches_torch(out_ch, weighted):
    logits, target = _batch(out_ch, seed=2)
    w = torch.tensor([0.3, 1.7, 0.9, 2.5][:max(out_ch, 2)]) if weighted else None
    got = create_loss(LossConfig(name="ce"), out_ch, w)(logits, target)
    assert got.item() == pytest.approx(_ref_focal(logits, target, 0.0, w), rel=1e-5)
    if out_ch > 1:  # PyTorch's own weighted mean, where it is defined
        ref = torch.nn.functional.cross_entropy(logits, target, weight=w, ignore_index=IGNORE_INDEX)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("out_ch", [1, 4])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("keep", [0.1, 0.25, 0.7, 1.0])
def test_ohem_ce_equals_the_formula(out_ch, weighted, keep):
    logits, target = _batch(out_ch, seed=3)
    w = torch.tensor([0.3, 1.7, 0.9, 2.5][:max(out_ch, 2)]) if weighted else None
    got = create_loss(LossConfig(name="ohem_ce", ohem_keep=keep), out_ch, w)(logits, target)
    assert got.item() == pytest.approx(_ref_ohem(logits, target, keep, w), rel=1e-5)


def test_ohem_keeps_the_hardest_pixels_only():
    logits, target = _batch(4, seed=4)
    value = create_loss(LossConfig(name="ohem_ce", ohem_keep=0.25), 4)(logits.requires_grad_(), target)
    value.backward()
    valid = int((target != IGNORE_INDEX).sum())
    touched = int((logits.grad.abs().sum(1) > 0).sum())
    assert touched == math.ceil(0.25 * valid)


@pytest.mark.parametrize("out_ch", [1, 2, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lovasz_equals_the_definition_and_smp(out_ch, seed):
    logits, target = _batch(out_ch, seed=seed)
    if out_ch == 5:
        target[target == 3] = 0  # a class absent from the batch: left out of the mean
    got = create_loss(LossConfig(name="lovasz"), out_ch)(logits, target)
    assert got.item() == pytest.approx(_ref_lovasz(logits, target), rel=1e-5, abs=1e-6)
    smp_loss = smp.losses.LovaszLoss("binary" if out_ch == 1 else "multiclass", per_image=False,
                                     ignore_index=IGNORE_INDEX)
    assert got.item() == pytest.approx(smp_loss(logits, target).item(), rel=1e-5, abs=1e-6)


def test_lovasz_gradient_equals_smp_and_chunking_changes_nothing():
    from segdist.losses import Lovasz

    logits, target = _batch(7, seed=5, shape=(2, 9, 11))
    grads = []
    for loss in (Lovasz(), Lovasz(chunk_elements=400),  # 400 / 198 pixels: 2 classes per sort
                 smp.losses.LovaszLoss("multiclass", ignore_index=IGNORE_INDEX)):
        x = logits.clone().requires_grad_()
        loss(x, target).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[2], rtol=1e-4, atol=1e-6)


def _ref_dice(logits, target) -> float:
    """1 - 2 sum_i p_ic y_ic / sum_i (p_ic + y_ic) per class over the valid pixels; absent classes 0; mean over C."""
    pix = _pixels(logits, target)
    c = logits.shape[1]
    losses = []
    for cls in range(c):
        p = [_p_true(z, cls) for z, _ in pix]
        g = [int(y == cls) for _, y in pix]
        if not any(g):
            losses.append(0.0)
            continue
        losses.append(1 - 2 * sum(pi * gi for pi, gi in zip(p, g)) / sum(pi + gi for pi, gi in zip(p, g)))
    return sum(losses) / c


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_dice_equals_the_formula_and_smp_with_its_gradient(seed):
    logits, target = _batch(6, seed=seed, shape=(2, 7, 9))
    target[target == 4] = 0  # a class absent from the batch: counts 0 in the mean over all classes
    x = logits.clone().requires_grad_()
    got = create_loss(LossConfig(name="dice"), 6)(x, target)
    assert got.item() == pytest.approx(_ref_dice(logits, target), rel=1e-5)
    got.backward()
    ref_x = logits.clone().requires_grad_()
    ref = smp.losses.DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE_INDEX)(ref_x, target)
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-7)
    ignored = target == IGNORE_INDEX
    assert ignored.any() and (x.grad.movedim(1, -1)[ignored] == 0).all()


def test_lovasz_on_present_classes_only_equals_the_masked_sort():
    from segdist.losses import Lovasz

    logits, target = _batch(9, seed=7, shape=(2, 8, 10))
    target[(target == 2) | (target == 5)] = 1  # two classes absent
    out = []
    for loss in (Lovasz(present_only=True), Lovasz(present_only=False)):
        x = logits.clone().requires_grad_()
        value = loss(x, target)
        value.backward()
        out.append((value, x.grad))
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])


def test_sums_weigh_region_and_pixel_terms():
    logits, target = _batch(3, seed=6)
    cfg = LossConfig(name="lovasz_ce", dice_weight=0.3, ce_weight=2.0)
    want = 0.3 * _ref_lovasz(logits, target) + 2.0 * _ref_focal(logits, target, 0.0)
    assert create_loss(cfg, 3)(logits, target).item() == pytest.approx(want, rel=1e-5)
    cfg = LossConfig(name="dice_focal", dice_weight=0.0, ce_weight=1.0, focal_gamma=1.5)
    assert create_loss(cfg, 3)(logits, target).item() == pytest.approx(_ref_focal(logits, target, 1.5), rel=1e-5)


def test_weights_follow_the_logits_to_their_device_and_dtype():
    logits, target = _batch(3, seed=7)
    loss = create_loss(LossConfig(name="ce"), 3, torch.tensor([1.0, 2.0, 3.0]))
    assert loss(logits.to(torch.bfloat16), target).dtype == torch.float32  # computed in float32


# ----------------------------------------------------------------------------- class weights
MANIFEST = {"splits": {"train": {"class_pixels": [600, 0, 100, 300]}, "val": {"class_pixels": [1, 1, 1, 1]}}}


def test_median_frequency_weights_by_hand():
    # f = [0.6, -, 0.1, 0.3]; median over present classes 0.3 -> 0.3 / f; absent class 1 -> 0
    w = class_weights(MANIFEST, "median_freq")
    assert w.dtype == torch.float32 and w.shape == (4,)
    np.testing.assert_allclose(w.numpy(), [0.5, 0.0, 3.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(class_weights(MANIFEST, "median_freq", split="val").numpy(), [1, 1, 1, 1])


def test_inverse_sqrt_weights_by_hand():
    raw = [1 / math.sqrt(0.6), 1 / math.sqrt(0.1), 1 / math.sqrt(0.3)]
    mean = sum(raw) / 3
    w = class_weights(MANIFEST, "inv_sqrt")
    np.testing.assert_allclose(w.numpy(), [raw[0] / mean, 0.0, raw[1] / mean, raw[2] / mean], rtol=1e-6)
    assert w[w > 0].mean().item() == pytest.approx(1.0)


def test_median_of_an_even_number_of_classes():
    w = class_weights({"splits": {"train": {"class_pixels": [10, 30, 40, 20]}}}, "median_freq")
    np.testing.assert_allclose(w.numpy(), [2.5, 25 / 30, 25 / 40, 1.25], rtol=1e-6)  # median f = 0.25


def test_no_weights_and_bad_manifests():
    assert class_weights(None, "none") is None
    with pytest.raises(UserError, match="manifest"):
        class_weights(None, "median_freq")
    with pytest.raises(UserError, match="rebuild"):
        class_weights({"splits": {"train": {"samples": 3}}}, "inv_sqrt")
    with pytest.raises(UserError, match="no labelled pixels"):
        class_weights({"splits": {"train": {"class_pixels": [0, 0]}}}, "inv_sqrt")
    with pytest.raises(UserError, match="median_freq"):
        class_weights(MANIFEST, "median")


def test_weights_are_refused_where_they_would_do_nothing_or_do_not_fit():
    w = torch.ones(4)
    with pytest.raises(UserError, match="takes no class weights"):
        create_loss(LossConfig(name="lovasz"), 4, w)
    with pytest.raises(UserError, match="4 class weights"):
        create_loss(LossConfig(name="ce"), 3, w)
    create_loss(LossConfig(name="dice_bce"), 1, torch.ones(2))  # binary: background and foreground weights


def test_config_validates_the_new_keys():
    cfg = load_config(None, ["loss.name=dice_focal", "loss.class_weights=inv_sqrt", "focal_gamma=1", "ohem_keep=0.5"])
    assert (cfg.loss.class_weights, cfg.loss.focal_gamma, cfg.loss.ohem_keep) == ("inv_sqrt", 1.0, 0.5)
    with pytest.raises(UserError, match="none, median_freq, inv_sqrt"):
        check_loss_config(load_config(None, ["loss.class_weights=balanced"]).loss)
    with pytest.raises(UserError, match="loss.ohem_keep' must be in"):
        load_config(None, ["loss.ohem_keep=0"])
    with pytest.raises(UserError, match="loss.focal_gamma' must be in"):
        load_config(None, ["loss.focal_gamma=-1"])


@pytest.mark.slow
def test_class_weights_from_a_real_built_manifest(tmp_path):
    """clothing-parsing (59 classes, 4 never occur): weights from the manifest equal the numbers
    computed from the masks' pixels directly; absent classes get 0."""
    from PIL import Image

    from segdist.shards import build_shards, read_manifest

    src = require_dataset(CLOTHING)
    names = sorted(p.stem for p in (src / "masks").glob("*.png"))[:40]
    for sub in ("photos", "masks"):
        (tmp_path / sub).mkdir()
        for n in names:
            ext = ".jpg" if sub == "photos" else ".png"
            (tmp_path / sub / f"{n}{ext}").symlink_to(src / sub / f"{n}{ext}")
    out = tmp_path / "shards"
    build_shards(None, out, images=tmp_path / "photos", masks=tmp_path / "masks", classes=src / "classes.json",
                 val_fraction=0.0, workers=1, progress=False)
    counts = np.zeros(59)
    for n in names:
        counts += np.bincount(np.asarray(Image.open(src / "masks" / f"{n}.png")).ravel(), minlength=59)[:59]
    f = counts / counts.sum()
    present = f > 0
    want = np.zeros(59)
    want[present] = np.median(f[present]) / f[present]
    w = class_weights(read_manifest(out), "median_freq")
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-5)
    assert (w == 0).sum() == (~present).sum() >= 4
