"""Run a ``segdist`` command the way the console script does, in this test process.

``segdist.cli.main(argv)`` is exactly what ``segdist ARGS`` and ``python -m segdist.cli ARGS`` run; calling it
here skips a fresh interpreter's start and its imports (torch, timm, SMP, Accelerate: ~4 s a command on the
2-core CI machine), which was most of the suite's time. Tests whose point is a process of its own -- a kill -9,
a signal, ``accelerate launch``, a lock between two processes, a resource limit, W&B's service -- still start
one. Output is captured as a subprocess's would be (``returncode``, ``stdout``, ``stderr``); an unexpected
exception propagates, so a traceback fails the test loudly instead of hiding in stderr.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import psutil
import torch


def is_segdist_command(cmd: list) -> bool:
    """``[python, -m, segdist(.cli), ...]``: a command :func:`run_segdist` can run in this process."""
    return len(cmd) >= 3 and str(cmd[0]) == sys.executable and cmd[1] == "-m" and cmd[2] in ("segdist", "segdist.cli")


def run_segdist(*argv) -> subprocess.CompletedProcess:
    """``segdist ARGV`` in this process: its exit status and what it printed. One torch thread, as the test
    subprocesses had (``OMP_NUM_THREADS=1``), so results match theirs bit for bit; Accelerate's per-process
    state is reset afterwards, as a process exit would."""
    from accelerate.state import AcceleratorState, GradientState

    from segdist.cli import main

    args = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as e:  # argparse's usage errors exit
                code = e.code if isinstance(e.code, int) else 1
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return subprocess.CompletedProcess(["segdist", *args], code, out.getvalue(), err.getvalue())


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kw)``, in this process when ``cmd`` is a segdist
    command (``env``, ``cwd`` and ``timeout`` are then not needed: the repo is importable and nothing waits)."""
    if is_segdist_command(cmd):
        return run_segdist(*cmd[3:])
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def alive(procs) -> list:
    """Those of ``procs`` (``psutil.Process``) still running: a zombie has ended; a reused pid is another process."""
    out = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out
