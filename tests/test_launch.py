"""Launchers: accelerate configs load, the SLURM script parses, the Colab notebook uses real keys."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest

from segdist.config import load_config
from tests.conftest import REPO

LAUNCH = REPO / "launch"


@pytest.mark.parametrize("name", ["1gpu", "8gpu", "2x8gpu", "cpu2"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(LAUNCH / "accelerate" / f"{name}.yaml"))
    assert cfg.num_processes >= 1 and cfg.num_machines >= 1


def test_slurm_script_is_valid_bash_sets_ranks_and_requeues_on_pause():
    from segdist.errors import REQUEUE_EXIT

    text = (LAUNCH / "slurm.sbatch").read_text()
    subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")], check=True)
    for needle in ("RANK=$SLURM_PROCID", "WORLD_SIZE=$SLURM_NTASKS", "LOCAL_RANK=$SLURM_LOCALID", "MASTER_ADDR=",
                   "train.resume=auto", "--signal=USR1@", f'"$status" -eq {REQUEUE_EXIT}', "scontrol requeue"):
        assert needle in text, needle


def test_colab_notebook_commands_use_valid_config_keys():
    nb = json.loads((LAUNCH / "colab.ipynb").read_text())
    src = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    train = re.search(r"!segdist train (.+?)(?:\n(?!\s)|$)", src.replace("\\\n", " "), re.S).group(1)
    words = shlex.split(train.replace("$SHARDS", "x").replace("$PRECISION", "bf16"))
    overrides = [w for w in words if "=" in w]
    assert words[0] == "--config"
    load_config(REPO / words[1], overrides)  # raises on any unknown key
