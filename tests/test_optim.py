"""Optimiser groups and LR schedules (stepped per optimiser step)."""

from __future__ import annotations

import pytest
import torch

from segdist.config import load_config
from segdist.models import create_model
from segdist.optim import create_optimizer, create_scheduler


@pytest.fixture(scope="module")
def model():
    return create_model(load_config(None, ["model.pretrained=none"]).model, 1)


def lrs(cfg, model, steps):
    opt = create_optimizer(cfg.optim, model)
    sched = create_scheduler(cfg.optim, opt, steps)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def test_encoder_and_decoder_groups(model):
    cfg = load_config(None, ["optim.lr=0.01", "optim.encoder_lr=0.001"])
    opt = create_optimizer(cfg.optim, model)
    names = {g["name"]: g for g in opt.param_groups}
    assert names["encoder"]["lr"] == 0.001 and names["decoder"]["lr"] == 0.01
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len([p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("name", ["cosine", "poly"])
def test_warmup_then_decay(model, name):
    cfg = load_config(None, [f"optim.scheduler={name}", "optim.warmup_steps=4", "optim.lr=1.0"])
    dec = [lr[-1] for lr in lrs(cfg, model, 20)]
    assert dec[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(dec[3:], dec[4:]))
    assert dec[-1] < 0.1


def test_onecycle_peaks_at_lr(model):
    cfg = load_config(None, ["optim.scheduler=onecycle", "optim.lr=0.5"])
    dec = [lr[-1] for lr in lrs(cfg, model, 30)]
    assert max(dec) == pytest.approx(0.5, rel=0.05) and dec[0] < 0.1 and dec[-1] < 0.01


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_optimizers_build(model, name):
    opt = create_optimizer(load_config(None, [f"optim.name={name}"]).optim, model)
    assert isinstance(opt, torch.optim.Optimizer)


def test_ema_matches_the_formula_and_survives_a_state_dict_round_trip():
    import torch

    from segdist.optim import EMA

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9)
    w = [p.detach().clone() for p in model.parameters()]
    ema.update(model)  # first update: a copy
    expect = [x.clone() for x in w]
    for n in range(1, 100):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
        ema.update(model)
        decay = min(0.9, (1 + n) / (10 + n))  # the warm-up up to n = 80, then 0.9
        expect = [e + (1 - decay) * (p.detach() - e) for e, p in zip(expect, model.parameters())]
    for a, b in zip(ema.module.parameters(), expect):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)  # statistics are current
    other = EMA(model, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 100
    assert all(torch.equal(a, b) for a, b in zip(other.module.parameters(), ema.module.parameters()))


class _EMABefore(torch.nn.Module):
    """segdist's hand-written EMA before it moved onto timm's ModelEmaV3 (commit a050dc7), kept as the reference."""

    def __init__(self, model, decay):
        import copy

        super().__init__()
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model):
        ema, new = list(self.module.parameters()), [p.detach() for p in model.parameters()]
        if self.updates == 0:
            torch._foreach_copy_(ema, new)
        else:
            torch._foreach_lerp_(ema, new, 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates)))
        for b, nb in zip(self.module.buffers(), model.buffers()):
            b.copy_(nb)
        self.updates += 1


def test_ema_on_timm_gives_the_same_weights_as_before(model):
    """Training steps of a real Unet (AdamW, BN statistics moving): bit-identical EMA weights and buffers."""
    from segdist.optim import EMA

    torch.manual_seed(0)
    ours, before = EMA(model, 0.99), _EMABefore(model, 0.99)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(12):
        loss = model(torch.randn(2, 3, 64, 64)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ours.update(model)
        before.update(model)
    model.eval()
    pairs = list(zip(ours.module.state_dict().values(), before.module.state_dict().values(), strict=True))
    assert len(pairs) > 300 and all(torch.equal(a, b) for a, b in pairs)
    assert not all(torch.equal(a, b) for a, b in zip(ours.module.parameters(), model.parameters()))
