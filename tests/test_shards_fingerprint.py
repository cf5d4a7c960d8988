"""Dataset identity: the fingerprint follows shard bytes and classes (not paths), and says what changed."""

from __future__ import annotations

import json
import shutil

import pytest

from segdist.errors import UserError
from segdist.shards import open_shards
from segdist.shards.fingerprint import check_disjoint, class_changes, data_changes, fingerprint
from tests.shardutil import write_shards


def test_the_fingerprint_is_the_shards_bytes_and_classes_not_their_place(shards, tmp_path):
    fp = fingerprint(open_shards(str(shards)))
    moved = shutil.copytree(shards, tmp_path / "moved")
    assert fingerprint(open_shards(str(moved))) == fp  # another folder, the same data
    assert fp["classes"]["names"] == ["background", "foreground"] and "weak" not in fp

    manifest = json.loads((moved / "manifest.json").read_text())
    train = manifest["splits"]["train"]["shards"]
    train[1]["sha256"] = "0" * 64  # rebuilt with other bytes
    dropped = train.pop()  # one shard fewer
    manifest["splits"]["val"]["shards"].append({**dropped, "name": "val-000009.tar"})  # one more
    manifest["class_names"] = ["background", "person"]
    (moved / "manifest.json").write_text(json.dumps(manifest))
    new = fingerprint(open_shards(str(moved)))
    assert new["digest"] != fp["digest"]
    assert data_changes(fp, new) == ["train: changed train-000001.tar, removed train-000002.tar",
                                     "val: added val-000009.tar"]
    assert class_changes(fp, new) == ["class 1 'foreground' -> 'person'"]
    assert data_changes(fp, fp) == [] and class_changes(fp, fp) == []


def test_train_and_val_must_not_share_a_shard_by_name_or_by_bytes(tmp_path):
    base = write_shards(tmp_path / "s", {"train": [2, 2], "val": [2]}, size=32)
    check_disjoint(open_shards(str(base)))
    manifest = json.loads((base / "manifest.json").read_text())
    copy = {**manifest["splits"]["train"]["shards"][0], "name": "val-000001.tar"}  # a train shard copied into val
    manifest["splits"]["val"]["shards"].append(copy)
    (base / "val-000001.tar").write_bytes((base / "train-000000.tar").read_bytes())
    (base / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="val-000001.tar serve.s. both train and val .* or the same bytes under two"):
        check_disjoint(open_shards(str(base)))
    with pytest.raises(UserError, match="the same files would serve as train and val"):
        check_disjoint(open_shards(str(base / "*.tar")))
    assert fingerprint(open_shards(str(base / "*.tar")))["weak"]  # a pattern: names and counts only
