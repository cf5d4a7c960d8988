"""Stream invariants: equal batches per rank, val exactly once, determinism, resume, http."""

from __future__ import annotations

import functools
import http.server
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from segdist.errors import UserError
from tests.shardutil import make_loader
from segdist.shards import open_shards
from segdist.stream import ShardStream, batches_per_epoch, plan_epoch, shuffle
from tests.shardutil import UNEVEN, keys_of, rank_loader, sample_bytes


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 3), (3, 8), (4, 2)])
def test_plans_equal_train_batches_and_exact_val_partition(world, workers):
    for sizes in ([7, 5, 2], [1], [30, 1, 1, 1], [4] * 9):
        plans = plan_epoch(sizes, batch_size=2, world_size=world, workers=workers, seed=3, epoch=1, train=True)
        nwk = max(workers, 1)
        per_rank = [sum(p.num_batches for p in plans[r * nwk:(r + 1) * nwk]) for r in range(world)]
        assert per_rank == [batches_per_epoch(sizes, 2, world)] * world
        val = plan_epoch(sizes, batch_size=2, world_size=world, workers=workers, seed=3, epoch=1, train=False)
        covered = Counter((u.shard, i) for p in val for u in p.units for i in range(u.part, sizes[u.shard], u.parts))
        assert sorted(covered) == [(s, i) for s, n in enumerate(sizes) for i in range(n)]
        assert set(covered.values()) == {1}


@pytest.mark.parametrize("workers", [0, 2])
def test_val_over_ranks_visits_every_key_once(shards, workers):
    keys = [k for r in range(2) for k in keys_of(rank_loader(shards, r, 2, workers, train=False))]
    assert len(keys) == sum(UNEVEN) and len(set(keys)) == sum(UNEVEN)


@pytest.mark.parametrize("workers", [0, 2])
def test_train_ranks_yield_equal_full_batches(shards, workers):
    counts = []
    for r in range(2):
        loader = rank_loader(shards, r, 2, workers, train=True, batch_size=3)
        batches = list(loader)
        assert all(b["image"].shape == (3, 3, 32, 32) for b in batches)
        assert len(batches) == len(loader)
        counts.append(len(batches))
    assert counts[0] == counts[1] == batches_per_epoch(UNEVEN, 3, 2)


def test_same_seed_same_order_other_seed_or_epoch_differs(shards):
    a = keys_of(rank_loader(shards, 0, 1, 2, train=True, seed=5))
    b = keys_of(rank_loader(shards, 0, 1, 2, train=True, seed=5))
    c = keys_of(rank_loader(shards, 0, 1, 2, train=True, seed=6))
    d = keys_of(rank_loader(shards, 0, 1, 2, train=True, seed=5, epoch=1))
    assert a == b
    assert a != c and a != d


@pytest.mark.parametrize("workers,skip", [(0, 3), (2, 1), (2, 2), (3, 4)])
def test_resume_yields_exactly_the_remaining_batches(shards, workers, skip):
    full = [b["key"] for b in rank_loader(shards, 1, 2, workers, train=True, seed=1, epoch=2, batch_size=1)]
    rest = [b["key"] for b in rank_loader(shards, 1, 2, workers, train=True, seed=1, epoch=2, batch_size=1,
                                          start_batch=skip)]
    assert rest == full[skip:]


def test_decoded_pixels_match_what_was_written(shards):
    import cv2

    batch = next(iter(rank_loader(shards, 0, 1, 0, train=False, batch_size=4)))
    for key, img, mask in zip(batch["key"], batch["image"], batch["mask"]):
        i = int(key.split("_")[1])
        png_img, png_mask = sample_bytes(i, 32)
        want_img = cv2.cvtColor(cv2.imdecode(np.frombuffer(png_img, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        want_mask = cv2.imdecode(np.frombuffer(png_mask, np.uint8), cv2.IMREAD_UNCHANGED)
        assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(want_img))
        assert torch.equal(mask, torch.from_numpy(want_mask))
    assert batch["image"].dtype == torch.uint8 and batch["mask"].dtype == torch.uint8


def test_http_stream_equals_local(shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls, sizes = open_shards(base).split("val")
        assert urls[0].startswith("http://127.0.0.1")
        remote = list(make_loader(urls, sizes, batch_size=4, image_size=32, train=False, pin_memory=False))
        local = list(rank_loader(shards, 0, 1, 0, train=False, batch_size=4))
        assert [b["key"] for b in remote] == [b["key"] for b in local]
        assert all(torch.equal(r["image"], l["image"]) and torch.equal(r["mask"], l["mask"])
                   for r, l in zip(remote, local))
    finally:
        server.shutdown()


def test_brace_pattern_and_glob(shards):
    urls, sizes = open_shards(str(shards / "train-{000000..000002}.tar")).split("train")
    assert sizes == UNEVEN
    urls2, sizes2 = open_shards(str(shards / "train-*.tar")).split("train")
    assert urls2 == urls and sizes2 == sizes


def test_shuffle_buffer_is_a_permutation():
    items = [{"__key__": str(i)} for i in range(50)]
    out = list(shuffle(iter(items), 8, np.random.default_rng(0)))
    assert sorted(int(s["__key__"]) for s in out) == list(range(50))
    assert [s["__key__"] for s in out] != [s["__key__"] for s in items]


def test_too_small_for_batch_is_a_user_error(shards):
    with pytest.raises(UserError, match="batch_size"):
        ShardStream(["x"], [3], batch_size=4, image_size=32, train=True)


def test_pipe_command_shards_equal_local(shards):
    path = shards / "val-000000.tar"
    urls, sizes = open_shards(f"pipe:cat {path}").split("val")
    assert urls == [f"pipe:cat {path}"] and sizes == [UNEVEN[0]]
    piped = list(make_loader(urls, sizes, batch_size=4, image_size=32, train=False, num_workers=1, pin_memory=False))
    local = list(make_loader([str(path)], sizes, batch_size=4, image_size=32, train=False, pin_memory=False))
    assert [b["key"] for b in piped] == [b["key"] for b in local]
    assert all(torch.equal(p["image"], q["image"]) for p, q in zip(piped, local))


# ------------------------------------------------------------------ elastic resume
def elastic_stream(shards, world, workers, batch, carry=()):
    urls, sizes = open_shards(str(shards)).split("train")
    return ShardStream(urls, sizes, batch_size=batch, image_size=32, train=True, seed=3, world_size=world,
                       num_workers=workers, shuffle_buffer=4, carry=carry, carry_epoch=1 if carry else None)


def trained_keys(stream, epoch, stop=None):
    """Keys every rank of ``stream`` trains in ``epoch`` (in its first ``stop`` batches), decoded for
    real, and each rank's batch count."""
    import copy

    keys, per_rank = Counter(), []
    for rank in range(stream.world_size):
        s = copy.copy(stream)
        s.rank = rank
        batches = [list(s.slot_batches(epoch, w))[:None if stop is None else s.delivered(w, stop)]
                   for w in range(s.workers)]
        per_rank.append(sum(len(b) for b in batches))
        keys.update(k for b in batches for _, _, ks, _ in b for k in ks)
    return keys, per_rank


@pytest.mark.parametrize("old,new,stop", [((2, 2, 2), (1, 0, 2), 2), ((2, 1, 3), (3, 2, 2), 1),
                                          ((1, 0, 4), (2, 3, 1), 2), ((3, 2, 1), (2, 1, 5), 2)])
def test_an_elastic_resume_trains_the_rest_of_the_epoch_exactly_once(shards, old, new, stop):
    """(world, workers, batch) change mid-epoch: what the old ranks trained plus what the new ranks
    train is the epoch's plan, each sample exactly once; every new rank yields as many batches."""
    before = elastic_stream(shards, *old)
    plan, _ = trained_keys(before, 1)
    taken, _ = trained_keys(before, 1, stop)
    after = elastic_stream(shards, *new, carry=({"plan": before.plan(), "batch": stop},))
    rest, per_rank = trained_keys(after, 1)
    assert after.dropped == 0 and 0 < sum(taken.values()) < sum(plan.values())
    assert taken + rest == plan
    assert len(set(per_rank)) == 1 and per_rank[0] == after.num_batches(1)
    # the epochs after the interrupted one follow the new plan as if nothing had happened
    assert trained_keys(after, 2)[0] == trained_keys(elastic_stream(shards, *new), 2)[0]


def test_elastic_resumes_chain(shards):
    """Interrupted twice in one epoch, each time resumed with another layout: still exactly once."""
    first = elastic_stream(shards, 2, 2, 2)
    seg1 = {"plan": first.plan(), "batch": 2}
    second = elastic_stream(shards, 1, 1, 3, carry=(seg1,))
    seg2 = {"plan": second.plan(), "batch": 1}
    third = elastic_stream(shards, 2, 0, 1, carry=(seg1, seg2))
    parts = [trained_keys(first, 1, 2)[0], trained_keys(second, 1, 1)[0], trained_keys(third, 1)[0]]
    assert all(sum(p.values()) for p in parts)
    assert parts[0] + parts[1] + parts[2] == trained_keys(first, 1)[0]


@pytest.mark.parametrize("n,world,workers,batch", [(13, 2, 3, 4), (5, 3, 1, 8), (7, 1, 2, 1), (2, 3, 1, 4),
                                                   (9, 2, 1, 1)])
def test_spread_gives_every_rank_as_many_nonempty_batches_and_each_ref_once(n, world, workers, batch):
    from segdist.stream import spread

    refs = [(i % 3, i) for i in range(n)]
    slots, dropped = spread(sorted(refs), world, workers, batch)
    per_rank = [sum(len(sizes) for _, sizes in rank) for rank in slots]
    sizes = [s for rank in slots for _, ss in rank for s in ss]
    got = [r for rank in slots for rs, _ in rank for r in rs]
    assert len(set(per_rank)) == 1
    assert all(1 <= s <= batch for s in sizes) and (max(sizes) - min(sizes) <= 1 if sizes else True)
    assert sorted(got + sorted(refs)[len(got):]) == sorted(refs) and len(got) + dropped == n
    assert all(sum(ss) == len(rs) for rank in slots for rs, ss in rank)
    assert dropped == 0 or n < world or batch == 1  # only when the refs cannot be spread evenly at all


@pytest.mark.parametrize("mode", ["short_side", "none"])
def test_crop_modes_give_fixed_nonsquare_batches_random_in_training_and_fixed_in_validation(shards, mode):
    urls, sizes = open_shards(str(shards)).split("train")
    kw = dict(batch_size=2, image_size=(32, 64), num_workers=0, resize=mode, scale=(0.8, 1.6), seed=5)
    train = ShardStream(urls, sizes, train=True, **kw)
    val = ShardStream(urls, sizes, train=False, **kw)
    first = [b for w in range(1) for b in train.slot_batches(0, w)]
    assert all(img.shape[1:] == (32, 64, 3) and m.shape[1:] == (32, 64) for img, m, _, _ in first)
    again = list(train.slot_batches(0, 0))  # same (seed, epoch): the same crops
    assert len(first) == len(again) >= 3
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    resumed = list(train.slot_batches(0, 0, skip=2))  # skipping batches does not shift the crops
    assert len(resumed) == len(first) - 2
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first[2:], resumed))
    v1, v2 = list(val.slot_batches(0, 0)), list(val.slot_batches(3, 0))
    assert len(v1) == len(v2) > 0
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(v1, v2))  # validation: centred, every epoch the same
