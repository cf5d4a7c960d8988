"""The ``segdist`` command: one sub-command per stage.

Every user error surfaces as a :class:`~segdist.errors.UserError` and is printed as one line
(``segdist: error: ...``) with exit status 2; no traceback for bad input.

Each sub-command imports what it runs inside its ``_cmd_*`` function: ``segdist shards info`` or a
config typo must not pay for torch, SMP and timm (seconds on a small machine).
"""

from __future__ import annotations

import argparse
import os
import sys

from .atomic import check_out_dir
from .errors import REQUEUE_EXIT, Paused, UserError, disk_full_reason, os_error_line
from .export.options import DEFAULT_COUNT, DEFAULT_OPSET, OPSETS
from .infer.options import BATCH_SIZE, BLENDS, MODES, PROB_FORMATS, Options


# ----------------------------------------------------------------------------- synth
def _synth_parser(sub) -> None:
    p = sub.add_parser("synth", help="write the embedded synthetic dataset (images/*.jpg, masks/*.png)")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=240, help="number of samples")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--classes", type=int, default=1, help="1 = binary masks {0,1}; K>1 = index masks 0..K-1")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args) -> int:
    from .synth import make_synthetic  # lazy: see the module docstring

    make_synthetic(args.out, n=args.n, size=args.size, classes=args.classes, seed=args.seed)
    print(f"wrote {args.n} samples to {args.out}")
    return 0


# ----------------------------------------------------------------------------- shards
def _shards_parser(sub) -> None:
    from .shards import add_cli  # lazy: the shards package loads its CLI (OpenCV, PIL) on first use

    add_cli(sub)


# ----------------------------------------------------------------------------- train / eval
def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (also: accelerate launch launch/train.py ...)")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 lr=3e-4")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from .config import load_config  # lazy: see the module docstring
    from .train import run

    run(load_config(args.config, args.overrides))
    return 0


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a shard split with exact IoU/Dice")
    p.add_argument("ckpt", help="checkpoint folder (runs/<name>/best or last)")
    p.add_argument("--shards", required=True, help="shard folder or http(s) URL with manifest.json")
    p.add_argument("--split", default="val")
    p.add_argument("--mode", choices=("stream", *MODES), default="stream",
                   help="stream: the batched network inputs validation sees (data.image_size); resize / sliding: "
                        "each sample predicted as `segdist predict --mode` does and scored at its native resolution")
    p.add_argument("--full-res", action="store_true",
                   help="both resolutions, the headline at full resolution: --mode resize (logits resized to each "
                        "stored mask) plus the stream scores")
    p.add_argument("--batch-size", type=int, default=0,
                   help="samples (stream) or windows (resize/sliding) per batch; 0: the checkpoint's config")
    p.add_argument("--num-workers", type=int, default=-1, help="-1: the checkpoint's config")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="also write metrics.json and confusion.png (normalised confusion matrix) here")
    _inference_args(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from . import evaluate as ev  # lazy: see the module docstring

    common = {"split": args.split, "batch_size": args.batch_size, "num_workers": args.num_workers,
              "as_json": args.json}
    predict = {"overlap": args.overlap, "blend": args.blend, "tta": args.tta, "threshold": args.threshold}
    if args.out:
        check_out_dir(args.out)  # before the evaluation, not after it
    if args.full_res:
        if args.mode == "sliding":
            raise UserError("--full-res scores the resized full image; for windows use --mode sliding without it")
        metrics = ev.evaluate_full_res(args.ckpt, args.shards, **common, **predict)
    elif args.mode == "stream":
        if args.tta:
            raise UserError("--tta needs --mode resize or sliding (the stream mode scores the training batches)")
        metrics = ev.evaluate_checkpoint(args.ckpt, args.shards, **common)
    else:
        metrics = ev.evaluate_native(args.ckpt, args.shards, mode=args.mode, **common, **predict)
    if args.out and int(os.environ.get("RANK", "0")) == 0:  # one writer under accelerate launch
        ev.write_outputs(metrics, args.out, f"{args.split}, {args.ckpt}")
    return 0


# ----------------------------------------------------------------------------- predict
def _inference_args(p) -> None:
    """How predictions are made, shared by `segdist predict` and `segdist eval --mode resize|sliding`."""
    p.add_argument("--overlap", type=float, default=Options.overlap,
                   help="sliding: window overlap; stride = window x (1 - overlap)")
    p.add_argument("--blend", choices=BLENDS, default=Options.blend,
                   help="sliding: how overlapping windows' logits are weighted")
    p.add_argument("--tta", default="", help="test-time augmentation: 'flip', scales '0.75,1.0,1.25' or both "
                                             "('flip,0.75,1.0,1.25'); probabilities are averaged")
    p.add_argument("--threshold", type=float, default=Options.threshold,
                   help="binary models: foreground where probability > this")


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict masks (original size) + overlays for images")
    p.add_argument("ckpt", help="checkpoint folder (runs/<name>/best)")
    p.add_argument("inputs", nargs="+", help="image files, folders, globs ('photos/*.jpg') or a shard folder")
    p.add_argument("--out", required=True, help="output folder for masks/, overlays/ and probs/")
    p.add_argument("--split", default="val", help="the split predicted from a shard folder")
    p.add_argument("--mode", choices=MODES, default=Options.mode,
                   help="resize: the model's training resize rule (data.resize); sliding: windows of the "
                        "training size over the image")
    _inference_args(p)
    p.add_argument("--probs", choices=PROB_FORMATS, help="also write probabilities: float16 .npy (C, H, W) "
                                                          "or 16-bit PNGs")
    p.add_argument("--overlays", action=argparse.BooleanOptionalAction, default=True, help="write overlays/")
    p.add_argument("--palette", help="JSON class colours for multi-class masks (default: the checkpoint's)")
    p.add_argument("--classes", help="JSON list of the class names you expect (shards build's --classes format); "
                                     "refused unless it is the model's class table")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="network inputs (windows) per device batch")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> int:
    from .infer.predict import predict_paths  # here, not at the top: it loads SMP/timm

    summary = predict_paths(args.ckpt, args.inputs, args.out, device=args.device, mode=args.mode, split=args.split,
                            overlap=args.overlap, blend=args.blend, tta=args.tta, threshold=args.threshold,
                            probs=args.probs, overlays=args.overlays, palette=args.palette, classes=args.classes,
                            batch_size=args.batch_size)
    print(summary)
    return 0


# ----------------------------------------------------------------------------- export
def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as ONNX (uint8 RGB in, logits out), checked with onnxruntime")
    p.add_argument("ckpt", help="checkpoint folder (runs/<name>/best); only read")
    p.add_argument("--onnx", required=True, help="output .onnx file (written only if the check passes)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width (multiples of 32)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset ({OPSETS.start}..{OPSETS.stop - 1})")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shards", help="check on val images of this shard folder or URL (best: the training pixels)")
    src.add_argument("--images", help="check on photos from this folder (else: synthetic images)")
    p.add_argument("--count", type=int, default=DEFAULT_COUNT, help="number of check images")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from .export import export_onnx  # lazy: see the module docstring

    for line in export_onnx(args.ckpt, args.onnx, dynamic=args.dynamic, opset=args.opset, shards=args.shards,
                            images=args.images, count=args.count):
        print(line)
    return 0


# ----------------------------------------------------------------------------- bench
def _bench_parser(sub) -> None:
    from .bench import add_cli  # lazy: see the module docstring

    add_cli(sub)


# ----------------------------------------------------------------------------- demo
def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic dataset (CPU)")
    p.add_argument("--workdir", default="runs")
    p.add_argument("overrides", nargs="*", help="key=value overrides for configs/demo.yaml")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .demo import run_demo  # lazy: see the module docstring

    run_demo(args.workdir, args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segdist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_synth_parser, _shards_parser, _train_parser, _eval_parser, _predict_parser,
                _export_parser, _bench_parser, _demo_parser):
        add(sub)
    return parser


BATCH_LOOPS = ("train", "eval", "predict", "demo")
"""Commands that run the network batch after batch (``demo`` trains in-process): they start with
:func:`segdist.memory.tune_malloc`."""


def run_command(args) -> int:
    """``args.func(args)``; when it raises, open progress bars are ended first, so the message that follows starts
    its own line instead of trailing an unfinished bar (tqdm rewrites its line with carriage returns)."""
    try:
        return int(args.func(args) or 0)
    except BaseException:
        tqdm = sys.modules.get("tqdm")
        bars = list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()))
        for bar in bars:
            bar.close()  # leave=False bars clear their line
        if bars and not sys.stderr.isatty():
            sys.stderr.write("\n")  # in a log file the cleared bar is still text on that line
        raise


def main(argv: list[str] | None = None) -> int:
    from .track import default_wandb_mode  # lazy: track loads OpenCV

    default_wandb_mode()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in BATCH_LOOPS:
        from .memory import tune_malloc  # lazy: only the batch loops need it

        # Before the first tensor: each batch's freed activations stay mapped instead of being faulted
        # in again every batch (2x for the course's loop on CPU, docs/benchmarks.md); forked loader
        # workers inherit it. The user's own MALLOC_* variables or SEGDIST_MALLOC=default win.
        tune_malloc()
    try:
        return run_command(args)
    except UserError as e:
        print(f"segdist: error: {e}", file=sys.stderr)
        return 2
    except Paused as e:
        print(f"segdist: {e}", file=sys.stderr)
        return REQUEUE_EXIT
    except KeyboardInterrupt:
        print("segdist: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `segdist shards info DIR | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        # The net under every writer: a full disk or an unwritable folder is the machine's state, not a bug.
        line = os_error_line(e) if isinstance(e, OSError) else None
        reason = line or disk_full_reason(e)
        if reason is None:
            raise
        print(f"segdist: error: {line or f'a write failed: {reason}; free space and run the same command again'}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
