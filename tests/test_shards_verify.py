"""segdist.shards.verify: verify catches damage; verify and info refuse what is not a shard folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from segdist import shards
from segdist.errors import UserError
from tests.buildutil import make_small_shards, run_cli


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- verify catches damage
@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    return make_small_shards(tmp_path_factory.mktemp("small"))


@pytest.fixture
def damaged(small_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_shards, copy)
    return copy


def test_verify_passes_on_a_clean_build(small_shards):
    assert shards.verify_shards(small_shards, workers=1, progress=False) == []
    m = shards.read_manifest(small_shards)
    assert {s: v["samples"] for s, v in m["splits"].items()} == {"train": 19, "val": 5}  # round(24 * 0.2) = 5


def test_verify_names_the_shard_with_a_flipped_byte(damaged):
    flip_byte(damaged / "train-000001.tar", 2000)
    problems = shards.verify_shards(damaged, workers=1, progress=False)
    assert problems and all(p.startswith("train-000001.tar") or p.startswith("split train") for p in problems)
    assert any("sha256" in p for p in problems)
    result = run_cli("shards", "verify", damaged)
    assert result.returncode == 1 and "train-000001.tar" in result.stdout and "Traceback" not in result.stderr


def test_verify_reports_missing_and_truncated_shards(damaged):
    (damaged / "val-000000.tar").unlink()
    data = (damaged / "train-000000.tar").read_bytes()
    (damaged / "train-000000.tar").write_bytes(data[: len(data) * 3 // 5])
    problems = shards.verify_shards(damaged, workers=2, progress=False)
    assert any(p.startswith("val-000000.tar: missing") for p in problems)
    assert any(p.startswith("train-000000.tar") and "bytes" in p for p in problems)
    assert any(p.startswith("train-000000.tar") and "samples" in p for p in problems)


def test_verify_and_info_reject_a_folder_without_manifest(tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        shards.verify_shards(tmp_path)
    result = run_cli("shards", "info", tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr

