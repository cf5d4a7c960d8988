"""segdist.shards.manifest: manifests, shard lists and ShardSet, local and over a real HTTP server."""

from __future__ import annotations

import http.server
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from functools import partial

import pytest

from segdist import shards
from segdist.errors import UserError
from segdist.shards.manifest import ANY_SPLIT, open_shards
from tests.buildutil import make_small_shards
from tests.conftest import REPO
from tests.shardutil import write_shards


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    return make_small_shards(tmp_path_factory.mktemp("small"))


# ----------------------------------------------------------------------------- reading manifests over HTTP
@pytest.fixture
def http_base(small_shards):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(small_shards))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_read_manifest_and_shard_lists_over_http_and_local(http_base, small_shards):
    local = shards.read_manifest(small_shards)
    assert shards.read_manifest(http_base) == local
    names = [s["name"] for s in local["splits"]["train"]["shards"]]
    assert shards.shard_urls(http_base, "train") == [http_base + n for n in names]
    assert shards.shard_urls(small_shards, "train") == [str(small_shards / n) for n in names]
    assert shards.shard_sizes(http_base, "train") == [6, 6, 6, 1]
    with pytest.raises(UserError, match="split 'test'"):
        shards.shard_urls(small_shards, "test")
    with pytest.raises(UserError, match="cannot fetch"):
        shards.read_manifest(http_base + "nowhere/")
    with pytest.raises(UserError, match="HTTP Error 404.*; check the URL and the server"):
        open_shards(http_base + "nothing-{000000..000001}.tar")  # a pattern of shards the server lacks


def test_a_folder_without_a_manifest_gets_the_command_that_fixes_it(small_shards, tmp_path):
    tar = next(small_shards.glob("*.tar"))
    with pytest.raises(UserError, match=re.escape(f"pass the shard folder that holds it ({small_shards}), not one")):
        shards.read_manifest(tar)
    with pytest.raises(UserError, match="pass a shard folder inside it, e.g. " + re.escape(str(small_shards))):
        shards.read_manifest(small_shards.parent)
    (tmp_path / "ds" / "images").mkdir(parents=True)
    with pytest.raises(UserError, match="looks like a dataset.*--out " + re.escape(f"{tmp_path / 'ds'}-shards")):
        shards.read_manifest(tmp_path / "ds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="build shards with `segdist shards build SRC"):
        shards.read_manifest(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(UserError, match="pass a shard folder, not a file"):
        shards.read_manifest(tmp_path / "notes.txt")


# ----------------------------------------------------------------------------- ShardSet
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("tiny") / "shards", {"train": [3, 2], "val": [2]}, size=16)


@pytest.fixture
def counting_server(tiny):
    """(base URL, GET count per path) of a real HTTP server that serves ``tiny``."""
    gets: Counter = Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tiny), **kwargs)

        def do_GET(self):
            gets[self.path] += 1
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", gets
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_shard_set_of_a_folder_equals_shard_urls_and_sizes(tiny):
    manifest = shards.read_manifest(tiny)
    for spec in (str(tiny), str(tiny / "manifest.json")):
        ss = open_shards(spec)
        assert (ss.spec, ss.task, ss.num_classes, ss.class_names) == (spec, "binary", 2, ["background", "foreground"])
        assert ss.manifest == manifest and list(ss.splits) == ["train", "val"]
        for split in ("train", "val"):
            assert ss.split(split) == (shards.shard_urls(tiny, split), shards.shard_sizes(tiny, split))
            entries = manifest["splits"][split]["shards"]
            assert ss.identity(split) == [shards.ShardId(e["samples"], e["bytes"], e["sha256"], None) for e in entries]
    assert ss.split("train")[1] == [3, 2]


def test_unknown_split_names_the_available_splits(tiny):
    ss = open_shards(str(tiny))
    with pytest.raises(UserError, match=r"no 'test' split \(have: train, val\)"):
        ss.split("test")
    with pytest.raises(UserError, match=r"no 'test' split \(have: train, val\)"):
        ss.identity("test")


@pytest.mark.parametrize("spec", ["", None])
def test_empty_spec_names_the_config_key(spec):
    with pytest.raises(UserError, match=r"config key 'data.shards' is empty; .*segdist shards build"):
        open_shards(spec)


def test_http_base_is_read_with_one_get_of_the_manifest(counting_server):
    base, gets = counting_server
    ss = open_shards(base)
    train, val = ss.split("train"), ss.split("val")
    ids = ss.identity("train")
    assert gets == {"/manifest.json": 1}  # no second read, and no shard fetched
    assert train == ([f"{base}/train-000000.tar", f"{base}/train-000001.tar"], [3, 2])
    assert val == ([f"{base}/val-000000.tar"], [2])
    assert [i.samples for i in ids] == [3, 2] and all(len(i.sha256) == 64 for i in ids)


def test_http_pattern_counts_each_shard_once_and_reads_the_manifest_beside_it(counting_server):
    base, gets = counting_server
    ss = open_shards(f"{base}/train-{{000000..000001}}.tar")
    assert (ss.manifest, ss.task, list(ss.splits)) == (None, "binary", [ANY_SPLIT])
    assert ss.split("train") == ss.split("anything") == (
        [f"{base}/train-000000.tar", f"{base}/train-000001.tar"], [3, 2])
    assert ss.identity("train") == [shards.ShardId(samples=3), shards.ShardId(samples=2)]  # no manifest entries
    assert gets == {"/manifest.json": 1, "/train-000000.tar": 1, "/train-000001.tar": 1}


def test_local_patterns_serve_every_split_and_take_classes_from_a_manifest_beside_them(tiny, tmp_path):
    urls = [str(tiny / "train-000000.tar"), str(tiny / "train-000001.tar")]
    for spec in (str(tiny / "train-*.tar"), "::".join(urls), urls[0]):
        ss = open_shards(spec)
        n = 1 if spec == urls[0] else 2
        assert ss.split("val") == ss.split("train") == (urls[:n], [3, 2][:n])
        assert (ss.task, ss.num_classes) == ("binary", 2)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(urls[0], bare)
    ss = open_shards(str(bare / "*.tar"))  # readable (bench, tests), but no task or classes to train on
    assert (ss.task, ss.num_classes, ss.split("train")) == (None, None, ([str(bare / "train-000000.tar")], [3]))
    with pytest.raises(UserError, match="matches no files"):
        open_shards(str(bare / "nothing-*.tar"))


def test_importing_the_manifest_module_loads_nothing_heavy():
    code = ("import sys, segdist.shards.manifest; "
            "print(sorted(m for m in ('cv2', 'numpy', 'PIL', 'torch', 'webdataset') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


def test_a_name_shared_with_a_submodule_is_the_function():
    # every exported name resolving: tests/test_architecture.py, for each package that loads names lazily
    assert callable(shards.discover)  # the function, not the submodule of the same name
