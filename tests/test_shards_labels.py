"""Task and class inference refuses what the masks' pixels contradict, naming the evidence and the fix."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from segdist.errors import UserError
from segdist.shards import build_shards


def dataset(root: Path, masks: list[np.ndarray]) -> Path:
    """images/ + masks/ PNG pairs, one per mask (the images are plain gray)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, m in enumerate(masks):
        cv2.imwrite(str(root / "images" / f"s{i}.png"), np.full((*m.shape, 3), 90, np.uint8))
        cv2.imwrite(str(root / "masks" / f"s{i}.png"), m)
    return root


def disc(size: int, r: int, value: int = 255, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.zeros((size, size), np.uint8)
    cy, cx = rng.integers(r, size - r, 2)
    cv2.circle(m, (int(cx), int(cy)), r, value, -1)
    return m


def test_binary_masks_with_anti_aliased_edges_are_refused_with_the_threshold_fix(tmp_path):
    # 0/255 discs with blurred edges, as annotation tools export them: every mask holds values in between
    masks = [cv2.GaussianBlur(disc(96, 24, seed=i), (7, 7), 0) for i in range(4)]
    assert all(len(np.unique(m)) > 20 for m in masks)
    src = dataset(tmp_path / "aa", masks)
    with pytest.raises(UserError) as e:
        build_shards(src, tmp_path / "out", workers=1, progress=False)
    msg = str(e.value)
    assert msg.startswith("the masks look like binary masks with anti-aliased edges: 0 and 255 hold 8")
    assert "--mask-threshold 127" in msg and "--classes FILE" in msg and not (tmp_path / "out").exists()
    manifest = build_shards(src, tmp_path / "out", workers=1, progress=False, mask_threshold=127)
    assert (manifest["task"], manifest["num_classes"]) == ("binary", 2)


def test_a_void_value_covering_most_objects_and_too_many_inferred_classes_are_refused(tmp_path):
    objects = [np.maximum(disc(64, 20, seed=i), disc(64, 5, value=3, seed=i + 9)) for i in range(3)]  # 0, 3, 255
    with pytest.raises(UserError, match=r"255 would be void .* covers \d+ % of the non-zero pixels.*--void 255"):
        build_shards(dataset(tmp_path / "void", objects), tmp_path / "o1", workers=1, progress=False)

    sparse = [disc(64, 12, value=v, seed=i) for i, v in enumerate((100, 180, 100))]  # 3 values, ids up to 180
    with pytest.raises(UserError, match="go up to 180, which reads as 181 classes though only 3 distinct values"):
        build_shards(dataset(tmp_path / "many", sparse), tmp_path / "o2", workers=1, progress=False)

    few = [disc(64, 12, value=v, seed=i) for i, v in enumerate((1, 2, 5))]  # plain index masks still build
    assert build_shards(dataset(tmp_path / "few", few), tmp_path / "o3", workers=1, progress=False)["num_classes"] == 6
