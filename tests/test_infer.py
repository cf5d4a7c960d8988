"""Predict: masks and overlays at each input's original size; bad inputs are clear errors."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from segdist.checkpoint import save_model
from segdist.config import load_config
from segdist.errors import UserError
from segdist.infer import predict_paths
from segdist.models import create_model
from tests.conftest import HUMAN_SEG, REPO, require_dataset


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = load_config(None, ["model.pretrained=none", "data.image_size=64"])
    out = tmp_path_factory.mktemp("ckpt") / "best"
    meta = {"image_size": 64, "mean": cfg.augment.mean, "std": cfg.augment.std,
            "class_names": ["background", "person"], "num_classes": 2, "binary": True, "config": cfg.to_dict()}
    save_model(create_model(cfg.model, 1), out, meta)
    return out


def test_predict_keeps_original_size(ckpt, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sizes = {"wide.jpg": (45, 130), "tall.png": (201, 77)}
    for name, (h, w) in sizes.items():
        cv2.imwrite(str(src / name), np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    (src / "broken.jpg").write_bytes(b"not an image")
    msg = predict_paths(ckpt, src, tmp_path / "out", device="cpu")
    assert "predicted 2 image(s)" in msg and "skipped 1 unreadable: broken.jpg" in msg
    for name, (h, w) in sizes.items():
        stem = name.rsplit(".", 1)[0]
        mask = cv2.imread(str(tmp_path / "out" / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        ov = cv2.imread(str(tmp_path / "out" / "overlays" / f"{stem}.png"))
        assert mask.shape == (h, w) and ov.shape == (h, w, 3)
        assert set(np.unique(mask)) <= {0, 255}


def test_predict_real_photo_size(ckpt, tmp_path):
    photo = require_dataset(HUMAN_SEG) / "Training_Images" / "1.jpg"
    predict_paths(ckpt, photo, tmp_path, device="cpu")
    h, w = cv2.imread(str(photo)).shape[:2]
    assert cv2.imread(str(tmp_path / "masks" / "1.png"), cv2.IMREAD_UNCHANGED).shape == (h, w)


def test_missing_input_and_bad_checkpoint_are_user_errors(ckpt, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        predict_paths(ckpt, tmp_path / "nope", tmp_path / "o")
    with pytest.raises(UserError, match="not a segdist model folder"):
        predict_paths(tmp_path, tmp_path, tmp_path / "o")
    p = subprocess.run([sys.executable, "-m", "segdist.cli", "predict", str(tmp_path / "x"), str(tmp_path),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "segdist: error:" in p.stderr


def test_same_stem_in_subfolders_and_extensions_do_not_overwrite(ckpt, tmp_path):
    src = tmp_path / "in"
    for rel in ("a/x.jpg", "b/x.jpg", "x.jpg", "x.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(src / rel), np.zeros((40, 50, 3), np.uint8))
    predict_paths(ckpt, src, tmp_path / "out", device="cpu")
    got = sorted(str(p.relative_to(tmp_path / "out" / "masks")) for p in (tmp_path / "out" / "masks").rglob("*.png"))
    assert got == ["a/x.png", "b/x.png", "x_jpg.png", "x_png.png"]
