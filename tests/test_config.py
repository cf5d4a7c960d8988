"""Config: YAML + key=value overrides, typed, unknown keys named with the nearest valid one."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from segdist.config import Config, config_from_dict, load_config, save_config
from segdist.errors import UserError
from tests.cliutil import run_segdist
from tests.conftest import REPO


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  batch_size: 4\noptim:\n  lr: 0.01\n")
    cfg = load_config(f, ["optim.lr=3e-4", "epochs=7", "augment.crop_scale=[0.3, 0.9]", "track.tags=[a, b]"])
    assert cfg.data.batch_size == 4
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 7
    assert cfg.augment.crop_scale == [0.3, 0.9]
    assert cfg.track.tags == ["a", "b"]


def test_int_is_accepted_for_float():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=0.1", "did you mean 'optim.lr'"),
    ("train.epoch=3", "did you mean 'train.epochs'"),
    ("batchsize=3", "data.batch_size"),
    ("data.batch_size=big", "expects int"),
    ("train.epochs=2.5", "expects int"),
    ("augment.hflip=yes", "expects float"),     # YAML 'yes' is a bool, not a probability
    ("train.mixed_precision=fp8", "must be one of auto, no, fp16, bf16"),
    ("data.image_size=100", "multiple of 32"),
    ("noequals", "not key=value"),
])
def test_bad_override_names_the_key(override, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_ambiguous_leaf_is_an_error():
    with pytest.raises(UserError, match="loss.name, optim.name, train.name"):
        load_config(None, ["name=x"])  # loss.name, optim.name and train.name all exist


def test_unknown_key_in_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(UserError, match="optim.learning_rate"):
        load_config(f)


def test_unreadable_or_binary_config_files_are_user_errors(tmp_path):
    binary = tmp_path / "model.safetensors.yaml"
    binary.write_bytes(b"\x80\x81\xfe\xff" * 8)  # not UTF-8: e.g. a weights file passed by mistake
    with pytest.raises(UserError, match="cannot be read as text"):
        load_config(binary)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_round_trip_through_saved_yaml(tmp_path):
    cfg = load_config(None, ["optim.lr=0.02", "train.name=x"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg and isinstance(again, Config)


def test_shipped_configs_load():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert len(files) >= 3, files  # demo, human_seg, clothing at least
    for f in files:
        load_config(f)


def test_cli_typo_is_one_line_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "segdist.cli", "train", "optim.lrr=0.1"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("segdist: error: unknown config key 'optim.lrr'")


@pytest.mark.parametrize("override,key", [("optim.lr=nan", "optim.lr"), ("optim.lr=-1", "optim.lr"),
                                          ("optim.lr=0", "optim.lr"), ("optim.weight_decay=-1", "optim.weight_decay"),
                                          ("optim.lr=.inf", "optim.lr"), ("optim.ema=1", "optim.ema"),
                                          ("loss.dice_weight=-0.5", "loss.dice_weight"),
                                          ("augment.std=[0.2, 0, 0.2]", "augment.std"),
                                          ("augment.crop_scale=[0, 1]", "augment.crop_scale")])
def test_numeric_values_out_of_range_are_named(override, key):
    with pytest.raises(UserError, match=f"config key '{key}' must be in"):
        load_config(None, [override])


def test_every_numeric_key_has_a_range():
    """A new numeric key without a range would pass validation and crash later, inside torch."""
    import dataclasses
    import typing

    from segdist.config import sections

    def is_numeric(typ) -> bool:
        return typ in (int, float) or any(is_numeric(a) for a in typing.get_args(typ))

    hints = {name: typing.get_type_hints(cls) for name, cls in sections().items()}
    numeric = [(name, f) for name, cls in sections().items() for f in dataclasses.fields(cls)
               if is_numeric(hints[name][f.name])]
    assert len(numeric) > 30
    assert [f"{n}.{f.name}" for n, f in numeric if f.metadata.get("range") is None] == []


def test_registry_names_are_checked_where_the_registries_live():
    from segdist.losses import LOSSES, check_loss_config
    from segdist.models import check_model_config
    from segdist.optim import OPTIMIZERS, SCHEDULERS, check_optim_config

    with pytest.raises(UserError, match=f"'optim.scheduler' must be one of {', '.join(SCHEDULERS)}; got 'linear'"):
        check_optim_config(load_config(None, ["optim.scheduler=linear"]).optim)
    with pytest.raises(UserError, match=f"'optim.name' must be one of {', '.join(OPTIMIZERS)}; got 'adamx'"
                                        r" \(did you mean 'adam'\?\)"):
        check_optim_config(load_config(None, ["optim.name=adamx"]).optim)
    with pytest.raises(UserError, match=f"'loss.name' must be one of auto, {', '.join(LOSSES)}; got 'tversky'"):
        check_loss_config(load_config(None, ["loss.name=tversky"]).loss)
    with pytest.raises(UserError, match="'loss.class_weights' must be one of none, median_freq, inv_sqrt"):
        check_loss_config(load_config(None, ["loss.class_weights=median"]).loss)
    with pytest.raises(UserError, match="unknown model.arch 'Unett'"):
        check_model_config(load_config(None, ["model.arch=Unett"]).model)


def test_train_checks_registry_names_before_it_builds_anything(tmp_path):
    """data.shards is empty too: the registry name is refused first, in the config key's words."""
    p = run_segdist("train", "optim.name=lamb", f"train.out_dir={tmp_path}")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == "segdist: error: config key 'optim.name' must be one of adamw, adam, sgd; got 'lamb'"
    assert list(tmp_path.iterdir()) == []


def test_a_key_repeated_in_a_yaml_file_names_both_lines(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.1\n  weight_decay: 0\n  lr: 0.2\n")
    with pytest.raises(UserError, match=r"key 'lr' appears twice \(lines 2 and 4\); keep one"):
        load_config(f)
    f.write_text("optim:\n  lr: 0.1\noptim:\n  ema: 0.9\n")
    with pytest.raises(UserError, match=r"key 'optim' appears twice \(lines 1 and 3\)"):
        load_config(f)


@pytest.mark.parametrize("name", ["", "..", ".", "/tmp/x", "a/b", "../up", ".hidden", "x y"])
def test_run_names_are_plain_folder_names(name):
    with pytest.raises(UserError, match="'train.name' must be a plain folder name"):
        load_config(None, [f"train.name={name}"])


def test_saved_configs_of_other_versions_load_leniently():
    data = load_config(None, ["optim.lr=0.02"]).to_dict()
    data["model"]["retired_key"] = True
    with pytest.raises(UserError, match="unknown config key 'model.retired_key'"):
        config_from_dict(data)
    assert config_from_dict(data, strict=False).optim.lr == 0.02
    data["optim"]["lr"] = -1.0  # a known key with a bad value is still refused
    with pytest.raises(UserError, match="'optim.lr' must be in"):
        config_from_dict(data, strict=False)


def test_yaml_values_are_shown_as_written_never_as_python_objects(tmp_path):
    """YAML reads 2024-01-01 as a date and !!binary as bytes: messages show them as text, not datetime.date(...)."""
    cases = {"data:\n  image_size: 2024-01-01 10:00:00\n": "got 2024-01-01T10:00:00",
             "optim:\n  lr: !!binary aGVsbG8=\n": "got binary data (5 bytes)",
             "data:\n  scale: !!set {a, b}\n": "got ['a', 'b']", "track:\n  tags: {a: 1}\n": "got {a: 1}"}
    for text, says in cases.items():
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(UserError) as e:
            load_config(tmp_path / "c.yaml", [])
        assert says in str(e.value) and "datetime" not in str(e.value) and "object at 0x" not in str(e.value)
    (tmp_path / "c.yaml").write_text("train:\n  name: 2024-01-01\n")
    assert load_config(tmp_path / "c.yaml", []).train.name == "2024-01-01"  # a date-like name is meant as text


def test_model_compile_of_earlier_versions_is_read_as_train_compile(capsys):
    """model.compile (a bool until 2026-12) became train.compile (a mode): saved runs, whose configs all
    hold model.compile: false, load silently; a config that turned it on compiles in the default mode."""
    old = load_config(None, []).to_dict()
    del old["train"]["compile"]
    old["model"]["compile"] = False
    assert config_from_dict(old).train.compile == "none" and capsys.readouterr().err == ""
    old["model"]["compile"] = True
    assert config_from_dict(old).train.compile == "default"
    assert "model.compile' is now 'train.compile'" in capsys.readouterr().err
    assert load_config(None, ["train.compile=true"]).train.compile == "default"
    with pytest.raises(UserError, match="'train.compile' must be one of none, default, max-autotune, reduce-overhead"):
        load_config(None, ["train.compile=fast"])


def test_channels_last_is_auto_true_or_false():
    assert load_config(None, []).model.channels_last == "auto"
    assert load_config(None, ["model.channels_last=false"]).model.channels_last is False
    with pytest.raises(UserError, match="'model.channels_last' must be auto, true or false"):
        load_config(None, ["model.channels_last=sometimes"])
