"""Fault injection for tests/test_distributed.py: a finite loss whose gradients are inf on rank 1.

Run under a 2-process launch with ``key=value`` overrides as arguments; writes
``<out_dir>/<name>/grads-rank<R>.json`` saying whether this rank's parameters are unchanged
and finite after the run.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import segdist.train as train
from segdist.config import load_config


class InfGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite); inf gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


real_create_loss, real_setup, captured = train.create_loss, train.setup, {}


def create_loss(cfg, out_ch, *weights):
    inner = real_create_loss(cfg, out_ch, *weights)

    class Faulty(torch.nn.Module):
        def forward(self, logits, target):
            if dist.is_initialized() and dist.get_rank() == 1:
                logits = InfGrad.apply(logits)
            return inner(logits, target)

    return Faulty()


def setup(cfg, stop, *rest):
    t = real_setup(cfg, stop, *rest)
    captured["t"] = t
    captured["init"] = {k: p.detach().clone() for k, p in t.accelerator.unwrap_model(t.model).named_parameters()}
    return t


train.create_loss, train.setup = create_loss, setup
cfg = load_config(None, sys.argv[1:])
train.run(cfg)
t = captured["t"]
params = dict(t.accelerator.unwrap_model(t.model).named_parameters())
rank = t.accelerator.process_index
result = {"unchanged": all(torch.equal(captured["init"][k], p.detach()) for k, p in params.items()),
          "finite": all(bool(torch.isfinite(p).all()) for p in params.values())}
(Path(cfg.train.out_dir) / cfg.train.name / f"grads-rank{rank}.json").write_text(json.dumps(result))
