"""CUDA-only checks (skipped without a GPU): what CPU tests cannot show.

* nvJPEG decode while other kernels are queued on the same device gives the CPU decoder's
  pixels every time (torchvision allocates its outputs on the current stream and decodes on
  its own; see segdist.decode._decode_jpegs).
* 2-process NCCL evaluation equals 1-process evaluation exactly (`segdist eval` picks exact kernels).
* The training loop's prefetch thread (side stream + event) gives the main stream's copies.
* (tests/test_step.py) the steady-state training step under torch.cuda.set_sync_debug_mode("error").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.shardutil import write_shards

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_device_decode_under_queued_work_equals_cpu_decode(tmp_path):
    from segdist.decode import to_device
    from tests.shardutil import make_loader
    from segdist.shards import open_shards

    jpg = write_shards(tmp_path, {"val": [16]}, size=256, ext="jpg")
    urls, sizes = open_shards(str(jpg)).split("val")
    kw = dict(batch_size=16, image_size=224, train=False, pin_memory=True, num_workers=0)
    (cpu_batch,) = list(make_loader(urls, sizes, device_decode=True, **kw))
    want, _ = to_device({**cpu_batch, "jpeg": [j for j in cpu_batch["jpeg"]]}, "cpu")
    a = torch.randn(4096, 4096, device="cuda")
    bad = 0
    for _ in range(200):
        # Queue large work that reads and then frees memory, as a backward or optimiser step does.
        x = a @ a
        del x
        got, _ = to_device(cpu_batch, "cuda")
        bad += int((got.cpu().float() - want.float()).abs().mean() > 4.0)
    torch.cuda.synchronize()
    assert bad == 0, f"{bad} of 200 decodes differ from the CPU decode"


def test_two_process_nccl_eval_equals_one_process(tmp_path):
    from segdist.checkpoint import ModelMeta, save_model
    from segdist.config import load_config
    from segdist.models import create_model

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    shards = write_shards(tmp_path / "s", {"val": [7, 5, 2]}, size=64)
    cfg = load_config(None, ["model.pretrained=none", "data.image_size=64"])
    ckpt = tmp_path / "best"
    save_model(create_model(cfg.model, 1), ckpt, ModelMeta(cfg, ("bg", "fg"), 2, True))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = []
    for launcher in ([sys.executable], [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes",
                                        "2", "--multi_gpu", "--mixed_precision", "no"]):
        p = subprocess.run([*launcher, "-m", "segdist", "eval", str(ckpt), "--shards", str(shards), "--json"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        out.append(json.loads(p.stdout.strip().splitlines()[-1]))
    assert [c["tp"] for c in out[0]["per_class"]] == [c["tp"] for c in out[1]["per_class"]]
    assert out[0]["iou"] == out[1]["iou"]


def test_bench_train_on_cuda_with_device_decode(capsys):
    """`segdist bench train --device cuda --decode device` at 64 px: both loops train on the GPU, the
    clock covers their queued kernels, and the GPU memory peak is reported."""
    from segdist.cli import main
    from tests.conftest import HUMAN_SEG, require_dataset

    source = require_dataset(HUMAN_SEG)
    assert main(["bench", "train", "--source", str(source), "--limit", "8", "--size", "64", "--batch", "4",
                 "--steps", "2", "--warmup", "1", "--device", "cuda", "--decode", "device", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["device"], r["decode"]) == ("cuda", "device") and r["gpu"]
    for loop in ("course", "segdist"):
        m = r["runs"]["default"][loop]
        assert m["img_s"] > 0 and m["gpu_peak_mb"] > 0, (loop, m)


@pytest.mark.parametrize("device_decode", [False, True])
def test_batches_copied_ahead_on_a_side_stream_are_the_direct_copies(tmp_path, device_decode):
    """device_batches (the training loop's prefetch thread: pinned copy, nvJPEG decode, on a side stream,
    with an event) gives what to_device gives on the main stream, batch for batch, under queued work."""
    from segdist.decode import device_batches, to_device
    from segdist.shards import open_shards
    from tests.shardutil import make_loader

    jpg = write_shards(tmp_path, {"val": [12]}, size=128, ext="jpg")
    urls, sizes = open_shards(str(jpg)).split("val")
    batches = list(make_loader(urls, sizes, batch_size=4, image_size=96, train=False, pin_memory=True,
                               device_decode=device_decode))
    want = [to_device(b, "cuda") for b in batches]
    a = torch.randn(4096, 4096, device="cuda")
    got = []
    for image, mask in device_batches(batches, "cuda"):
        x = a @ a  # queued work on the main stream while the thread copies the next batch
        del x
        got.append((image.clone(), mask.clone()))
    assert len(got) == len(want) == 3
    for (gi, gm), (wi, wm) in zip(got, want):
        assert torch.equal(gi, wi) and torch.equal(gm, wm)
