"""``segdist bench data --remote s3://BUCKET/PREFIX/``: shards streamed from object storage against a raw
client GET of the same objects and against the same shards on local disk, in one run.

Decoding is off: what is measured is getting shard bytes into samples. One *epoch* reads every
shard of the split once, spread over ``--workers`` processes as the loader spreads shards over its
slots (shard ``i`` to process ``i % W``). The modes take turns, epoch by epoch, until each has run
for ``--min-seconds``, so a drift in the machine's load hits them alike:

* **local** -- :func:`segdist.stream.read_samples` over the local shard files (tar parsed, counts checked);
* **s3** -- the same over the ``s3://`` URLs: :mod:`segdist.storage`'s buffered, resumable reader, no cache;
* **raw GET** -- boto3 ``get_object`` of the same objects, body read in 1 MiB pieces and dropped: the
  ceiling for any reader through this client, endpoint and network;
* **cache** -- the s3 URLs through a fresh ``data.cache_dir``: its first epoch fetches every shard
  (cold), the next ones read the node's copies after one HEAD each (warm).

The local shards are uploaded to the prefix first (``manifest.json`` last) unless it already holds
the same set (same shard names and sha256); a prefix holding another set is refused.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from .. import storage
from ..storage import s3
from ..errors import UserError
from ..shards import MANIFEST, open_shards, read_samples
from .common import MB, BenchArgs, build_bench_shards, check_args, cpu_model, source_csv
from .course import read_course_csv

SAMPLES_PER_SHARD = 32
"""Shards the bench builds hold this many samples: enough shards that every worker has several."""


def _read_share(task: tuple) -> tuple[int, float]:
    """One worker's part of an epoch: ``(samples, seconds)``."""
    urls, sizes, raw, cache_dir = task
    storage.configure(cache_dir=cache_dir)
    t0, samples = time.perf_counter(), 0
    for url, n in zip(urls, sizes):
        if raw:
            _raw_get(url)
            samples += n
        else:
            samples += sum(1 for _ in read_samples(url, n))
    return samples, time.perf_counter() - t0


def _raw_get(url: str) -> int:
    loc = s3.parse(url)
    body = s3.client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
    n = 0
    while chunk := body.read(1 << 20):
        n += len(chunk)
    return n


def _same_set(local: dict, remote: dict) -> bool:
    def names(m: dict) -> list[tuple[str, str]]:
        return sorted((s["name"], s.get("sha256", "")) for sp in m["splits"].values() for s in sp.get("shards", []))

    return names(local) == names(remote)


def ensure_uploaded(local_dir: str, remote: str) -> str:
    """``remote`` holding the shard set of ``local_dir`` (uploaded now unless it is there already)."""
    local = open_shards(local_dir).manifest
    try:
        there = open_shards(remote).manifest
    except storage.NoBucket:
        raise
    except storage.NotFound:
        there = None
    if there is not None and not _same_set(local, there):
        raise UserError(f"{remote} holds another shard set; pass an empty prefix for the bench (it uploads its "
                        f"shards there)")
    if there is None:
        names = [s["name"] for sp in local["splits"].values() for s in sp.get("shards", [])]
        storage.upload(local_dir, names, remote, MANIFEST)
    return remote


def run_remote_bench(args: BenchArgs, remote: str) -> dict:
    """Measure local, s3, raw GET and cache epochs of the same shards; the dict ``--json`` prints."""
    check_args(args)
    if not storage.is_remote(remote):
        raise UserError(f"--remote must be an s3://BUCKET/PREFIX/ URL, got '{remote}'")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="segdist-bench-") as tmp:
        if args.shards:
            local_dir = args.shards
        else:
            rows = read_course_csv(source_csv(args.source), args.limit)
            local_dir = str(build_bench_shards(rows, Path(tmp) / "shards", args.max_side, max(args.workers, 1),
                                               samples_per_shard=SAMPLES_PER_SHARD))
        ensure_uploaded(local_dir, remote)
        local, there = open_shards(local_dir), open_shards(remote)
        urls, sizes = local.split(args.split)
        rurls, _ = there.split(args.split)
        nbytes = sum(os.path.getsize(u) for u in urls)
        nwk = max(args.workers, 1)

        def tasks(u: list[str], raw: bool = False, cache_dir: str = "") -> list[tuple]:
            return [(u[w::nwk], sizes[w::nwk], raw, cache_dir) for w in range(nwk)]

        cache_dir = str(Path(tmp) / "cache")
        modes = {"local": tasks(urls), "s3": tasks(rurls), "raw": tasks(rurls, raw=True),
                 "cache": tasks(rurls, cache_dir=cache_dir)}
        seconds = dict.fromkeys(modes, 0.0)
        epochs = dict.fromkeys(modes, 0)
        cold_s = 0.0
        before = storage.stats.snapshot()
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with ctx.Pool(nwk) as pool:
            pool.map(_read_share, tasks(urls[:nwk]), chunksize=1)  # workers started, imports done
            t0 = time.perf_counter()
            cold_s = _timed(pool, modes["cache"])  # the cache's first epoch fetches every shard
            while min(seconds.values()) < args.min_seconds or not all(epochs.values()):
                for mode, work in modes.items():
                    seconds[mode] += _timed(pool, work)
                    epochs[mode] += 1
                if time.perf_counter() - t0 > 20 * max(args.min_seconds, 1):  # a very slow store: enough
                    break
        after = storage.stats.snapshot()
    mb_s = {m: nbytes * epochs[m] / MB / seconds[m] for m in modes}
    epoch_s = {m: seconds[m] / epochs[m] for m in modes}
    return {
        "local_mb_s": round(mb_s["local"], 1), "s3_mb_s": round(mb_s["s3"], 1), "raw_get_mb_s": round(mb_s["raw"], 1),
        "cache_warm_mb_s": round(mb_s["cache"], 1),
        "s3_vs_raw_get": round(mb_s["s3"] / mb_s["raw"], 3),
        "s3_epoch_vs_local": round(epoch_s["s3"] / epoch_s["local"], 3),
        "epoch_s": {m: round(v, 3) for m, v in epoch_s.items()} | {"cache_cold": round(cold_s, 3)},
        "epochs": epochs, "samples": sum(sizes), "num_shards": len(urls), "mb": round(nbytes / MB, 2),
        "workers": nwk, "split": args.split, "remote": remote,
        "shards": args.shards or f"built on the fly (jpeg q95, max_side {args.max_side}, {SAMPLES_PER_SHARD}/shard)",
        "retries": after["retries"] - before["retries"],
        "cpus": os.cpu_count(), "cpu": cpu_model(),
        "load_avg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }


def _timed(pool, work: list[tuple]) -> float:
    t0 = time.perf_counter()
    pool.map(_read_share, work, chunksize=1)
    return time.perf_counter() - t0


def format_remote_table(r: dict) -> str:
    e = r["epoch_s"]
    rows = [("local disk (read_samples)", r["local_mb_s"], e["local"]),
            ("s3 stream (read_samples)", r["s3_mb_s"], e["s3"]),
            ("s3 raw GET (boto3, bytes only)", r["raw_get_mb_s"], e["raw"]),
            ("s3 through a warm cache", r["cache_warm_mb_s"], e["cache"])]
    lines = [(f"segdist bench data --remote {r['remote']}: {r['samples']} samples in {r['num_shards']} shards "
             f"({r['mb']} MB), {r['workers']} workers, decode off, {r['cpus']} CPUs, load "
             f"{r['load_avg_1m']['before']} -> {r['load_avg_1m']['after']}"),
             f"{'reader':<32} {'MB/s':>8} {'epoch s':>9} {'epochs':>7}"]
    for (name, mb_s, epoch), n in zip(rows, r["epochs"].values()):
        lines.append(f"{name:<32} {mb_s:>8.1f} {epoch:>9.3f} {n:>7}")
    lines.append(f"s3 stream / raw GET {r['s3_vs_raw_get']:.2f} (goal >= 0.7); s3 epoch / local epoch "
                 f"{r['s3_epoch_vs_local']:.2f} (goal <= 1.5); cache cold epoch {e['cache_cold']:.3f} s; "
                 f"{r['retries']:.0f} retries")
    return "\n".join(lines)
