"""Predict: masks and overlays at each input's original size; bad inputs are clear errors."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from segdist.errors import UserError
from segdist.infer import predict_paths
from tests.conftest import HUMAN_SEG, REPO, require_dataset


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


def huge_png() -> bytes:
    """A valid PNG header that claims 60000 x 60000 pixels: cv2.imread raises on it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_an_image_opencv_refuses_is_skipped_with_its_reason(ckpt, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a_huge.png").write_bytes(huge_png())
    cv2.imwrite(str(src / "b_ok.png"), np.zeros((30, 40, 3), np.uint8))
    msg = predict_paths(ckpt, src, tmp_path / "out", device="cpu")
    assert "predicted 1 image(s)" in msg and "skipped 1 unreadable: a_huge.png (larger than OpenCV" in msg
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["b_ok.png"]


def test_train_eval_and_predict_make_byte_identical_network_input(tmp_path):
    """One rule from bytes to pixels: the train stream, the val stream and predict agree exactly."""
    import torch
    import webdataset as wds

    from segdist.augment import DeviceAugment, normalize
    from segdist.config import AugmentConfig
    from segdist.infer import network_input
    from segdist.loader import make_loader

    photos = sorted((require_dataset(HUMAN_SEG) / "Training_Images").glob("*.jpg"))[:4]
    raw = {f"k{i}": p.read_bytes() for i, p in enumerate(photos)}
    mask = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
    with wds.TarWriter(str(tmp_path / "s.tar")) as w:
        for k, data in raw.items():
            w.write({"__key__": k, "image.jpg": data, "mask.png": mask})
    size = 96
    meta = {"image_size": size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "config": {"data": {"reduced_decode": True}}}
    rows = {}
    for train in (True, False):
        loader = make_loader([str(tmp_path / "s.tar")], [len(raw)], batch_size=2, image_size=size, train=train,
                             num_workers=0, pin_memory=False)
        for b in loader:
            for k, img in zip(b["key"], b["image"]):
                rows.setdefault(k, []).append(img)
    assert sorted(rows) == sorted(raw)
    for k, data in raw.items():
        want = network_input(data, meta)
        assert want.dtype == torch.uint8 and want.shape == (3, size, size)
        assert all(torch.equal(got, want) for got in rows[k]), k
        x_eval, _ = DeviceAugment(AugmentConfig(), train=False)(rows[k][1][None], torch.zeros(1, size, size))
        assert torch.equal(x_eval, normalize(want[None], meta["mean"], meta["std"]))
