"""Class identity: a manifest that contradicts itself, and a model used on data of another class table (eval,
predict on shards or with a class list), are one-line refusals naming the differences."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from segdist.errors import UserError
from segdist.shards import open_shards
from segdist.shards.classes import ClassTable, differences
from tests.shardutil import sample_bytes


def edited(shards: Path, out: Path, **keys) -> Path:
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, **keys}))
    return out


@pytest.mark.parametrize("keys, says", [
    ({"num_classes": 5}, "num_classes is 5 but class_names lists 2"),
    ({"task": "binary", "num_classes": 59, "class_names": [f"c{i}" for i in range(59)]},
     "task is binary but num_classes is 59"),
    ({"num_classes": "two"}, 'num_classes is "two" (a number 2..255)'),
    ({"splits": {"train": {"shards": [], "class_pixels": [5, 6, 7]}}}, "splits.train.class_pixels counts 3 classes"),
])
def test_a_manifest_that_contradicts_itself_is_one_line(shards, tmp_path, keys, says):
    with pytest.raises(UserError) as e:
        open_shards(str(edited(shards, tmp_path / "m", **keys)))
    assert "manifest.json contradicts itself" in str(e.value) and says in str(e.value)
    assert "\n" not in str(e.value) and "segdist shards build" in str(e.value)


def test_class_tables_differ_by_task_count_names_and_ignore_index():
    a = ClassTable("binary", ("background", "foreground"))
    assert differences(a, a) == []
    assert differences(a, ClassTable("binary", ("background", "person"))) == ["class 1 'foreground' -> 'person'"]
    assert differences(a, ClassTable("multiclass", ("background", "foreground", "x"), 0)) == [
        "task binary -> multiclass", "2 -> 3 classes", "ignore index 255 -> 0"]


def test_eval_and_predict_refuse_data_of_another_class_table(ckpt, shards, tmp_path, capsys, monkeypatch):
    from segdist.cli import main

    monkeypatch.setenv("SEGDIST_MALLOC", "default")  # leave this process's malloc as it is
    other = edited(shards, tmp_path / "person", class_names=["background", "person"])
    assert main(["eval", str(ckpt), "--shards", str(other)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"segdist: error: model '{ckpt}' was trained on binary, 2 classes (background, foreground) but "
                    f"shards '{other}' holds binary, 2 classes (background, person) (class 1 'foreground' -> "
                    f"'person'); evaluate it on shards built with its classes (segdist shards build --classes)")

    out = tmp_path / "pred"
    assert main(["predict", str(ckpt), str(other), "--out", str(out)]) == 2
    assert "shard folder" in capsys.readouterr().err and not (out / "masks").exists()
    names = tmp_path / "classes.json"
    names.write_text(json.dumps(["background", "person"]))
    photo = tmp_path / "photo.png"
    photo.write_bytes(sample_bytes(0, 32)[0])
    assert main(["predict", str(ckpt), str(photo), "--out", str(out), "--classes", str(names)]) == 2
    assert f"--classes {names} holds" in capsys.readouterr().err and not (out / "masks").exists()
    names.write_text(json.dumps(["background", "foreground"]))
    assert main(["predict", str(ckpt), str(photo), "--out", str(out), "--classes", str(names)]) == 0
    assert (out / "masks" / "photo.png").is_file()
