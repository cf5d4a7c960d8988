"""The ``segdist bench`` sub-commands."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


from ..errors import UserError
from ..memory import MALLOC_SETTINGS
from ..shards import open_shards
from .common import DEFAULT_SOURCE, BenchArgs, build_bench_shards, check_args, source_csv

# Each _cmd_* imports its own bench: `bench data`'s loader workers fork from this process, and the other
# benches' stacks (SMP, timm, Accelerate, W&B, boto3: ~250 MB) would be in every one of them.




# ----------------------------------------------------------------------------- CLI
def _source_args(parser, min_seconds: float | None, what: str) -> None:
    """The options the benches share: which samples, at what size, for how long (None: no
    ``--min-seconds``), printed how."""
    parser.add_argument("--shards", help=f"shard folder to {what} (default: build one from --source into a temp dir)")
    parser.add_argument("--source", default=DEFAULT_SOURCE,
                        help=f"folder with train.csv (images,masks columns) or the CSV (default {DEFAULT_SOURCE})")
    parser.add_argument("--split", default="train", help="shard split to use (default train)")
    parser.add_argument("--size", type=int, default=320, help="output side in pixels (default 320)")
    parser.add_argument("--max-side", type=int, default=0,
                        help="when building shards: downscale so the longer side is <= N (0 = keep originals)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N rows of the CSV (0 = all)")
    if min_seconds is not None:
        parser.add_argument("--min-seconds", type=float, default=min_seconds,
                            help=f"measure each candidate at least this long (default {min_seconds:g})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def add_cli(sub) -> None:
    """Register ``segdist bench data``, ``decode`` and ``train`` on an argparse sub-parsers object."""
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    d = bsub.add_parser("data", help="course loader vs segdist stream vs decode limit, one run",
                        description="The course loader vs the segdist stream vs the decode limit, in one run "
                                    "(see docs/benchmarks.md).")
    _source_args(d, 10.0, "stream")
    d.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    d.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    d.add_argument("--rss", action="store_true", help="also measure the stream's peak RSS with 1x and 10x shards")
    d.add_argument("--remote", metavar="S3_URL",
                   help="instead: s3:// streaming vs a raw GET of the same objects vs local disk, decode off (the "
                        "shards are uploaded to this prefix first unless they are there; endpoint: AWS_ENDPOINT_URL)")
    d.set_defaults(func=_cmd_data)
    k = bsub.add_parser("decode", help="JPEG decoders compared on the same shard bytes (speed, difference)",
                        description="Single-thread speed of each JPEG decoder (+ the same resize) on the shards' "
                                    "images, and its mean difference from full-size OpenCV decoding.")
    _source_args(k, 2.0, "decode")
    k.set_defaults(func=_cmd_decode)
    t = bsub.add_parser("train", help="the course's training loop vs segdist's (CPU or GPU); or segdist's over a "
                                      "batch-size sweep",
                        description="Images/s, data-wait, minor page faults and peak RSS of the course's training "
                                    "loop and of segdist's (`segdist train`'s own loop), each in a fresh process, "
                                    "under each --malloc setting; with --sweep, segdist's loop alone at each batch "
                                    "size: images/s, data-wait, compile time, peak memory, MFU (see "
                                    "docs/benchmarks.md).")
    _source_args(t, None, "train on")
    t.add_argument("--batch", type=int, default=16, help="batch size (default 16, as the course)")
    t.add_argument("--workers", type=int, default=2, help="data loader worker processes for both (default 2)")
    t.add_argument("--steps", type=int, default=10, help="timed steps per loop (default 10)")
    t.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    t.add_argument("--malloc", default="default",
                   help=f"glibc allocator setting(s), comma-separated: {', '.join(MALLOC_SETTINGS)}, or all "
                        f"(default: default)")
    t.add_argument("--precision", choices=("auto", "no", "bf16"), default="auto",
                   help="segdist's train.mixed_precision (default auto: bf16 on CUDA)")
    t.add_argument("--channels-last", choices=("auto", "true", "false"), nargs="?", const="true", default="auto",
                   help="segdist's model.channels_last (default auto: on with CUDA; the bare flag: true)")
    t.add_argument("--compile", choices=("none", "default", "max-autotune", "reduce-overhead"), nargs="?",
                   const="default", default="none",
                   help="segdist's train.compile mode (the bare flag: default); compiled in the warm-up steps")
    t.add_argument("--sweep", default="",
                   help="comma-separated batch sizes, e.g. 16,32,64,128,256: segdist's loop alone (default recipe) "
                        "at each, until the GPU runs out of memory; no course loop")
    t.add_argument("--threads", type=int, default=0, help="torch threads in both loops (default 0: one per core)")
    t.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both loops train (default cpu)")
    t.add_argument("--decode", choices=("cpu", "device"), default="cpu",
                   help="segdist's JPEG decode: cpu (loader workers) or device (nvJPEG; needs --device cuda)")
    t.set_defaults(func=_cmd_train)


def _cmd_data(args) -> int:
    if args.remote:
        from .remote import format_remote_table, run_remote_bench  # lazy: see the imports above
        result = run_remote_bench(BenchArgs(shards=args.shards, source=args.source, split=args.split,
                                            workers=args.workers, max_side=args.max_side, limit=args.limit,
                                            min_seconds=args.min_seconds), args.remote)
        print(json.dumps(result) if args.json else format_remote_table(result))
        return 0
    from .data import format_table, run_data_bench  # lazy: see the imports above

    result = run_data_bench(BenchArgs(shards=args.shards, source=args.source, split=args.split, size=args.size,
                                      batch=args.batch, workers=args.workers, max_side=args.max_side,
                                      limit=args.limit, min_seconds=args.min_seconds, rss=args.rss))
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _cmd_decode(args) -> int:
    from .course import read_course_csv  # lazy: see the imports above
    from .decode import format_decode_table, run_decode_bench

    check_args(BenchArgs(size=args.size, max_side=args.max_side, limit=args.limit, min_seconds=args.min_seconds))
    with tempfile.TemporaryDirectory(prefix="segdist-bench-") as tmp:
        if args.shards:
            shard_dir = args.shards
        else:
            rows = read_course_csv(source_csv(args.source), args.limit)
            shard_dir = str(build_bench_shards(rows, Path(tmp) / "shards", args.max_side, 2))
        urls, _ = open_shards(shard_dir).split(args.split)
        result = run_decode_bench(urls, args.size, args.min_seconds)
    result["max_side"] = args.max_side if not args.shards else None
    print(json.dumps(result) if args.json else format_decode_table(result))
    return 0


def _cmd_train(args) -> int:
    from .loop import format_sweep_table  # lazy: see the imports above
    from .train import TrainArgs, format_train_table, run_train_bench

    malloc = tuple(MALLOC_SETTINGS) if args.malloc == "all" else tuple(args.malloc.split(","))
    try:
        batches = tuple(int(b) for b in args.sweep.split(",") if b.strip())
    except ValueError:
        raise UserError(f"--sweep takes comma-separated batch sizes, e.g. 16,32,64 (got {args.sweep!r})") from None
    result = run_train_bench(TrainArgs(shards=args.shards, source=args.source, split=args.split, size=args.size,
                                       batch=args.batch, workers=args.workers, max_side=args.max_side,
                                       limit=args.limit, steps=args.steps, warmup=args.warmup, malloc=malloc,
                                       precision=args.precision, channels_last=args.channels_last,
                                       threads=args.threads, compile=args.compile, device=args.device,
                                       decode=args.decode, sweep=batches))
    table = format_sweep_table if batches else format_train_table
    print(json.dumps(result) if args.json else table(result))
    return 0
