"""Run log: a line torn by a killed job never stops a resume or a plot; what is dropped is said."""

from __future__ import annotations

import json

from accelerate import Accelerator

from segdist.track import RunLog, plot_curves, read_records


def torn_log(path, steps=(10, 20, 30)):
    """A metrics.jsonl as a job killed while appending its last record leaves it."""
    # val_loss NaN: a diverged epoch is logged as NaN, and must come back as NaN after a rewrite
    lines = [json.dumps({"step": s, "event": "epoch", "epoch": i + 1, "train_loss": 1.0 / (i + 1), "val_iou": 0.1 * i,
                         "val_loss": float("nan") if i == 1 else 0.5}) for i, s in enumerate(steps)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 40, "event": "ep')
    return lines


def test_read_records_keeps_whole_records_and_counts_the_rest(tmp_path):
    f = tmp_path / "metrics.jsonl"
    lines = torn_log(f)
    f.write_text(f.read_text() + "\n\n[1, 2]\n")  # an empty line is nothing; a non-object is counted
    records, torn = read_records(f)
    assert [r["step"] for r in records] == [10, 20, 30] and torn == 2
    assert [json.dumps(r) for r in records] == lines


def test_resume_truncation_drops_the_torn_line_and_says_so(tmp_path, capsys):
    lines = torn_log(tmp_path / "metrics.jsonl")
    log = RunLog(Accelerator(cpu=True), tmp_path, "none")
    log.truncate_after(20)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"
    assert "dropping 1 unreadable line(s)" in capsys.readouterr().out
    log.log({"event": "epoch", "epoch": 3, "train_loss": 0.3}, step=30)  # the resumed run appends after it
    records, torn = read_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30] and torn == 0


def test_curves_plot_from_a_torn_log(tmp_path):
    torn_log(tmp_path / "metrics.jsonl")
    plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
