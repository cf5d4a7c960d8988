"""ONNX export: uint8 in, logits out, equal to PyTorch on real images or not written at all; the model card."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from segdist.card import write_model_card
from segdist.checkpoint import read_meta
from segdist.errors import UserError
from segdist.export import check_inputs, compare, export_onnx, missing_extra_message, onnx_bytes, require_onnx
from tests.conftest import HUMAN_SEG, REPO, require_dataset


@pytest.fixture(scope="module")
def ckpt3(tmp_path_factory):
    """A tiny untrained 3-class model folder (64 px), made as conftest's binary ``ckpt``."""
    from segdist.checkpoint import ModelMeta, save_model
    from segdist.config import load_config
    from segdist.models import create_model

    cfg = load_config(None, ["model.pretrained=none", "data.image_size=64"])
    out = tmp_path_factory.mktemp("ckpt3") / "best"
    save_model(create_model(cfg.model, 3), out, ModelMeta(cfg, ("background", "shirt", "pants"), 3, False))
    return out


@pytest.fixture(scope="module")
def jpg_shards(tmp_path_factory):
    """A shard folder with JPEG images (80 px, so the 64 px network input is a real resize)."""
    from tests.shardutil import write_shards

    return write_shards(tmp_path_factory.mktemp("jpg-shards"), {"train": [2], "val": [3, 2]}, size=80, ext="jpg")


@pytest.fixture(scope="module")
def exported(ckpt, jpg_shards, tmp_path_factory):
    """The binary test model exported (fixed 64x64) and checked on the shard images: (path, report)."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return out, export_onnx(ckpt, out, shards=str(jpg_shards), count=4)


def io_spec(path) -> tuple[tuple, int, tuple, int]:
    """(input dims, input elem type, output dims, output elem type); a dim is an int or its name."""
    graph = onnx.load(str(path)).graph

    def dims(v):
        return tuple(d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim)

    return (dims(graph.input[0]), graph.input[0].type.tensor_type.elem_type,
            dims(graph.output[0]), graph.output[0].type.tensor_type.elem_type)


def test_export_takes_uint8_returns_logits_and_matches_torch_on_shard_images(ckpt, exported):
    path, report = exported
    assert io_spec(path) == ((1, 3, 64, 64), onnx.TensorProto.UINT8, (1, 1, 64, 64), onnx.TensorProto.FLOAT)
    text = "\n".join(report)
    assert "checked on 4 images from shards" in text and "onnxruntime " + ort.__version__ in text
    max_abs, agree = re.search(r"max \|Δlogit\| (\S+), mean .* agreement (\S+) %", text).groups()
    assert float(max_abs) <= 1e-3 and float(agree) >= 99.9
    # the checkpoint folder is only read, and nothing but the .onnx is left beside it
    assert sorted(p.name for p in ckpt.iterdir()) == ["README.md", "config.json", "model.safetensors", "segdist.json"]
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]


def test_three_classes_on_real_photos(ckpt3, tmp_path):
    photos = require_dataset(HUMAN_SEG) / "Training_Images"
    report = export_onnx(ckpt3, tmp_path / "m3.onnx", images=str(photos), count=3)
    assert io_spec(tmp_path / "m3.onnx")[2] == (1, 3, 64, 64)
    assert "3 photos from" in report[1] and "3 image(s) at 64x64" in report[2]


def test_dynamic_export_runs_at_other_sizes_and_batches(ckpt, tmp_path):
    out = tmp_path / "dyn.onnx"
    report = export_onnx(ckpt, out, dynamic=True, count=2)
    assert "synthetic images" in report[1] and "at 96x128" in report[3]  # its own check at (H+32, W+64)
    assert io_spec(out)[0] == ("batch", 3, "height", "width")
    from segdist.checkpoint import read_meta
    from segdist.models import load_model

    x = torch.randint(0, 256, (3, 3, 160, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    parity = compare(out.read_bytes(), load_model(ckpt), read_meta(ckpt), [x])
    assert parity.ok() and parity.sizes == ((160, 96),) and parity.images == 3


def test_a_corrupted_graph_is_caught_and_a_refused_export_writes_nothing(ckpt, exported, jpg_shards, tmp_path):
    from segdist.checkpoint import read_meta
    from segdist.models import load_model

    meta, model = read_meta(ckpt), load_model(ckpt)
    proto = onnx.load(str(exported[0]))
    weight = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))  # the largest conv kernel
    arr = onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array(arr * 1.5 + 0.01, weight.name))
    pixels, _ = check_inputs(meta, shards=str(jpg_shards), count=3)
    bad = compare(proto.SerializeToString(), model, meta, [p[None] for p in pixels])
    good = compare(exported[0].read_bytes(), model, meta, [p[None] for p in pixels])
    assert good.ok() and not bad.ok() and bad.max_abs > 1e-3, (good, bad)

    out = tmp_path / "refused.onnx"
    with pytest.raises(UserError, match=r"disagrees with PyTorch: max \|Δlogit\| .*refused\.onnx' not written"):
        export_onnx(ckpt, out, count=1, max_abs=-1.0)  # a bound no export meets: the refusal, on a real export
    assert list(tmp_path.iterdir()) == []  # no .onnx, no temp file


@pytest.mark.slow
def test_cli_export_prints_the_figures(ckpt, jpg_shards, tmp_path):
    p = subprocess.run([sys.executable, "-m", "segdist", "export", str(ckpt), "--onnx", str(tmp_path / "m.onnx"),
                        "--shards", str(jpg_shards), "--count", "2", "--opset", "18"],
                       capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    for figure in ("opset 18", "max |Δlogit|", "mean |Δlogit|", "argmax agreement", "2 image(s) at 64x64",
                   f"onnxruntime {ort.__version__}"):
        assert figure in p.stdout
    assert p.stderr.strip() == ""  # the exporter's warnings are not the user's business
    assert (tmp_path / "m.onnx").is_file()


def test_cli_errors_are_one_line(ckpt, tmp_path, capsys, monkeypatch):
    from segdist.cli import main

    assert main(["export", str(tmp_path), "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert main(["export", str(ckpt), "--onnx", str(tmp_path / "x.onnx"), "--opset", "5"]) == 2
    assert main(["export", str(ckpt), "--onnx", str(tmp_path)]) == 2  # a folder: refused before exporting
    (tmp_path / "file").write_text("")
    assert main(["export", str(ckpt), "--onnx", str(tmp_path / "file" / "x.onnx")]) == 2
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert main(["export", str(ckpt), "--onnx", str(tmp_path / "x.onnx")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5 and all(line.startswith("segdist: error: ") for line in lines)
    assert "not a segdist model folder" in lines[0] and "--opset 5" in lines[1]
    assert f"--onnx {tmp_path} is a folder; pass a file path" in lines[2]
    assert "--onnx's folder" in lines[3] and "file is a file; pass a folder" in lines[3]
    assert lines[4] == f"segdist: error: {missing_extra_message('onnxruntime')}"
    assert "pip install 'segdist[export]'" in lines[4] and not (tmp_path / "x.onnx").exists()
    with pytest.raises(UserError, match=r"segdist\[export\]"):
        require_onnx()


def test_unsupported_opset_is_refused(ckpt):
    with pytest.raises(UserError, match="--opset 30"):
        onnx_bytes(torch.nn.Identity(), read_meta(ckpt), opset=30)


METRICS = {"iou": 0.8123, "dice": 0.8964, "num_samples": 48,
           "per_class": [{"name": "background", "iou": 0.95, "dice": 0.97},
                         {"name": "person", "iou": 0.8123, "dice": 0.8964}]}


def test_model_card_documents_the_model_and_its_loading_snippets_work(ckpt, exported, tmp_path, monkeypatch):
    folder = tmp_path / "run" / "best"
    shutil.copytree(ckpt, folder)
    meta = read_meta(folder)
    meta.config.data.shards = "runs/human-seg-shards"
    write_model_card(folder, meta, METRICS)
    card = (folder / "README.md").read_text()
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "segdist.json"]
    for needle in ("runs/human-seg-shards", "0 = background, 1 = foreground", "binary", "squashed to 64x64",
                   "mean [0.485, 0.456, 0.406]", "`Unet`", "`tu-efficientnet_lite0`", "lr 0.001", "epochs: 10",
                   "IoU **0.8123**", "Dice **0.8964**", "| person | 0.8123 | 0.8964 |", "| background | 0.9500",
                   "smp.from_pretrained", f'segdist.load("{folder}")', 'p.predict("photo.jpg")',
                   "onnxruntime", '"image"'):
        assert needle in card, needle
    blocks = re.findall(r"```python\n(.*?)```", card, re.DOTALL)
    assert len(blocks) == 4  # segdist; the network input with OpenCV/numpy; SMP alone; ONNX Runtime
    # the input recipe, then the SMP and ONNX Runtime snippets that use it, run as written
    from tests.shardutil import sample_bytes

    monkeypatch.chdir(tmp_path)
    shutil.copy(exported[0], "model.onnx")
    (tmp_path / "photo.jpg").write_bytes(sample_bytes(0, 90, "jpg")[0])
    ns: dict = {}
    exec(blocks[1], ns)  # noqa: S102 -- the card's own snippet, written by this test
    exec(blocks[2], ns)  # noqa: S102 -- likewise
    assert tuple(ns["logits"].shape) == (1, 1, 64, 64)
    exec(blocks[3], ns)  # noqa: S102 -- likewise
    assert ns["logits"].shape == (1, 1, 64, 64) and ns["mask"].shape == (64, 64)
    segdist_ns: dict = {}
    exec(blocks[0], segdist_ns)  # noqa: S102 -- likewise
    assert segdist_ns["mask"].shape == (90, 90)

    write_model_card(folder, meta, None)
    assert "No metrics" in (folder / "README.md").read_text()


def test_model_card_multiclass(ckpt3, tmp_path):
    write_model_card(tmp_path, read_meta(ckpt3), None)
    card = (tmp_path / "README.md").read_text()
    assert "3 classes (0 = background, 1 = shirt, 2 = pants)" in card and "argmax(0)" in card
