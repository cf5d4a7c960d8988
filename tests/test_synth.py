"""segdist.synth: real files, deterministic bytes, valid label values, learnable-looking content."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from segdist.errors import UserError
from segdist.synth import make_synthetic


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    make_synthetic(tmp_path / "a", n=6, size=64, seed=3)
    make_synthetic(tmp_path / "b", n=6, size=64, seed=3)
    make_synthetic(tmp_path / "c", n=6, size=64, seed=4)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert sorted(a) == sorted(c)
    assert a["images/0000.jpg"] != c["images/0000.jpg"]


def test_binary_layout_values_sizes_and_formats(tmp_path):
    out = tmp_path / "syn"
    make_synthetic(out, n=12, size=96, seed=0)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:04d}.jpg" for i in range(12)]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{i:04d}.png" for i in range(12)]
    fractions = []
    for i in range(12):
        image = Image.open(out / "images" / f"{i:04d}.jpg")
        mask = Image.open(out / "masks" / f"{i:04d}.png")
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (96, 96))
        assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (96, 96))
        values = np.unique(np.asarray(mask))
        assert set(values.tolist()) <= {0, 1}
        fractions.append(float(np.asarray(mask).mean()))
    # Objects are large but never the whole image: 10-45 % of the pixels, ~15-40 % on average.
    assert 0.10 <= min(fractions) and max(fractions) <= 0.45
    assert 0.15 <= float(np.mean(fractions)) <= 0.40


def test_k_classes_use_indices_below_k(tmp_path):
    out = tmp_path / "syn"
    make_synthetic(out, n=30, size=64, classes=4, seed=1)
    seen = set()
    for p in (out / "masks").iterdir():
        seen |= set(np.unique(cv2.imread(str(p), cv2.IMREAD_UNCHANGED)).tolist())
    assert seen <= {0, 1, 2, 3}
    assert {0, 1, 2, 3} == seen  # 30 images with 1-4 shapes each use every class


def test_colour_alone_does_not_separate_foreground(tmp_path):
    """Per-image mean colours of foreground and background overlap: texture, not colour, is the cue."""
    out = tmp_path / "syn"
    make_synthetic(out, n=40, size=64, seed=2)
    fg_means, bg_means, fg_grad, bg_grad = [], [], [], []
    for i in range(40):
        image = cv2.imread(str(out / "images" / f"{i:04d}.jpg")).astype(np.float32)
        mask = cv2.imread(str(out / "masks" / f"{i:04d}.png"), cv2.IMREAD_UNCHANGED).astype(bool)
        inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        outer = ~cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        gray = image.mean(axis=2)
        lap = np.abs(cv2.Laplacian(gray, cv2.CV_32F))
        fg_means.append(gray[inner].mean())
        bg_means.append(gray[outer].mean())
        fg_grad.append(lap[inner].mean())
        bg_grad.append(lap[outer].mean())
    # Brightness ranges overlap...
    assert min(fg_means) < max(bg_means) and min(bg_means) < max(fg_means)
    # ...while local texture energy is higher inside objects on average.
    assert np.mean(fg_grad) > 1.5 * np.mean(bg_grad)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"n": 0}, "--n"), ({"size": 16}, "--size"), ({"classes": 0}, "--classes"), ({"classes": 300}, "--classes"),
    ({"seed": -1}, "--seed"),
])
def test_bad_arguments_raise_user_error(tmp_path, kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        make_synthetic(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_an_output_under_a_file_is_a_user_error(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="afile is a file, so no folder can be made there"):
        make_synthetic(tmp_path / "afile" / "data", n=1, size=32)


def test_refuses_to_replace_a_foreign_folder_but_replaces_its_own(tmp_path):
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a synthetic dataset"):
        make_synthetic(foreign, n=2, size=32)
    assert (foreign / "precious.txt").read_text() == "keep me"

    own = tmp_path / "syn"
    make_synthetic(own, n=3, size=32)
    make_synthetic(own, n=2, size=32)
    assert sorted(p.name for p in (own / "images").iterdir()) == ["0000.jpg", "0001.jpg"]
    assert not list(tmp_path.glob(".syn.tmp-*"))


def test_writes_240_images_in_a_few_seconds(tmp_path):
    import time

    t0 = time.perf_counter()
    make_synthetic(tmp_path / "syn", n=240, size=256)
    seconds = time.perf_counter() - t0
    assert len(list((tmp_path / "syn" / "images").iterdir())) == 240
    assert seconds < 20, f"240 synthetic images took {seconds:.1f} s"
