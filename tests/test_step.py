"""The optimiser step without a host sync (segdist/step.py): nothing is read back from the device
between the reads, the reads come where the loop needs them, and torch.compile gives the eager step."""

from __future__ import annotations

import os
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.shardutil import write_shards

SEGDIST = str(Path(__file__).resolve().parents[1] / "segdist")
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__")
"""Tensor methods that hand a value to Python: on CUDA each one waits for the GPU (a host sync)."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("step"), {"train": [8, 8], "val": [2]}, size=64)


@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _origin() -> str:
    """Where a tensor read was asked for: the first frame outside torch (segdist's own file:line, or a library)."""
    frame = sys._getframe(2)
    while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return "torch"
    name = frame.f_code.co_filename
    if name.startswith(SEGDIST):
        return f"segdist/{Path(name).name}:{frame.f_lineno}"
    return name.split("site-packages/")[-1]


def run_counting(cfg, monkeypatch, warm: int = 0, device_mode: str | None = None):
    """``train.run(cfg)``, counting the tensor reads made during the steady-state steps: inside
    ``train_one_epoch`` after its first ``warm`` optimiser steps, outside the reads (``settle``),
    pauses and saves. With ``device_mode`` (CUDA), torch's own sync check is on there too."""
    import segdist.train as train

    counts: Counter = Counter()
    state = {"steady": False, "steps": 0, "reads": 0, "counted_steps": 0}

    def steady(on: bool) -> None:
        state["steady"] = on
        if device_mode is not None:
            torch.cuda.set_sync_debug_mode(device_mode if on else 0)

    for name in READS:
        orig = getattr(torch.Tensor, name)

        def read(self, *a, _orig=orig, _name=name, **k):
            if state["steady"]:
                counts[(_name, _origin())] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)

    real_epoch, real_settle, real_step = train.train_one_epoch, train.settle, train.Steps.step

    def one_epoch(t, batches, loop):
        steady(warm == 0)
        try:
            return real_epoch(t, batches, loop)
        finally:
            steady(False)

    def settle(*a, **k):
        steady(False)
        state["reads"] += 1
        try:
            return real_settle(*a, **k)
        finally:
            steady(state["steps"] >= warm)

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        state["steps"] += 1
        state["counted_steps"] += state["steady"]
        steady(state["steps"] >= warm)  # from the next micro-batch on
        return out

    monkeypatch.setattr(train, "train_one_epoch", one_epoch)
    monkeypatch.setattr(train, "settle", settle)
    monkeypatch.setattr(train.Steps, "step", step)
    train.run(cfg)
    return counts, state


def tiny_run_cfg(shards, out, *extra):
    from segdist.config import load_config

    return load_config(None, [f"data.shards={shards}", f"train.out_dir={out}", "train.name=steps", "data.image_size=64",
                              "data.batch_size=2", "data.num_workers=1", "model.pretrained=none", "track.backend=none",
                              "train.overlays=0", "train.epochs=1", "optim.accumulate=2", "optim.ema=0.9",
                              "train.log_every=2", *extra])


@pytest.mark.slow
def test_steady_state_steps_read_nothing_back_from_the_device(shards, tmp_path, monkeypatch, fresh_accelerate):
    """8 micro-batches of 2, accumulate 2: 4 optimiser steps (with clipping, EMA, the skip decision),
    read at steps 2 and 4 (log_every 2, the epoch end). Between the reads segdist asks for no tensor
    value; what libraries ask for on the CPU (Kornia's parameter draws) is printed."""
    counts, state = run_counting(tiny_run_cfg(shards, tmp_path), monkeypatch)
    ours = {k: n for k, n in counts.items() if k[1].startswith("segdist/")}
    print(f"\n{state['counted_steps']} steady-state steps, {state['reads']} reads; tensor reads there: "
          f"segdist {sum(ours.values())}, libraries {dict(counts - Counter(ours))}")
    assert state["counted_steps"] == 4 and state["reads"] == 2
    assert ours == {}, f"host reads in segdist's steady-state step: {ours}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("augment", ["true", "false"])
def test_steady_state_cuda_steps_never_sync(shards, tmp_path, monkeypatch, fresh_accelerate, augment):
    """torch.cuda.set_sync_debug_mode("error") around the steady-state steps (after 2 warm-up steps,
    outside the reads): any synchronising call raises there, segdist's or a library's (Kornia's with
    the default augmentation, none without)."""
    cfg = tiny_run_cfg(shards, tmp_path, "train.epochs=2", f"augment.enabled={augment}", "train.log_every=4")
    counts, state = run_counting(cfg, monkeypatch, warm=2, device_mode="error")
    assert state["counted_steps"] >= 4


def test_reads_come_at_every_multiple_the_steps_taken_reach():
    """A read is due when the steps taken at the last read plus the steps tried since reach a multiple of
    log_every or checkpoint_every: whatever the skips, the steps taken never pass a multiple unread."""
    from segdist.step import Steps

    rng = random.Random(0)
    for every in ((3, 0), (4, 6), (1, 0), (5, 2)):
        s = Steps.__new__(Steps)
        s.every, s.tried = tuple(n for n in every if n), 0
        at_read = taken = 0
        reads_at = []
        for _ in range(500):
            taken += rng.random() > 0.3  # 30 % of the steps skipped
            s.tried += 1
            if s.due(at_read, epoch_end=False):
                at_read, s.tried = taken, 0
                reads_at.append(taken)
        for n in s.every:
            assert set(range(n, taken + 1, n)) <= set(reads_at), every
        assert all(b - a <= max(s.every) for a, b in zip(reads_at, reads_at[1:]))


class Tiny(torch.nn.Module):
    """Conv-BN-ReLU-conv: compiles in seconds on the CPU (an SMP Unet takes a minute or more)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                       torch.nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def grads_after(forward_loss, model, batches) -> tuple[list[float], list[torch.Tensor]]:
    """Each batch's loss and the gradients summed over the batches (each loss / len(batches), as accumulation)."""
    model.zero_grad(set_to_none=True)
    losses = []
    for x, y in batches:
        loss = forward_loss(x, y)
        (loss / len(batches)).backward()
        losses.append(float(loss.detach()))
    return losses, [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
def test_compiled_step_equals_eager_and_accumulation_still_equals_the_big_batch():
    """torch.compile (Inductor, CPU) of model + loss: the same losses and gradients as eager within 1e-5
    (relative); 2 x 4 accumulated equals one batch of 8, compiled (a second batch shape: a second graph)."""
    from segdist.losses import create_loss
    from segdist.config import LossConfig
    from segdist.step import compile_forward_loss

    torch.manual_seed(0)
    model = Tiny()
    model.eval()  # fixed BN statistics: batch 8 and 2 x 4 normalise alike
    loss_fn = create_loss(LossConfig(name="bce"), 1)  # a per-pixel mean: additive over the halves
    x, y = torch.randn(8, 3, 32, 32), (torch.rand(8, 32, 32) > 0.5).long()
    eager = compile_forward_loss(model, loss_fn, "none")
    compiled = compile_forward_loss(model, loss_fn, "default")
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    e_loss, e_grad = grads_after(eager, model, halves)
    c_loss, c_grad = grads_after(compiled, model, halves)
    assert c_loss == pytest.approx(e_loss, rel=1e-5)
    for a, b in zip(c_grad, e_grad):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _, big = grads_after(compiled, model, [(x, y)])
    for a, b in zip(big, c_grad):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
