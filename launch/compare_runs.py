"""Per-epoch scores of several runs side by side: a Markdown table, a summary and one plot.

    python launch/compare_runs.py runs/hs-s1 runs/hs-s2 runs/hs-s3 --out docs/img/human_seg_seeds.png \\
        --ref "course:1=0.718,2=0.774,4=0.795,6=0.820,9=0.859,12=0.860,22=0.870,24=0.887,25=0.9015"

Reads each run's ``metrics.jsonl`` (the epoch records ``segdist train`` logs). ``--key`` picks the
score (default ``val_iou``: full resolution when the run had ``train.eval_full_res``); ``--also``
adds a second one to the table (default ``val_input_iou``, the network-input score).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from segdist.atomic import check_out_file
from segdist.errors import UserError
from segdist.track import pyplot, read_records, save_figure


def epochs(run: Path) -> list[dict]:
    """The run's epoch records in epoch order, the last one logged for each epoch (a resume may
    log an epoch again); a torn last line (a run still writing) is left out and said."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found; pass run folders (runs/<name>) that segdist train wrote")
    records, bad = read_records(path)
    by_epoch = {r["epoch"]: r for r in records if r.get("event") == "epoch"}
    if bad:
        print(f"{path}: {bad} unreadable line(s) left out", file=sys.stderr)
    return [by_epoch[e] for e in sorted(by_epoch)]


def check_key(runs: dict[str, list[dict]], flag: str, key: str) -> None:
    """A ``key`` no run logged is a typo (``val_iuo``): name the keys that are there."""
    present = {k for rows in runs.values() for r in rows for k in r}
    if key and key not in present:
        scores = sorted(k for k in present if k.startswith("val_") and "/" not in k)
        raise UserError(f"{flag} {key}: no run logged it; these runs have {', '.join(scores) or 'no val_* scores'}")


def finite(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def parse_ref(spec: str) -> tuple[str, dict[int, float]]:
    label, _, points = spec.partition(":")
    try:
        return label, {int(e): float(v) for e, v in (p.split("=") for p in points.split(","))}
    except ValueError:
        raise UserError(f"--ref {spec!r}: expected 'label:EPOCH=SCORE,EPOCH=SCORE,...'") from None


def table(runs: dict[str, list[dict]], key: str, also: str | None) -> str:
    by_epoch = {name: {r["epoch"]: r for r in rows} for name, rows in runs.items()}
    lines = ["| epoch | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for epoch in sorted({e for rows in by_epoch.values() for e in rows}):
        cells = []
        for rows in by_epoch.values():
            r = rows.get(epoch, {})
            cell = f"{r[key]:.4f}" if key in r else ""
            if also and also in r:
                cell += f" ({r[also]:.4f})"
            cells.append(cell)
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(runs: dict[str, list[dict]], key: str, threshold: float) -> str:
    out, finals, bests = [], [], []
    for name, rows in runs.items():
        scores = finite(rows, key)
        if not scores:
            continue
        best = max(scores, key=lambda es: es[1])
        first = next((e for e, v in scores if v >= threshold), None)
        finals.append(scores[-1][1])
        bests.append(best[1])
        out.append(f"- {name}: final {scores[-1][1]:.4f} (epoch {scores[-1][0]}), best {best[1]:.4f} "
                   f"(epoch {best[0]}), first >= {threshold:g} at epoch {first if first is not None else 'never'}")
    if len(finals) > 1:
        out.append(f"- mean of {len(finals)}: final {statistics.mean(finals):.4f} "
                   f"(min {min(finals):.4f}, max {max(finals):.4f}, sd {statistics.stdev(finals):.4f}); "
                   f"best {statistics.mean(bests):.4f}")
    return "\n".join(out)


def plot(runs: dict[str, list[dict]], key: str, also: str | None, refs: list, out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, rows) in enumerate(runs.items()):
        colour = f"C{i}"
        points = finite(rows, key)
        ax.plot([e for e, _ in points], [v for _, v in points], "o-", color=colour, label=f"{name} {key}")
        if also and (points := finite(rows, also)):
            ax.plot([e for e, _ in points], [v for _, v in points], ":", color=colour, label=f"{name} {also}")
    for j, (label, points) in enumerate(refs):
        ax.plot(list(points), list(points.values()), "k--" if j == 0 else "k-.", marker="x", label=label)
    lows = [v for rows in runs.values() for _, v in finite(rows, key)]
    ax.set_ylim(max(0.0, min(lows) - 0.02) if lows else 0.0, 1.0)
    ax.set_xlabel("epoch"), ax.set_ylabel(key), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (runs/<name>)")
    p.add_argument("--key", default="val_iou")
    p.add_argument("--also", default="val_input_iou", help="a second score shown in brackets ('' for none)")
    p.add_argument("--threshold", type=float, default=0.90, help="report the first epoch at or above it")
    p.add_argument("--ref", action="append", default=[], help="a reference curve 'label:EPOCH=SCORE,...'")
    p.add_argument("--out", type=Path, help="PNG of the curves")
    args = p.parse_args(argv)
    try:
        names = [run.name for run in args.runs]
        if len(set(names)) < len(names):  # x/s1 and y/s1: name them by their path instead
            names = [str(run) for run in args.runs]
        runs = {name: epochs(run) for name, run in zip(names, args.runs)}
        refs = [parse_ref(r) for r in args.ref]
        check_key(runs, "--key", args.key)
        if args.also != p.get_default("also"):  # the default is only shown where a run has it
            check_key(runs, "--also", args.also)
        if args.out:
            check_out_file(args.out, "--out")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(runs, args.key, args.also or None))
    print()
    print(summary(runs, args.key, args.threshold))
    if args.out:
        plot(runs, args.key, args.also or None, refs, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
