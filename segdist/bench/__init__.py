"""``segdist bench``: honest numbers, measured on the machine at hand (docs/benchmarks.md).

* ``data`` (:mod:`.data`): the course loader vs the segdist stream vs the decode limit.
* ``decode`` (:mod:`.decode`): JPEG decoders on the same shard bytes.
* ``train`` (:mod:`.train`): the course's training loop vs ``segdist train``'s own loop; ``--sweep``:
  segdist's loop alone over batch sizes (:mod:`.loop`).

:mod:`.common` holds what they share (timing, RSS and CPU accounting, the shards built from the
source CSV); :mod:`.course` the course's own loader and loop, the baseline, apart from segdist's
code; :mod:`.cli` the sub-commands.
"""

from ..lazy import attach
from .cli import add_cli

_LAZY = {  # loaded on first use: see .cli
    "common": ("BenchArgs", "OtherCpu", "PeakRss", "Timing", "build_bench_shards", "source_csv", "time_epochs",
               "tree_rss"),
    "course": ("course_loader", "read_course_csv"),
    "data": ("run_data_bench",),
    "decode": ("run_decode_bench",),
    "train": ("TrainArgs", "minor_faults", "run_train_bench"),
}

__all__ = ["add_cli", *(name for names in _LAZY.values() for name in names)]

__getattr__, __dir__ = attach(__name__, _LAZY)
