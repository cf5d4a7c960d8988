"""``segdist shards build|verify|info|upload``: argparse wiring and console output."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from .. import storage
from ..errors import UserError
from .build import ON_ERROR, REENCODE, UNKNOWN_VALUES, BuildOptions, build_shards
from .manifest import MANIFEST, read_manifest
from .verify import summarize, verify_shards

_DEFAULT = BuildOptions()  # the defaults that the flags show and use


def add_cli(sub) -> None:
    """Register ``segdist shards build|verify|info|upload`` on an argparse sub-parsers object."""
    p = sub.add_parser("shards", help="build, verify and describe WebDataset shard folders")
    ssub = p.add_subparsers(dest="shards_command", required=True)
    _build_parser(ssub)
    v = ssub.add_parser("verify", help="re-hash and decode every shard; exit 1 on any problem")
    v.add_argument("dir", help="shard folder (holds manifest.json)")
    v.add_argument("--workers", metavar="N", type=int, default=0, help="processes (default: CPU count)")
    v.set_defaults(func=_cmd_verify)
    i = ssub.add_parser("info", help="print a shard folder's manifest summary")
    i.add_argument("dir", help="shard folder, http(s) or s3:// URL prefix")
    i.add_argument("--json", action="store_true", help="print the whole manifest.json")
    i.set_defaults(func=_cmd_info)
    u = ssub.add_parser("upload",
                        help="upload a shard folder to s3://BUCKET/PREFIX/ (shards first, manifest.json last)")
    u.add_argument("dir", help="shard folder (holds manifest.json)")
    u.add_argument("url", help="s3://BUCKET/PREFIX/ (credentials: the standard AWS chain, e.g. AWS_PROFILE)")
    _endpoint_flag(u)
    u.set_defaults(func=_cmd_upload)


def _endpoint_flag(parser) -> None:
    parser.add_argument("--endpoint-url", metavar="URL", default="",
                        help="S3-compatible endpoint for s3:// (MinIO, R2...; default: AWS or AWS_ENDPOINT_URL)")


def _build_parser(ssub) -> None:
    b = ssub.add_parser("build", help="build shards from image/mask folders or a CSV/JSONL manifest",
                        description="Build {split}-NNNNNN.tar shards + manifest.json (see docs/shards.md).")
    b.add_argument("src", nargs="?", help="folder (images/+masks/, train/+val/, train/+trainannot/, or one CSV) "
                                          "or a CSV/JSONL file")
    b.add_argument("--out", metavar="DIR", required=True,
                   help="output shard folder (replaced atomically if it is one), or s3://BUCKET/PREFIX/ (built in "
                        "$TMPDIR, then uploaded: shards first, manifest.json last)")
    g = b.add_argument_group("source")
    g.add_argument("--images", metavar="DIR", help="images folder (with --masks, instead of SRC)")
    g.add_argument("--masks", metavar="DIR", help="masks folder")
    g.add_argument("--mask-pattern", metavar="PATTERN", help="mask file name for an image stem, e.g. '{stem}_mask.png'")
    g.add_argument("--image-col", metavar="NAME", help="manifest column of image paths (default: images/image)")
    g.add_argument("--mask-col", metavar="NAME", help="manifest column of mask paths (default: masks/mask)")
    g.add_argument("--split-col", metavar="NAME", help="manifest column of split names (default: 'split' if present)")
    g = b.add_argument_group("split")
    g.add_argument("--val-fraction", metavar="F", type=float, default=_DEFAULT.val_fraction,
                   help="share of samples in val (default %(default)s)")
    g.add_argument("--split-seed", metavar="N", type=int, default=_DEFAULT.split_seed,
                   help="seed of the hash split (default %(default)s)")
    g = b.add_argument_group("labels")
    g.add_argument("--classes", metavar="FILE", help="JSON class names: a list or {\"classes\": [...]}")
    g.add_argument("--palette", metavar="FILE",
                   help="JSON colour table for RGB masks: [[r,g,b], ...] or {\"colors\": ...}")
    g.add_argument("--void", metavar="V", type=int, help="mask value to store as 255 (ignored by losses/metrics)")
    g.add_argument("--mask-threshold", metavar="T", type=int,
                   help="binarise masks: value > T -> 1 (e.g. 127 for JPEG masks)")
    g.add_argument("--unknown-values", choices=UNKNOWN_VALUES, default=_DEFAULT.unknown_values,
                   help="mask values outside the classes: stop (default), store as 255, or skip the sample")
    g = b.add_argument_group("images")
    g.add_argument("--channels", type=int, choices=(1, 3), default=_DEFAULT.channels,
                   help="3 = RGB (default), 1 = gray")
    g.add_argument("--max-side", metavar="N", type=int, default=_DEFAULT.max_side,
                   help="downscale so the longer side is <= N pixels")
    g.add_argument("--reencode", choices=REENCODE, default=_DEFAULT.reencode,
                   help="format for images that must change (default %(default)s, lossless)")
    g.add_argument("--jpeg-quality", metavar="Q", type=int, default=_DEFAULT.jpeg_quality,
                   help="quality for --reencode jpeg (default %(default)s)")
    g.add_argument("--aspect-tolerance", metavar="F", type=float, default=_DEFAULT.aspect_tolerance,
                   help="masks within this aspect-ratio difference are resized to the image (default %(default)s)")
    g = b.add_argument_group("output")
    g.add_argument("--samples-per-shard", metavar="N", type=int, default=_DEFAULT.samples_per_shard,
                   help="max samples per shard (default %(default)s)")
    g.add_argument("--shard-size-mb", metavar="MB", type=float, help="also start a new shard past this size (MB)")
    g.add_argument("--on-error", choices=ON_ERROR, default=_DEFAULT.on_error,
                   help="bad files: skip and list them (default) or stop at the first")
    g.add_argument("--workers", metavar="N", type=int, default=0, help="processes (default: CPU count)")
    g.add_argument("--force", action="store_true", help="replace --out even if it is not a shard folder")
    _endpoint_flag(g)
    b.set_defaults(func=_cmd_build)


def _cmd_build(args) -> int:
    t0 = time.perf_counter()
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(BuildOptions)}  # flag dest = field
    if storage.is_remote(args.out):
        manifest = _build_to_bucket(args.src, args.out, options, args.endpoint_url)
    else:
        manifest = build_shards(args.src, args.out, **options)
    seconds = time.perf_counter() - t0
    n = manifest["counts"]["samples"]
    splits = ", ".join(f"{s} {i['samples']} ({len(i['shards'])} shards)" for s, i in manifest["splits"].items())
    print(f"built {n} samples -> {args.out}: {splits}; {manifest['task']}, {manifest['num_classes']} classes; "
          f"{seconds:.1f} s, {n / max(seconds, 1e-9):.1f} samples/s")
    c = manifest["counts"]
    print(f"resized masks {c['resized']}, re-encoded images {c['reencoded']}, skipped {c['skipped']}, "
          f"ignored {c['ignored']}")
    for line in _problem_lines(manifest["skipped"], "skipped") + _problem_lines(manifest["ignored"], "ignored"):
        print(line)
    return 0


def _build_to_bucket(src, url: str, options: dict, endpoint_url: str) -> dict:
    """Build in a temp folder, then upload it: a reader of ``url`` never sees a half-built set."""
    storage.configure(endpoint_url=endpoint_url)
    storage.check_bucket(url)  # now, not after the build
    with tempfile.TemporaryDirectory(prefix="segdist-build-") as tmp:
        folder = Path(tmp) / "shards"
        manifest = build_shards(src, folder, **options)
        _upload(folder, url)
    return manifest


def _upload(folder: Path, url: str) -> None:
    manifest = read_manifest(folder)
    names = [s["name"] for split in manifest["splits"].values() for s in split.get("shards", [])]
    t0 = time.perf_counter()
    total = storage.upload(folder, names, url, MANIFEST)
    seconds = time.perf_counter() - t0
    print(f"uploaded {len(names)} shards + {MANIFEST} ({total / 2**20:.1f} MB) -> {url.rstrip('/')}/ in "
          f"{seconds:.1f} s ({total / 2**20 / max(seconds, 1e-9):.1f} MB/s); {MANIFEST} last")


def _cmd_upload(args) -> int:
    if not storage.is_remote(args.url):
        raise UserError(f"upload needs an s3://BUCKET/PREFIX/ URL, got '{args.url}'; to copy a folder use cp")
    storage.configure(endpoint_url=args.endpoint_url)
    _upload(Path(args.dir), args.url)
    return 0


def _cmd_verify(args) -> int:
    problems = verify_shards(args.dir, workers=args.workers)
    manifest = read_manifest(args.dir)
    n = sum(s["samples"] for s in manifest["splits"].values())
    if problems:
        print(f"verify FAILED for {args.dir}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  {p}")
        return 1
    shards = sum(len(s.get("shards", [])) for s in manifest["splits"].values())
    print(f"verify OK: {args.dir}: {shards} shards, {n} samples, hashes, sizes and mask values match")
    return 0


def _cmd_info(args) -> int:
    manifest = read_manifest(args.dir)
    if args.json:
        print(json.dumps(manifest, indent=1))
    else:
        print(f"{args.dir} (built {manifest.get('created', '?')} by segdist {manifest.get('segdist_version', '?')})")
        print(summarize(manifest))
    return 0


def _problem_lines(entries: list[dict], title: str, limit: int = 20) -> list[str]:
    if not entries:
        return []
    by_reason = Counter(e["reason"].split(" (")[0].split(":")[0] for e in entries)
    lines = [f"{title} {len(entries)}: " + "; ".join(f"{r} x{n}" for r, n in by_reason.most_common())]
    lines += [f"  {e['path']}: {e['reason']}" for e in entries[:limit]]
    if len(entries) > limit:
        lines.append(f"  ... {len(entries) - limit} more in {MANIFEST}")
    return lines
