"""segdist.shards.discover: keys and the hash split."""

from __future__ import annotations

from pathlib import Path

from segdist import shards
from segdist.shards.discover import _pairs_from_raw
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
