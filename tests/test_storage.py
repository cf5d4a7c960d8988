"""``s3://`` shards against a real S3 endpoint on 127.0.0.1 (moto's server behind a fault-injecting
middleware, tests/s3util.py): the same samples in the same order as the local folder, every
network fault survived with a resumed ranged GET, one-line errors when retries run out or the
input is wrong, uploads that write the manifest last, and 2-process training through faults.

botocore's own retries are off in segdist's client; the cases where botocore would not have
retried at all (a body cut short, a stall after the headers) are shown failing with a plain
boto3 client first.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import webdataset as wds

from segdist import storage
from segdist.cli import main
from segdist.errors import UserError
from segdist.shards import open_shards
from segdist.shards import read_samples
from tests.cliutil import alive
from tests.conftest import REPO
from tests.s3util import client, env_for, s3_server, store, upload_dir  # noqa: F401 (s3_server, store: fixtures)
from tests.shardutil import UNEVEN, keys_of, rank_loader


@pytest.fixture(scope="module")
def remote(s3_server, shards) -> str:
    """The standard test shard set (train and val: 7, 5, 2 samples) under s3://data/set/."""
    return upload_dir(client(s3_server.url), shards, "data", "set")


@pytest.fixture(scope="module")
def big(s3_server, tmp_path_factory) -> tuple[str, Path]:
    """One 1.2 MB shard of 4 samples (random bytes: the tar reader does not decode), local and in the bucket:
    large enough that a stall or a cut lands past the first read-ahead chunk."""
    import numpy as np

    path = tmp_path_factory.mktemp("big") / "big-000000.tar"
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as w:
        for i in range(4):
            w.write({"__key__": f"big_{i}", "image.png": rng.bytes(300_000), "mask.png": rng.bytes(1000)})
    client(s3_server.url).put_object(Bucket="data", Key="big/big-000000.tar", Body=path.read_bytes())
    return "s3://data/big/big-000000.tar", path


def samples_of(url: str, n: int | None = None, **kw) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in read_samples(url, n, **kw)]


# ----------------------------------------------------------------------------- the same data
def test_prefix_manifest_url_glob_and_brace_name_the_same_shards(store, remote, shards):
    local = open_shards(str(shards))
    names = {split: [u.rsplit("/", 1)[1] for u in local.split(split)[0]] for split in ("train", "val")}
    for spec in (remote, remote.rstrip("/"), remote + "manifest.json"):
        s = open_shards(spec)
        for split in ("train", "val"):
            urls, sizes = s.split(split)
            assert urls == [remote + n for n in names[split]] and sizes == local.split(split)[1]
    assert open_shards(remote + "train-*.tar").split("any") == open_shards(remote).split("train")
    assert open_shards(remote + "train-{000000..000001}.tar").split("any")[1] == UNEVEN[:2]
    assert storage.glob(remote + "*-00000[!1].tar") == [remote + n for n in
                                                        ("train-000000.tar", "train-000002.tar", "val-000000.tar",
                                                         "val-000002.tar")]
    assert storage.glob("s3://data/**/val-000001.tar") == [remote + "val-000001.tar"]


def test_listing_paginates(store):
    c = client(store.url)
    for i in range(23):
        c.put_object(Bucket="data", Key=f"many/x-{i:03d}.tar", Body=b"x")
    storage.configure(list_page_size=5)
    store.faults.reset()
    assert len(list(storage.list_objects("s3://data/many/"))) == 23
    assert store.faults.count("GET", "") == 5  # ceil(23 / 5) listing requests
    assert len(storage.glob("s3://data/many/x-01?.tar")) == 10


def test_train_val_and_resume_stream_what_the_local_folder_streams(store, remote, shards):
    """2 ranks x 2 workers: per rank the same keys in the same order for a training epoch, for val
    (each sample once over the ranks) and for a mid-epoch resume; each read is one GET."""
    for rank in (0, 1):
        for kw in ({"train": True, "epoch": 1}, {"train": False}, {"train": True, "epoch": 1, "start_batch": 1}):
            want = keys_of(rank_loader(shards, rank, 2, 2, **kw))
            assert keys_of(rank_loader(remote, rank, 2, 2, **kw)) == want and want
    gets = [g for g in store.faults.gets if g["key"].endswith(".tar")]
    assert gets and all(g["range"] is None and not g["fault"] for g in gets)


# ----------------------------------------------------------------------------- faults
@pytest.mark.parametrize("fault", ["slowdown", "reset", "truncate", "stall", "outage"])
def test_each_fault_is_retried_and_the_read_resumes_from_the_byte_reached(store, big, fault):
    url, path = big
    want = samples_of(str(path), 4)
    store.faults.stall_s, store.faults.outage_s = 2.0, 1.0
    if fault in ("truncate", "stall"):  # what botocore alone does with these: it does not retry a body
        store.faults.reset([fault])
        import botocore.config
        import botocore.exceptions as bx

        loc = storage.s3.parse(url)
        plain = client(store.url, botocore.config.Config(read_timeout=1))  # botocore's default retries on
        with pytest.raises((bx.ResponseStreamingError, bx.IncompleteReadError, bx.ReadTimeoutError)):
            plain.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
    store.faults.reset([fault])
    retries = storage.stats.snapshot()["retries"]
    assert samples_of(url, 4, read_timeout=1) == want
    first, again = store.faults.gets[:2]
    assert first["fault"] == fault and not again["fault"] and len(store.faults.gets) == 2
    assert storage.stats.snapshot()["retries"] - retries >= 1
    if fault in ("truncate", "stall"):  # half the body had arrived: the next GET starts where it stopped
        offset = int(re.fullmatch(r"bytes=(\d+)-", again["range"]).group(1))
        assert 0 < offset <= path.stat().st_size // 2
        assert again["if_match"] == storage.s3.head(url)[0]  # pinned to the version being read
    else:  # nothing had arrived: the whole object again
        assert again["range"] is None


def test_an_object_replaced_mid_read_is_an_error_not_a_mix(store, big):
    url, path = big
    c, loc = client(store.url), storage.s3.parse(url)
    c.put_object(Bucket="data", Key="big/replaced.tar", Body=path.read_bytes())
    store.faults.reset(["stall"])
    store.faults.stall_s = 3.0
    with storage.objects.open_object("s3://data/big/replaced.tar", read_timeout=1) as f:
        assert f.read(1000) == path.read_bytes()[:1000]
        c.put_object(Bucket=loc.bucket, Key="big/replaced.tar", Body=b"another version")  # during the stall
        with pytest.raises(storage.Changed, match=r"^s3://data/big/replaced.tar changed while it was read "
                                                  r"\(.*\) at byte [1-9]\d*; shards must not be replaced"):
            f.read()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("after", ["reset", "hang"])
def test_retries_exhausted_fail_in_bounded_time_naming_url_and_offset(store, remote, shards, after):
    """A store that stops answering mid-shard (every retry reset, or headers and then silence): one line
    naming URL, byte offset and cause within 10 s from a loader with 2 workers, and no worker left behind.
    (Which worker fails first varies: its offset is where its own read stood.)"""
    storage.configure(retries=3, retry_backoff=0.1)
    store.faults.reset(["truncate"], after=after)
    store.faults.stall_s = 30.0  # longer than the whole test may take: only the read timeout ends it
    me = psutil.Process()
    before = {p.pid for p in me.children()}  # e.g. a forkserver an earlier test of this process started
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        keys_of(rank_loader(remote, 0, 1, 2, train=False, read_timeout=1))
    elapsed = time.monotonic() - t0
    message = str(e.value)
    assert elapsed < 10, elapsed
    assert "\n" not in message
    cause = "connection closed before a response" if after == "reset" else r"no data for 1 s \(data.read_timeout\)"
    assert re.fullmatch(rf"reading s3://data/set/val-00000\d\.tar failed at byte \d+( of \d+)? after 3 retries "
                        rf"in [\d.]+ s \(last: {cause}; endpoint {store.url}\); check the network and the store, or "
                        rf"raise data.retries", message), message
    def workers() -> list:
        return [p for p in me.children() if p.pid not in before]

    deadline = time.monotonic() + 5
    while workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not workers()


# ----------------------------------------------------------------------------- bad input
def one_line_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "testing" not in err  # the test credentials: never in a message
    return err


def test_bad_buckets_keys_endpoints_and_credentials_are_one_line(store, remote, capsys, monkeypatch, tmp_path):
    c = client(store.url)
    c.put_object(Bucket="data", Key="bare/a-000000.tar", Body=b"x")
    err = one_line_error(capsys, "shards", "info", "s3://no-such-bucket/set/")
    assert "bucket 'no-such-bucket' does not exist at http://127.0.0.1" in err
    err = one_line_error(capsys, "shards", "info", "s3://data/nothing-here/")
    assert "s3://data/nothing-here/ has no manifest.json: nothing is stored under it" in err
    err = one_line_error(capsys, "shards", "info", "s3://data/bare/")
    assert "it holds 1 .tar objects: pass a pattern such as s3://data/bare/*.tar" in err
    with pytest.raises(UserError, match=r"^s3://data/set/train-000008.tar not found at http://127.0.0.1:\d+; check"):
        open_shards(remote + "train-{000008..000009}.tar")
    with pytest.raises(UserError, match=r"^shard pattern 's3://data/set/nope-\*.tar' matches no files"):
        open_shards(remote + "nope-*.tar")
    with pytest.raises(UserError, match=r"^config key 'data.cache_limit' must be a size like 50GB"):
        from segdist.config import load_config

        load_config(None, ["data.cache_limit=10 parsecs"])

    storage.configure(endpoint_url="not a url")
    err = one_line_error(capsys, "shards", "info", remote)
    assert "cannot set up the S3 client" in err and "data.endpoint_url" in err

    storage.configure(endpoint_url="http://127.0.0.1:9", retries=1)  # nothing listens on port 9
    err = one_line_error(capsys, "shards", "info", remote)
    assert re.search(r"s3://data/set/manifest.json failed at byte 0 after 1 retries in [\d.]+ s \(last: cannot "
                     r"connect to the endpoint; endpoint http://127.0.0.1:9\)", err), err

    storage.configure(endpoint_url=store.url)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    storage.s3._clients.clear()  # a new client resolves credentials again
    try:
        err = one_line_error(capsys, "shards", "info", remote)
        assert "no usable credentials for s3://data/set/manifest.json: set AWS_PROFILE" in err
        monkeypatch.setenv("AWS_PROFILE", "nobody")
        storage.s3._clients.clear()
        err = one_line_error(capsys, "shards", "info", remote)
        assert "cannot set up the S3 client: The config profile (nobody) could not be found" in err
    finally:
        storage.s3._clients.clear()


# ----------------------------------------------------------------------------- writing
def test_upload_and_build_write_the_manifest_last(store, shards, tmp_path, capsys):
    from segdist.synth import make_synthetic

    store.faults.reset(["slowdown", "reset"], methods=("PUT",))  # the first two shard PUTs fail once each
    assert main(["shards", "upload", str(shards), "s3://data/up/", "--endpoint-url", store.url]) == 0
    writes = [(m, k) for m, k in store.faults.log if m in ("PUT", "DELETE") and k]
    assert writes[0] == ("DELETE", "up/manifest.json") and writes[-1] == ("PUT", "up/manifest.json")
    tars = sorted(f"up/{p.name}" for p in shards.glob("*.tar"))
    assert sorted({k for _, k in writes[1:-1]}) == tars and len(writes[1:-1]) == len(tars) + 2
    assert open_shards("s3://data/up/").split("val") == (
        [f"s3://data/up/{n}" for n in ("val-000000.tar", "val-000001.tar", "val-000002.tar")], UNEVEN)

    make_synthetic(tmp_path / "syn", n=10, size=32, seed=1)
    store.faults.reset()
    assert main(["shards", "build", str(tmp_path / "syn"), "--out", "s3://data/built/", "--workers", "1",
                 "--endpoint-url", store.url]) == 0
    assert store.faults.log[-1] == ("PUT", "built/manifest.json")
    built = open_shards("s3://data/built/")
    assert sum(sum(built.split(s)[1]) for s in built.splits) == 10
    err = one_line_error(capsys, "shards", "build", str(tmp_path / "syn"), "--out", "s3://no-bucket/x/",
                         "--endpoint-url", store.url)
    assert "bucket 'no-bucket' does not exist" in err


def test_bench_data_remote_reports_stream_raw_get_local_and_cache(store, shards, capsys):
    argv = ["bench", "data", "--remote", "s3://data/bench/", "--shards", str(shards), "--min-seconds", "0", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["num_shards"] == 3 and r["samples"] == sum(UNEVEN) and r["retries"] == 0
    assert all(r[k] > 0 for k in ("local_mb_s", "s3_mb_s", "raw_get_mb_s", "cache_warm_mb_s", "s3_vs_raw_get"))
    assert store.faults.log[-1] != ("PUT", "bench/manifest.json") and ("PUT", "bench/manifest.json") in store.faults.log
    store.faults.reset()
    assert main(argv[:-1]) == 0  # the same set is there: nothing uploaded again; the table
    assert not [m for m, _ in store.faults.log if m == "PUT"]
    assert "s3 stream / raw GET" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 2 processes
LAUNCH = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def train_args(shards: str, out: Path, *extra: str) -> list[str]:
    return ["tests/scripts/record_keys_train.py", f"data.shards={shards}", "data.image_size=32", "data.batch_size=2",
            "data.num_workers=2", "model.pretrained=none", "train.epochs=2", "train.name=run", "track.backend=none",
            "train.overlays=0", f"train.out_dir={out}", *extra]


def keys_by_epoch(run: Path) -> dict:
    out = {}
    for rank in (0, 1):
        for line in (run / f"keys-rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out.setdefault((rank, rec["epoch"]), []).extend(rec["keys"])
    return out


def epoch_records(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("event") == "epoch"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_two_process_training_through_faults_trains_what_the_local_folder_trains(store, remote, shards, tmp_path):
    """2 processes x 2 workers from s3:// through 3 bodies cut short, 2 SlowDowns and a 2 s outage: per
    epoch and rank the same keys in the same order as from the local folder, the same val IoU, and the
    retries in the run's metrics."""
    local = subprocess.run([*LAUNCH, *train_args(str(shards), tmp_path / "local")], cwd=REPO, check=False,
                           env=env_for(store), capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    store.faults.reset(["", "truncate", "slowdown", "", "truncate", "", "slowdown", "truncate", "outage"])
    remote_run = subprocess.run([*LAUNCH, *train_args(remote, tmp_path / "s3", "data.retries=8",
                                                      "data.retry_backoff=0.1", "data.read_timeout=5")],
                                cwd=REPO, check=False, env=env_for(store), capture_output=True, text=True, timeout=300)
    assert remote_run.returncode == 0, remote_run.stderr[-3000:]
    assert not store.faults.plan and [f for _, f, _ in store.faults.injected] == [
        "truncate", "slowdown", "truncate", "slowdown", "truncate", "outage"]
    want, got = keys_by_epoch(tmp_path / "local" / "run"), keys_by_epoch(tmp_path / "s3" / "run")
    assert got == want and set(want) == {(r, e) for r in (0, 1) for e in (0, 1)}
    a, b = epoch_records(tmp_path / "local" / "run"), epoch_records(tmp_path / "s3" / "run")
    assert [r["val_iou"] for r in b] == pytest.approx([r["val_iou"] for r in a], abs=1e-6)
    assert sum(r["storage/retries"] for r in b) >= 6 and sum(r["storage/retry_s"] for r in b) > 1.0
    assert "storage retries" in remote_run.stdout


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_process_run_whose_store_stops_answering_fails_on_every_rank(store, remote, tmp_path):
    """Every shard GET throttled for good: each rank prints the one line (URL, offset, cause) within 10 s of
    the first failure, the launch exits non-zero and no process is left."""
    store.faults.reset([], after="slowdown")
    cmd = [*LAUNCH, *train_args(remote, tmp_path, "data.retries=3", "data.retry_backoff=0.2")]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env_for(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    tree, seen = psutil.Process(launcher.pid), {}
    t0 = time.monotonic()
    while launcher.poll() is None and time.monotonic() - t0 < 200:
        with contextlib.suppress(psutil.NoSuchProcess):
            seen.update((p.pid, p) for p in tree.children(recursive=True))
        time.sleep(0.1)
    ended = time.monotonic()
    out, err = launcher.communicate(timeout=30)
    assert launcher.returncode != 0
    assert store.faults.injected, err[-3000:]
    assert ended - store.faults.injected[0][0] < 10  # it took 3.6 s on 2 cores, the launcher's teardown included
    lines = [x for x in (out + err).splitlines() if "failed at byte" in x]
    assert len(lines) == 2, err[-3000:]  # one per rank
    assert all(re.search(r"reading s3://data/set/train-00000\d\.tar failed at byte 0 after 3 retries in "
                         r"[\d.]+ s \(last: 503 SlowDown; endpoint http://127.0.0.1:\d+\)", x) for x in lines), lines
    assert len(seen) >= 4  # 2 ranks and their workers were seen
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and alive(seen.values()):
        time.sleep(0.2)
    assert not alive(seen.values()), [p.cmdline() for p in alive(seen.values())]
