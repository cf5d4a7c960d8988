"""The one tar reader: member picking, header checks before reading, and each shard's identity as it streams."""

from __future__ import annotations

import io
import shutil
import tarfile

import pytest

from segdist.errors import UserError
from segdist.shards import ShardId, image_bytes, mask_bytes, open_shards, read_samples
from segdist.shards.reader import tar_samples
from tests.buildutil import make_small_shards
from tests.shardutil import write_shards


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Shards built by `segdist shards build` (the manifest lists every key's shard): train 6+6+6+1, val 5."""
    return make_small_shards(tmp_path_factory.mktemp("built"))


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_manifest_keys_are_each_shards_keys_in_file_order(built):
    ss = open_shards(str(built))
    for split in ("train", "val"):
        urls, sizes = ss.split(split)
        for url, n, ident in zip(urls, sizes, ss.identity(split), strict=True):
            samples = list(read_samples(url, ident))
            assert ident.keys == tuple(s["__key__"] for s in samples) and len(samples) == n == ident.samples
            assert all(image_bytes(s)[:4] in (b"\xff\xd8\xff\xe0", b"\x89PNG") for s in samples)
            assert all(mask_bytes(s)[:4] == b"\x89PNG" for s in samples)


def test_a_shard_swapped_for_another_of_the_same_count_fails_at_its_first_sample(built, tmp_path):
    """A train shard overwritten by another shard with the same sample count (e.g. a copy of its neighbour)."""
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    shutil.copy(copy / "train-000001.tar", copy / "train-000000.tar")
    ss = open_shards(str(copy))
    urls, _ = ss.split("train")
    samples = read_samples(urls[0], ss.identity("train")[0])
    with pytest.raises(UserError, match=r"train-000000.tar' holds sample '.*' where its manifest lists '.*': the shard "
                                        r"was replaced or rebuilt"):
        next(samples)


def test_same_keys_other_bytes_fail_when_the_shard_is_read_to_its_end(tmp_path):
    """Shards without key lists (no `sources`): a shard rebuilt with other pixels but the same keys and count is
    caught by the sha256 computed while it streams, naming it."""
    a = write_shards(tmp_path / "a", {"train": [3]}, size=16)
    b = write_shards(tmp_path / "b", {"train": [3]}, size=24)  # same keys, other bytes
    shutil.copy(b / "train-000000.tar", a / "train-000000.tar")
    ss = open_shards(str(a))
    (url,), (ident,) = ss.split("train")[0], ss.identity("train")
    assert ident.keys is None and ident.sha256
    with pytest.raises(UserError, match=r"train-000000.tar' differs from its manifest \(\d+ bytes, sha256 "):
        list(read_samples(url, ident))
    assert len(list(read_samples(url, ShardId(samples=3)))) == 3  # the count alone cannot tell


def test_members_are_judged_by_their_header_before_they_are_read(tmp_path):
    img = b"\x89PNG" + b"x" * 5000
    big = tmp_path / "big.tar"
    big.write_bytes(tar_of([("a.image.png", img), ("a.mask.png", b"\x89PNG")]))
    with pytest.raises(UserError, match=r"member 'a.image.png' is 0 MiB, over the 0 MiB limit \(data.max_member_mb\)"):
        list(read_samples(str(big), 1, max_member=1000))
    assert len(list(read_samples(str(big), 1, max_member=10_000))) == 1

    class Counting(io.BytesIO):
        got = 0

        def read(self, n=-1):
            data = super().read(n)
            Counting.got += len(data)
            return data

    stream = Counting(big.read_bytes())
    with pytest.raises(UserError, match="over the"):
        list(tar_samples(stream, "big.tar", max_member=1000))
    assert Counting.got < 4096  # the header block (and tarfile's first buffer), not the 5 kB member


@pytest.mark.parametrize("members,needle", [
    ([("a.image.png", b""), ("a.mask.png", b"\x89PNG")], "member 'a.image.png' is empty"),
    ([("../a.image.png", b"x"), ("../a.mask.png", b"x")], "member named '../a.image.png' that points outside"),
    ([("/etc/a.image.png", b"x")], "member named '/etc/a.image.png' that points outside"),
    ([("a.image.png", b"x"), ("a.image.png", b"y")], "member 'a.image.png' appears twice in sample 'a'"),
    ([("a.image.png", b"x"), ("a.txt", b"y")], r"sample 'a' .* has no mask \(members: image.png, txt\)"),
])
def test_bad_members_are_one_line_errors_naming_the_shard(tmp_path, members, needle):
    path = tmp_path / "bad.tar"
    path.write_bytes(tar_of(members))
    with pytest.raises(UserError, match=needle) as e:
        list(read_samples(str(path)))
    assert "bad.tar" in str(e.value)


def test_verify_reads_with_the_same_reader(built, tmp_path):
    """An oversized-member or escaping name is reported by `verify` too (one reader), as a problem line."""
    from segdist.shards import verify_shards

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    (copy / "val-000000.tar").write_bytes(tar_of([("../x.image.png", b"x"), ("../x.mask.png", b"y")]))
    problems = verify_shards(copy, workers=1, progress=False)
    assert any("val-000000.tar: unreadable tar after 0 samples" in p and "points outside" in p for p in problems)
