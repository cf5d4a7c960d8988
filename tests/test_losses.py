"""Losses: registry, ignore pixels contribute nothing, never NaN on an all-ignored batch."""

from __future__ import annotations

import pytest
import torch

from segdist.config import LossConfig
from segdist.errors import UserError
from segdist.losses import create_loss


@pytest.mark.parametrize("out_ch", [1, 4])
@pytest.mark.parametrize("name", ["auto", "dice_bce", "dice_ce", "bce", "ce", "dice"])
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


def test_unknown_loss():
    with pytest.raises(UserError, match="unknown loss"):
        create_loss(LossConfig(name="focal"), 1)
