"""segdist.shards.discover: keys and the hash split."""

from __future__ import annotations

from pathlib import Path

import pytest

from segdist import shards
from segdist.errors import UserError
from segdist.shards.discover import _pairs_from_raw
from tests.buildutil import make_camvid_like
from tests.conftest import CLOTHING, require_dataset


def test_clothing_default_split_is_803_201():
    root = require_dataset(CLOTHING)
    found = shards.discover(images=root / "photos", masks=root / "masks")
    pairs, info = shards.assign_splits(found.pairs, 0.2, 42)
    assert info["method"] == "hash"
    assert sum(p.split == "train" for p in pairs) == 803 and sum(p.split == "val" for p in pairs) == 201


def test_keys_are_webdataset_safe_and_unique():
    assert shards.sanitize_key("a/b.c d") == "a_b_c_d"
    assert shards.sanitize_key("../../etc/passwd") == "etc_passwd"
    assert shards.sanitize_key("__key__") == "key"
    assert shards.sanitize_key("Ünïcödé") == "Unicode"
    long = shards.sanitize_key("x" * 200)
    assert len(long) <= shards.MAX_KEY_LEN and "." not in long
    pairs = _pairs_from_raw([("a.b", Path("/i1"), Path("/m1"), None), ("a_b", Path("/i2"), Path("/m2"), None),
                             ("a/b", Path("/i3"), Path("/m3"), None)], Path("/"))
    assert sorted(p.key for p in pairs) == ["a_b", "a_b_2", "a_b_3"]


@pytest.mark.parametrize("suffix", ["annot", "_labels", "anno"])
def test_segnet_layout_pairs_split_folders_with_their_mask_folders(tmp_path, suffix):
    root = make_camvid_like(tmp_path / "CamVid", counts=(("train", 3), ("val", 2), ("test", 2)), mask_suffix=suffix)
    found = shards.discover(root)
    assert found.kind == "split-folders" and not found.skipped
    assert {p.split for p in found.pairs} == {"train", "val", "test"}
    assert sum(p.split == "test" for p in found.pairs) == 2
    for p in found.pairs:  # matched by stem, each image with the mask of its own split
        image, mask = Path(p.image), Path(p.mask)
        assert image.name == mask.name and mask.parent.name == f"{image.parent.name}{suffix}"
    assert found.extra["splits"]["test"]["masks"].endswith(f"test{suffix}")


def test_segnet_layout_with_two_mask_folders_for_a_split_is_refused(tmp_path):
    root = make_camvid_like(tmp_path / "CamVid", counts=(("train", 2),))
    (root / "train_labels").mkdir()
    with pytest.raises(UserError, match="several mask folders for 'train'.*trainannot.*train_labels"):
        shards.discover(root)
