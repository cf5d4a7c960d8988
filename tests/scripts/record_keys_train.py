"""For tests/test_distributed.py: ``segdist train`` that also records which sample keys each rank
trained in which epoch, appending ``{"epoch": E, "keys": [...]}`` lines to
``<out_dir>/<name>/keys-rank<R>.jsonl``. Arguments: ``key=value`` overrides."""

import json
import sys

import segdist.decode as decode
import segdist.train as train
from segdist.cli import main

real_to_device, real_one_epoch, where = decode.to_device, train.train_one_epoch, {}


def train_one_epoch(t, batches, loop):
    where["file"] = t.run_dir / f"keys-rank{t.accelerator.process_index}.jsonl"
    where["epoch"] = loop.epoch
    return real_one_epoch(t, batches, loop)


def to_device(batch, *args, **kwargs):
    if "file" in where:
        with open(where["file"], "a") as f:
            f.write(json.dumps({"epoch": where["epoch"], "keys": batch["key"]}) + "\n")
    return real_to_device(batch, *args, **kwargs)


decode.to_device, train.train_one_epoch = to_device, train_one_epoch  # device_batches calls decode.to_device
sys.exit(main(["train", *sys.argv[1:]]))
