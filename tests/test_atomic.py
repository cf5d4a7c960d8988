"""Folder swaps killed at every step (real SIGKILL between real renames) are repaired, never lose a copy."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from segdist.atomic import atomic_dir, repair_swap
from tests.conftest import REPO

SWAP = """
import sys
from pathlib import Path
from segdist.atomic import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    for i in range(3):
        (tmp / f"part-{i}").write_text(sys.argv[2])
"""


def swap_in_child(final: Path, version: str, crash_at: str = "") -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SEGDIST_CRASH_AT": crash_at}
    return subprocess.run([sys.executable, "-c", SWAP, str(final), version], env=env, timeout=60).returncode


def version_of(folder: Path) -> str:
    """The one version all files of ``folder`` hold (a mix would be a torn copy)."""
    (version,) = {p.read_text() for p in folder.iterdir()}
    assert sorted(p.name for p in folder.iterdir()) == ["part-0", "part-1", "part-2"]
    return version


@pytest.mark.parametrize("step, left, after", [
    ("swap:ready", "v1", "v1"),  # the new copy complete in its temp folder, nothing renamed yet
    ("swap:old-aside", None, "v1"),  # between the two renames: no final folder at all
    ("swap:new-in-place", "v2", "v2"),  # the new copy in place, the old one not yet deleted
])
def test_a_swap_killed_at_each_step_is_repaired_on_the_next_run(tmp_path, step, left, after):
    final = tmp_path / "best"
    assert swap_in_child(final, "v1") == 0 and version_of(final) == "v1"
    assert swap_in_child(final, "v2", crash_at=step) == -signal.SIGKILL
    assert (version_of(final) if final.exists() else None) == left
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".best.")]  # what the kill left beside it

    notes = repair_swap(final)
    assert notes and all("best" in n for n in notes)
    assert version_of(final) == after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # nothing left over, nothing lost
    assert swap_in_child(final, "v3") == 0 and version_of(final) == "v3"  # and the next swap works


def test_a_live_processs_swap_is_left_alone_and_a_failed_swap_keeps_the_old_copy(tmp_path):
    final = tmp_path / "last"
    final.mkdir()
    (final / "part").write_text("old")
    busy = tmp_path / f".last.old-{os.getppid()}"  # named by a process that is alive
    busy.mkdir()
    assert repair_swap(final) == [] and busy.is_dir()
    busy.rmdir()
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "part").write_text("new")
        raise RuntimeError("the writer failed")
    assert (final / "part").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def build_killed_at(step: str, src: Path, out: Path) -> None:
    from segdist.shards import build_shards

    os.environ["SEGDIST_CRASH_AT"] = step
    build_shards(src, out, workers=1, progress=False)


def test_shards_build_killed_between_its_renames_then_a_failing_rebuild_keeps_the_old_shards(tmp_path, capsys):
    from segdist.errors import UserError
    from segdist.shards import build_shards
    from segdist.synth import make_synthetic

    make_synthetic(tmp_path / "syn", n=4, size=32, seed=1)
    out = tmp_path / "shards"
    build_shards(tmp_path / "syn", out, workers=1, progress=False)
    manifest = (out / "manifest.json").read_bytes()
    # The rebuild in a forked child (this process's imports, no second start-up), killed between its renames.
    killed = multiprocessing.get_context("fork").Process(target=build_killed_at, args=(
        "swap:old-aside", tmp_path / "syn", out))
    killed.start()
    killed.join(timeout=120)
    assert killed.exitcode == -signal.SIGKILL and not out.exists()

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a dataset layout"):
        build_shards(tmp_path / "empty", out, workers=1, progress=False)
    assert f"restored {out}" in capsys.readouterr().err  # reported, and the old shards are back
    assert (out / "manifest.json").read_bytes() == manifest
    # (the killed build's lock file stays until the next build takes it: a free lock, harmless)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shards.lock", "empty", "shards", "syn"]
