"""Optimiser groups and LR schedules (stepped per optimiser step)."""

from __future__ import annotations

import copy

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


def test_the_device_ema_update_is_the_host_one_bit_for_bit_and_a_skipped_step_leaves_it():
    """update_on_device (the training step's: decay from a device count, no sync) gives update's bits;
    with skipped=True it changes nothing, count included."""
    from segdist.optim import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 1, 3))
    host, device = EMA(model, 0.99), EMA(model, 0.99)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for k in range(40):
        model(torch.randn(2, 3, 16, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        skip = k in (3, 4, 30)
        before = [p.clone() for p in device.module.parameters()]
        device.update_on_device(model, torch.tensor(skip))
        if skip:
            assert all(torch.equal(a, b) for a, b in zip(before, device.module.parameters()))
            continue
        host.update(model)
    assert host.updates == device.updates == 37
    pairs = list(zip(host.module.state_dict().values(), device.module.state_dict().values(), strict=True))
    assert all(torch.equal(a, b) for a, b in pairs)


class TwoGroups(torch.nn.Module):
    """An encoder and a head: two param groups, as an SMP model gives."""

    def __init__(self):
        super().__init__()
        self.encoder, self.head = torch.nn.Linear(6, 4), torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.encoder(x).relu())


@pytest.mark.parametrize("name,scheduler", [("adamw", "cosine"), ("sgd", "poly")])
def test_steps_skipped_on_the_device_keep_weights_moments_and_lr_as_a_host_skip_would(name, scheduler):
    """Fused optimiser + found_inf + DeviceSchedule (LR picked on the device by the steps taken) against
    the plain loop that skips on the host (no optimizer.step(), no scheduler.step()): the same bits,
    including a skipped first step (fused SGD's momentum buffers) and reads between the steps."""
    from segdist.optim import DeviceSchedule

    cfg = load_config(None, [f"optim.name={name}", f"optim.scheduler={scheduler}", "optim.warmup_steps=3",
                             "optim.lr=0.1", "optim.encoder_lr=0.01"])
    torch.manual_seed(0)
    net = TwoGroups()
    nets = [net, copy.deepcopy(net)]
    opts = [create_optimizer(cfg.optim, n) for n in nets]
    scheds = [create_scheduler(cfg.optim, o, 20) for o in opts]
    device = DeviceSchedule(opts[1], scheds[1], span=4, device=torch.device("cpu"))
    device.start(0, advance=False)
    skips = {0, 5, 6, 11}
    taken = tried = 0
    for k in range(16):
        x = torch.randn(8, 6)
        for n in nets:
            n(x).square().mean().backward()
        if k not in skips:  # the host reference
            opts[0].step()
            scheds[0].step()
        opts[0].zero_grad()
        bad = torch.tensor(k in skips)
        opts[1].found_inf = bad.float()
        device.step(opts[1], tried)
        del opts[1].found_inf
        opts[1].zero_grad()
        device.took(bad)
        taken, tried = taken + (k not in skips), tried + 1
        if tried == 4:  # a read
            device.start(taken)
            tried = 0
    device.start(taken)
    assert [g["lr"] for g in opts[0].param_groups] == [g["lr"] for g in opts[1].param_groups]
    assert scheds[0].state_dict()["last_epoch"] == scheds[1].state_dict()["last_epoch"] == 12
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    for p0, p1 in zip(nets[0].parameters(), nets[1].parameters()):
        for key, v in opts[0].state[p0].items():
            assert torch.equal(v, opts[1].state[p1][key]), key
