"""`segdist bench data` smoke tests: it runs end to end, its numbers are consistent. No speed targets here."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch

from segdist.bench import BenchArgs, PeakRss, read_course_csv, run_data_bench, time_epochs
from segdist.cli import main
from segdist.errors import UserError
from tests.conftest import HUMAN_SEG, REPO, require_dataset

KEYS = {"course_img_s", "segdist_img_s", "decode_img_s", "speedup_vs_course", "fraction_of_decode_limit",
        "augment_ms_per_batch", "device", "size", "batch", "workers", "max_side", "samples_course",
        "samples_segdist", "peak_rss_mb", "background_cpus", "rss_1x_mb", "rss_10x_mb"}


def test_time_epochs_skips_the_first_batch_and_counts_whole_epochs():
    epochs = []

    def make_epoch(e):
        epochs.append(e)
        return [[0] * 4, [0] * 4, [0] * 3]

    t = time_epochs(make_epoch, len, min_seconds=0)
    assert (t.images, t.epochs, epochs) == (7, 1, [0])  # 4 + 3: the first batch only starts the clock
    assert t.seconds > 0 and t.img_s == t.images / t.seconds


def test_time_epochs_runs_another_epoch_when_only_the_warmup_batch_was_seen():
    t = time_epochs(lambda e: [[0] * 5], len, min_seconds=0)
    assert (t.images, t.epochs) == (5, 2)


def test_time_epochs_rejects_an_empty_epoch():
    with pytest.raises(UserError, match="no batch"):
        time_epochs(lambda e: [], len, min_seconds=0)


def test_peak_rss_is_at_least_the_memory_held_while_sampling():
    import psutil

    before = psutil.Process().memory_info().rss  # not the tree: a child of an earlier test may exit meanwhile
    with PeakRss(interval=0.01) as rss:
        block = bytearray(64 * 1024 * 1024)  # touched pages count in RSS
        block[::4096] = b"\x01" * len(block[::4096])
    assert rss.peak >= before + 60 * 1024 * 1024
    del block


def test_course_csv_needs_the_course_columns(tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text("image,label\na.jpg,b.png\n")
    with pytest.raises(UserError, match="'images' and 'masks'"):
        read_course_csv(bad)
    (tmp_path / "a.jpg").write_bytes(b"")
    # a missing mask; then an empty image cell and another missing mask
    bad.write_text("images,masks\na.jpg,a_mask.png\n,b.png\n")
    with pytest.raises(UserError, match=r"3 listed file\(s\) not found, e.g. '.*a_mask.png'"):
        read_course_csv(bad)


def test_missing_source_is_a_user_error(tmp_path, capsys):
    assert main(["bench", "data", "--source", str(tmp_path / "nope"), "--json"]) == 2
    err = capsys.readouterr().err
    assert "--source" in err and "Traceback" not in err


def test_bad_size_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--size"):
        run_data_bench(BenchArgs(source=str(tmp_path), size=4))


@pytest.mark.slow
def test_bench_data_json_on_a_subset(capsys):
    """Course, stream and decode limit on 32 real samples at 64 px: positive, consistent numbers."""
    source = require_dataset(HUMAN_SEG)
    code = main(["bench", "data", "--source", str(source), "--limit", "32", "--size", "64", "--batch", "8",
                 "--workers", "2", "--max-side", "128", "--min-seconds", "0", "--rss", "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert KEYS <= set(r)
    assert (r["size"], r["batch"], r["workers"], r["max_side"]) == (64, 8, 2, 128)
    assert r["samples_course"] == r["samples_segdist"] == 32  # the same images for both loaders
    for key in ("course_img_s", "segdist_img_s", "decode_img_s", "augment_ms_per_batch", "rss_1x_mb", "rss_10x_mb"):
        assert r[key] > 0, key
    assert r["speedup_vs_course"] == pytest.approx(r["segdist_img_s"] / r["course_img_s"], rel=0.01)
    assert r["fraction_of_decode_limit"] == pytest.approx(r["segdist_img_s"] / r["decode_img_s"], rel=0.01)
    assert r["rss_shards_1x"] >= 1 and r["rss_shards_10x"] == 10 * r["rss_shards_1x"]
    assert r["device"] in ("cpu", "cuda")


@pytest.mark.slow
def test_bench_decode_compares_decoders_on_real_photos(capsys):
    """Every installed decoder runs on the same JPEG bytes; all agree with full OpenCV decoding."""
    source = require_dataset(HUMAN_SEG)
    assert main(["bench", "decode", "--source", str(source), "--limit", "12", "--size", "64",
                 "--max-side", "256", "--min-seconds", "0", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["images"] == 12 and r["size"] == 64
    got = {k: v for k, v in r["decoders"].items() if v is not None}
    assert {"cv2", "cv2-reduced (stream)", "pil-draft", "torchvision-cpu"} <= set(got)
    assert got["cv2"]["mean_abs_diff"] == 0
    for name, v in got.items():
        assert v["img_s"] > 0, name
        # same photo, same resize: a swapped channel order or a rotated image would be far above this
        assert v["mean_abs_diff"] < 4, (name, v)


# ----------------------------------------------------------------------------- bench train
TRAIN_KEYS = {"img_s", "s_per_step", "data_wait", "minflt_per_s", "main_minflt_per_s", "minflt_per_step",
              "peak_rss_mb", "main_max_rss_mb", "background_cpus", "mallopt_applied", "torch_threads"}


def test_minor_faults_count_pages_first_touched_here_and_in_children():
    import multiprocessing

    from segdist.bench import minor_faults

    before, own_before = minor_faults()
    block = bytearray(32 * 1024 * 1024)  # calloc'ed by mmap: every page faults on first write
    block[::4096] = b"\x01" * len(block[::4096])
    after, own_after = minor_faults()
    assert own_after - own_before >= 8000 and after - before >= own_after - own_before
    child = multiprocessing.get_context("fork").Process(target=lambda: bytearray(32 * 1024 * 1024)[::4096].count(0))
    child.start()
    child.join()  # reaped: its faults are in RUSAGE_CHILDREN
    done, own_done = minor_faults()
    assert done - after >= (own_done - own_after) + 1000
    del block


def test_bench_train_measures_in_processes_that_start_workers_the_platforms_way():
    """`segdist bench train` measures each loop in a spawned interpreter; started from a program that never chose
    a start method (the CLI), such an interpreter defaults to spawn, and the course's DataLoader would then start
    fresh interpreters every epoch where the user's script forks them. _in_fresh_process restores the default."""
    import multiprocessing

    # eval runs in the child (a bound get_start_method would pickle the parent's context along with it)
    code = ("from segdist.bench.train import _in_fresh_process\nif __name__ == '__main__':\n"
            "    print(_in_fresh_process(eval, \"__import__('multiprocessing').get_start_method()\"))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == multiprocessing.get_all_start_methods()[0]  # the platform's default (fork on Linux)


def test_bench_train_checks_its_arguments():
    from segdist.bench import TrainArgs, run_train_bench

    for args, needle in [(TrainArgs(steps=0), "--steps"), (TrainArgs(size=48), "multiple of 32"),
                         (TrainArgs(malloc=("jemalloc",)), "--malloc"), (TrainArgs(device="tpu"), "--device"),
                         (TrainArgs(decode="device"), "needs --device cuda"), (TrainArgs(decode="gpu"), "--decode")]:
        with pytest.raises(UserError, match=needle):
            run_train_bench(args)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            run_train_bench(TrainArgs(device="cuda"))


@pytest.mark.slow
def test_bench_train_json_smoke(capsys):
    """Both loops at 64 px, 2 timed steps each in fresh processes: positive rates, the keys docs/benchmarks.md cites."""
    source = require_dataset(HUMAN_SEG)
    assert main(["bench", "train", "--source", str(source), "--limit", "8", "--size", "64", "--batch", "4",
                 "--steps", "2", "--warmup", "1", "--threads", "1", "--json"]) == 0  # 1 thread: robust to a busy CI box
    r = json.loads(capsys.readouterr().out)
    assert (r["size"], r["batch"], r["steps"], r["samples"], r["threads"]) == (64, 4, 2, 8, 1)
    run = r["runs"]["default"]
    for loop in ("course", "segdist"):
        assert TRAIN_KEYS <= set(run[loop]), loop
        for key in ("img_s", "minflt_per_s", "peak_rss_mb", "main_max_rss_mb"):
            assert run[loop][key] > 0, (loop, key)
        assert 0 <= run[loop]["data_wait"] < 1
    assert run["speedup_vs_course"] == pytest.approx(run["segdist"]["img_s"] / run["course"]["img_s"], rel=0.01)
    # "default" is how users run each: the course on glibc's defaults, segdist as shipped (tuned by its CLI)
    assert run["course"]["mallopt_applied"] is None
    assert run["segdist"]["mallopt_applied"] is (platform.libc_ver()[0] == "glibc")


@pytest.mark.slow
def test_bench_train_sweep_smoke(capsys):
    """--sweep: segdist's own training loop (train_one_epoch) at two batch sizes, no course loop: images/s,
    data-wait, compile time, peak memory and FLOPs per image; MFU only where the GPU's bf16 peak is known."""
    source = require_dataset(HUMAN_SEG)
    assert main(["bench", "train", "--source", str(source), "--limit", "8", "--size", "64", "--sweep", "2,4",
                 "--steps", "2", "--warmup", "1", "--workers", "1", "--threads", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [row["batch"] for row in r["rows"]] == r["sweep"] == [2, 4] and "runs" not in r
    for row in r["rows"]:
        assert row["img_s"] > 0 and 0 <= row["data_wait"] < 1 and row["peak_mem_mb"] > 0, row
        assert row["compile_s"] == 0 and row["mfu"] is None, row  # eager, on the CPU
    assert 1e9 < r["flops_per_image"] < 1e11  # Unet + lite0 at 64 px: ~3.5 GFLOP forward + backward


FAULTS = """
import resource, sys, torch
CLI = {"train": ["train", "--config", "configs/demo.yaml", "train.epochs=typo"],  # each tunes, then fails at once
       "eval": ["eval", "no-such-run/best", "--shards", "no-such-shards"],
       "predict": ["predict", "no-such-run/best", "no-such-photos", "--out", "no-such-out"],
       "demo": ["demo", "--workdir", "no-such-workdir", "train.epochs=typo"]}
if sys.argv[1] in CLI:
    from segdist.cli import main
    assert main(CLI[sys.argv[1]]) == 2
def touch():
    x = torch.empty(16 * 2**20)  # 64 MiB: above glibc's mmap threshold
    x.fill_(1.0)
for _ in range(10):  # glibc settles into reusing the freed block after a few rounds (5 here)
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_always() -> bool:
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")
@pytest.mark.skipif(_thp_always(), reason="transparent huge pages 'always': 2 MiB faults, too few to count on")
@pytest.mark.parametrize("command", ["train", "eval", "predict", "demo"])
def test_batch_loop_commands_keep_freed_memory_mapped_so_steps_stop_faulting(tmp_path, command):
    """Real page faults: 10 x (allocate, touch, free) 64 MiB costs ~160k minor faults on glibc's defaults,
    next to none once `segdist train` (eval, predict, demo) has started (it tunes malloc before anything
    else); SEGDIST_MALLOC=default opts out."""
    import os
    import subprocess
    import sys

    from segdist.memory import USER_VARS

    env = {k: v for k, v in os.environ.items() if k not in USER_VARS}
    def faults(how: str, **extra) -> int:
        return int(subprocess.run([sys.executable, "-c", FAULTS, how], env={**env, **extra}, cwd=REPO,
                                  capture_output=True, text=True, check=True, timeout=300).stdout.split()[-1])

    plain, cli, opted_out = faults("plain"), faults(command), faults(command, SEGDIST_MALLOC="default")
    assert plain > 10 * 16 * 2**20 // 4096 // 2, plain  # every round faults its pages in again
    assert cli < plain / 20, (cli, plain)
    assert opted_out > plain / 2, (opted_out, plain)


def test_tune_malloc_applies_on_glibc_and_respects_the_users_variables():
    """In a fresh interpreter (the settings last for the process): True on glibc, False where the user tuned malloc."""
    import os
    import platform
    import subprocess
    import sys

    from segdist.memory import USER_VARS

    env = {k: v for k, v in os.environ.items() if k not in USER_VARS}
    code = "from segdist.memory import tune_malloc; print(tune_malloc(), tune_malloc())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    glibc = platform.libc_ver()[0] == "glibc"
    assert out.split() == ([str(glibc)] * 2)
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MALLOC_ARENA_MAX": "2"}, capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["False", "False"]
