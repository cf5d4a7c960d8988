"""Loss factory: ``create_loss(cfg, out_channels, class_weights)`` over a registry of losses.

Every loss takes logits (B, C, H, W) float and a target (B, H, W) int64 with
``IGNORE_INDEX`` marking void/padding pixels, which contribute nothing: no value, no gradient,
and a batch with no valid pixel gives 0, not NaN. No loss reads a tensor back to the host
(no ``.item()``, no boolean indexing), so none adds a device sync to the training step -- except
Lovász on the CPU, where a read-back costs nothing and sorting only the present classes saves seconds.

Two kinds of term, combined by the registry (``LOSSES``):

* **pixel terms** average a per-pixel loss: cross-entropy (BCE for binary), focal, OHEM CE.
  They take per-class weights (``loss.class_weights``, see :func:`class_weights`): pixel ``i``
  of class ``y_i`` counts ``w[y_i]`` times, and the mean is the *weighted* mean
  ``sum_i w[y_i] l_i / sum_i w[y_i]`` (PyTorch's ``cross_entropy(weight=...)`` rule), so only
  the ratios of the weights matter. For binary (one logit, sigmoid) the weights are the same
  two per-pixel weights ``w[0]`` (background) and ``w[1]`` (foreground): equivalent to BCE's
  ``pos_weight = w[1] / w[0]`` up to that normalisation.
* **region terms** are computed over the whole batch per class: soft Dice (SMP's values) and
  Lovász-softmax (Lovász hinge for binary). They average over classes already and take no
  class weights.

``loss.ce_weight`` scales the pixel term and ``loss.dice_weight`` the region term of a sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from .shards import IGNORE_INDEX
from .config import LossConfig
from .errors import UserError
from .registry import Registry


# ----------------------------------------------------------------------------- class weights
def _median_freq(freq: np.ndarray) -> np.ndarray:
    return np.median(freq) / freq


def _inv_sqrt(freq: np.ndarray) -> np.ndarray:
    w = 1.0 / np.sqrt(freq)
    return w / w.mean()


CLASS_WEIGHTS: Registry[Callable[[np.ndarray], np.ndarray] | None] = Registry("loss.class_weights", {
    "none": None,
    "median_freq": _median_freq,
    "inv_sqrt": _inv_sqrt,
})
"""``loss.class_weights`` schemes: frequencies of the classes present (> 0, float64) -> their weights."""


def class_weights(manifest: dict | None, scheme: str, split: str = "train") -> torch.Tensor | None:
    """Per-class loss weights (K,) float32 from a shard manifest's pixel counts; None for ``none``.

    ``f_c = n_c / sum_k n_k`` with ``n_c`` the split's pixels of class ``c``
    (``manifest["splits"][split]["class_pixels"]``, counted at the stored shard resolution;
    void pixels are not counted). Only classes present in the split (``n_c > 0``) get a weight;
    absent ones get 0 (they never occur in the split's targets).

    * ``median_freq``: ``w_c = median(f) / f_c``, the median over present classes (Eigen &
      Fergus 2015, with ``f_c`` over all of the split's pixels rather than over the images that
      contain ``c``: the manifest has no per-image counts). The median class gets 1.
    * ``inv_sqrt``: ``w_c = 1 / sqrt(f_c)``, scaled to mean 1 over present classes; a milder
      reweighting (rare classes gain the square root of what median_freq gives them).

    Raises UserError when there is no manifest (a shard pattern) or it has no pixel counts.
    """
    rule = CLASS_WEIGHTS.pick(scheme)
    if rule is None:
        return None
    if manifest is None:
        raise UserError(f"loss.class_weights={scheme} needs the pixel counts in the shards' manifest.json; point "
                        f"data.shards at the shard folder (not a pattern), or use loss.class_weights=none")
    counts = manifest.get("splits", {}).get(split, {}).get("class_pixels")
    if counts is None:
        raise UserError(f"the shard manifest has no class pixel counts for split '{split}'; rebuild the shards "
                        f"with `segdist shards build`, or use loss.class_weights=none")
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise UserError(f"split '{split}' of the shards has no labelled pixels; loss.class_weights={scheme} "
                        f"cannot weight its classes")
    weights = np.zeros_like(counts)
    weights[present] = rule(counts[present] / counts.sum())
    return torch.from_numpy(weights).float()


class _Weighted(nn.Module):
    """Base of the pixel terms: holds the class weights (K,) float32 or None, moved once to the logits' device."""

    def __init__(self, weights: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weights", None if weights is None else weights.detach().float().clone())

    def pixel_weights(self, target: torch.Tensor, valid: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B, H, W) float32: ``w[target]`` on valid pixels (1 without class weights), 0 on ignored ones."""
        if self.weights is None:
            return valid.float()
        if self.weights.device != device:  # once: the loss is built on the CPU, the logits live on the device
            self.weights = self.weights.to(device)
        return self.weights[torch.where(valid, target, 0)] * valid


def _weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * l) / sum(w)``; 0 when every weight is 0 (no valid pixel), without a host sync."""
    den = weights.sum()
    return (losses * weights).sum() / torch.where(den > 0, den, torch.ones_like(den))


def _per_class_sum(labels: torch.Tensor, values: torch.Tensor, c: int) -> torch.Tensor:
    """(C,) sums of float ``values`` grouped by int64 ``labels`` in [0, C) (any equal shapes); differentiable
    in ``values``. Ignored pixels must carry a valid label (e.g. 0) and a value of 0."""
    return torch.zeros(c, dtype=values.dtype, device=values.device).index_add(0, labels.flatten(), values.flatten())


def _log_p_true(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float32 log-probability of each pixel's true class (0 on ignored pixels).

    Binary (C = 1): ``log sigmoid(x)`` for foreground, ``log sigmoid(-x)`` for background.
    Multi-class: ``log_softmax`` at the target class.
    """
    logits = logits.float()
    safe = torch.where(valid, target, 0)
    if logits.shape[1] == 1:
        x = logits[:, 0]
        return F.logsigmoid(torch.where(safe == 1, x, -x)) * valid
    return logits.log_softmax(1).gather(1, safe.unsqueeze(1))[:, 0] * valid


class CE(_Weighted):
    """Cross-entropy (BCE on one logit), weighted mean over valid pixels."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != IGNORE_INDEX
        return _weighted_mean(-_log_p_true(logits, target, valid), self.pixel_weights(target, valid, logits.device))


class Focal(_Weighted):
    """Focal loss (Lin et al. 2017): ``-(1 - p_t)^gamma log p_t`` per pixel, weighted mean over valid pixels.

    ``p_t`` is the probability of the true class (softmax; sigmoid for one logit); class weights
    play the role of the paper's ``alpha_t``. ``gamma = 0`` is cross-entropy.
    """

    def __init__(self, gamma: float, weights: torch.Tensor | None = None):
        super().__init__(weights)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != IGNORE_INDEX
        log_p = _log_p_true(logits, target, valid)
        # 1 - p_t via expm1 (exact for p_t near 1); the floor keeps the gradient of x**gamma finite at 0 for gamma < 1.
        modulator = (-torch.expm1(log_p)).clamp_min(1e-12) ** self.gamma
        return _weighted_mean(-modulator * log_p, self.pixel_weights(target, valid, logits.device))


class OhemCE(_Weighted):
    """Online hard example mining CE: the mean over the ``keep`` fraction of valid pixels with the highest loss.

    Per batch: ``k = ceil(keep * valid pixels)`` pixels with the largest (unweighted) CE are kept,
    then their weighted mean is taken. ``keep = 1`` is CE. Sync-free: the top ``ceil(keep * B*H*W)``
    losses are taken (a bound known on the host), and ranks beyond ``k`` are masked.
    """

    def __init__(self, keep: float, weights: torch.Tensor | None = None):
        super().__init__(weights)
        self.keep = keep

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != IGNORE_INDEX
        loss = -_log_p_true(logits, target, valid)
        weights = self.pixel_weights(target, valid, logits.device)
        ranked = torch.where(valid, loss, -1.0).flatten()  # CE >= 0: ignored pixels rank last
        top, idx = ranked.topk(max(1, math.ceil(self.keep * ranked.numel())))
        k = torch.ceil(self.keep * valid.sum())
        kept = torch.arange(top.numel(), device=top.device) < k
        return _weighted_mean(top.clamp_min(0), weights.flatten()[idx] * kept)


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """(P, C) gradient of the Lovász extension of the Jaccard loss w.r.t. errors sorted descending
    (Berman et al. 2018, Alg. 1), for each column ``gt_sorted[:, c]`` (float {0, 1}) at once."""
    gts = gt_sorted.sum(0, keepdim=True)
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], 0)


def _lovasz_sorted(errors: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """(C,) ``dot(errors sorted descending, lovasz_grad)`` for each column of (P, C) ``errors``/``fg``.

    Ignored pixels must come with the lowest error of their column and ``fg`` 0: sorted last,
    they change neither the value nor any other pixel's gradient (the gradient at a rank depends
    only on the ranks before it).
    """
    errors_sorted, perm = errors.sort(0, descending=True)
    return (errors_sorted * _lovasz_grad(fg.gather(0, perm))).sum(0)


class Lovasz(nn.Module):
    """Lovász-softmax over the batch (Berman et al. 2018), averaged over the classes present
    among the valid pixels; the Lovász hinge on the logit for binary (C = 1).

    The same values as SMP's ``LovaszLoss(mode, per_image=False, ignore_index=255)``, but the
    classes are sorted together (as many per sort as fit in ``chunk_elements`` values, to bound
    memory). Which classes are sorted: with ``present_only`` (the default on the CPU) only those
    present in the target, which takes a read-back -- free on the CPU, where sorting all 59
    classes of an 8 x 384 x 256 batch took ~10 s a step; otherwise (the default on accelerators)
    every class, the absent ones masked out, so the step never waits on the device.
    """

    def __init__(self, chunk_elements: int = 1 << 24, present_only: bool | None = None):
        super().__init__()
        self.chunk_elements, self.present_only = chunk_elements, present_only

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = (target != IGNORE_INDEX).flatten()
        safe = torch.where(valid, target.flatten(), 0)
        c = logits.shape[1]
        if c == 1:  # Lovász hinge: error relu(1 - x * sign) per pixel (relu before the sort sorts the same)
            fg = (safe == 1).float()
            errors = F.relu(1.0 - logits.float()[:, 0].flatten() * (2 * fg - 1)) * valid
            return _lovasz_sorted(errors.unsqueeze(1), fg.unsqueeze(1))[0]
        probas = logits.float().softmax(1).movedim(1, -1).reshape(-1, c)  # (P, C)
        classes = torch.arange(c, device=logits.device)
        present_only = logits.device.type == "cpu" if self.present_only is None else self.present_only
        if present_only:
            classes = classes[_per_class_sum(safe, valid.float(), c) > 0]
            if classes.numel() == 0:
                return probas.sum() * 0.0
        step = max(1, self.chunk_elements // max(probas.shape[0], 1))
        losses, present = [], []
        for c0 in range(0, classes.numel(), step):
            chunk = classes[c0:c0 + step]
            fg = ((safe.unsqueeze(1) == chunk) & valid.unsqueeze(1)).float()  # (P, chunk)
            errors = (fg - probas[:, chunk]).abs() * valid.unsqueeze(1)
            losses.append(_lovasz_sorted(errors, fg))
            present.append(fg.sum(0) > 0)
        return _weighted_mean(torch.cat(losses), torch.cat(present).float())


class Dice(nn.Module):
    """Soft Dice over the batch, ``1 - 2 sum(p y) / sum(p + y)`` per class, averaged over all C classes
    with classes absent from the valid target counting 0; ignored pixels count nowhere.

    The values of SMP's ``DiceLoss(mode, from_logits=True, ignore_index=255)`` (tests check it).
    Binary goes through SMP. Multi-class is computed from the true class's probability alone:
    SMP builds a one-hot (B, C, H*W) target and multiplies it through, which on a 59-class,
    8 x 384 x 256 batch costs ~0.85 s per CPU step; gathering ``p[y]`` and summing it per class
    with ``index_add`` gives the same sums in a few passes over the probabilities.
    """

    eps = 1e-7
    """SMP's clamp on the denominator."""

    def __init__(self, binary: bool):
        super().__init__()
        self.smp = smp.losses.DiceLoss("binary", from_logits=True, ignore_index=IGNORE_INDEX) if binary else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.smp is not None:
            return self.smp(logits.float(), target)
        c = logits.shape[1]
        valid = target != IGNORE_INDEX
        safe = torch.where(valid, target, 0)
        probs = logits.float().softmax(1)
        vf = valid.float()
        p_sum = (probs * vf.unsqueeze(1)).sum((0, 2, 3))  # (C,) sum of p_c over valid pixels
        p_true = probs.gather(1, safe.unsqueeze(1))[:, 0] * vf  # (B, H, W) p of the true class
        inter = _per_class_sum(safe, p_true, c)  # (C,) sum of p_c where y = c
        count = _per_class_sum(safe, vf, c)  # (C,) valid pixels of class c
        dice = 2 * inter / (p_sum + count).clamp_min(self.eps)
        return ((1 - dice) * (count > 0)).mean()


class Sum(nn.Module):
    """Weighted sum of losses; keeps the parts for logging."""

    def __init__(self, parts: dict[str, tuple[float, nn.Module]]):
        super().__init__()
        self.weights = {k: w for k, (w, _) in parts.items()}
        self.parts = nn.ModuleDict({k: m for k, (_, m) in parts.items()})

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[k] * m(logits, target) for k, m in self.parts.items())


# ----------------------------------------------------------------------------- registry
LossFactory = Callable[[LossConfig, bool, "torch.Tensor | None"], nn.Module]
"""(loss config, binary, class weights (K,) or None) -> loss module."""

PIXEL: dict[str, LossFactory] = {
    "ce": lambda c, b, w: CE(w),
    "focal": lambda c, b, w: Focal(c.focal_gamma, w),
    "ohem_ce": lambda c, b, w: OhemCE(c.ohem_keep, w),
}
"""Pixel terms: take class weights."""

REGION: dict[str, Callable[[bool], nn.Module]] = {
    "dice": Dice,
    "lovasz": lambda b: Lovasz(),
}
"""Region terms: per-class over the batch, no class weights."""


def _region(region: str) -> LossFactory:
    return lambda c, b, w: REGION[region](b)


def _sum(region: str, pixel: str) -> LossFactory:
    return lambda c, b, w: Sum({region: (c.dice_weight, REGION[region](b)),
                                pixel: (c.ce_weight, PIXEL[pixel](c, b, w))})


LOSSES: Registry[LossFactory] = Registry("loss.name", {
    "dice_bce": _sum("dice", "ce"),
    "dice_ce": _sum("dice", "ce"),
    "dice_focal": _sum("dice", "focal"),
    "lovasz_ce": _sum("lovasz", "ce"),
    "bce": PIXEL["ce"],
    **PIXEL,
    **{name: _region(name) for name in REGION},
}, also=("auto",))
"""``loss.name`` -> factory. ``bce`` and ``ce`` are the same term (BCE for one logit, CE otherwise)."""


def create_loss(cfg: LossConfig, out_channels: int, class_weights: torch.Tensor | None = None) -> nn.Module:
    """``out_channels`` 1 = binary (sigmoid), K = multi-class; ``auto`` picks Dice+BCE / Dice+CE.

    ``class_weights`` (K,) float32 from :func:`class_weights` (K = the manifest's classes, 2 for
    binary) weights the pixel terms; a loss without one (``dice``, ``lovasz``) refuses them,
    so a configured weighting never silently does nothing.
    """
    check_loss_config(cfg)
    binary = out_channels == 1
    name = cfg.name if cfg.name != "auto" else ("dice_bce" if binary else "dice_ce")
    if class_weights is not None:
        if name in REGION:
            raise UserError(f"loss.name={name} takes no class weights; use loss.class_weights=none or a loss with "
                            f"a pixel term ({', '.join(k for k in LOSSES if k not in REGION)})")
        if class_weights.shape != (max(out_channels, 2),):
            raise UserError(f"{class_weights.numel()} class weights for a model with {out_channels} output "
                            f"channel(s); the shards and model.num_classes disagree")
    return LOSSES.pick(name)(cfg, binary, class_weights)


def check_loss_config(cfg: LossConfig) -> None:
    """``loss.name`` and ``loss.class_weights`` name registered things (UserError naming the key otherwise)."""
    LOSSES.check(cfg.name)
    CLASS_WEIGHTS.check(cfg.class_weights)
