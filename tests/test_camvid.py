"""CamVid-shaped data end to end on CPU: SegNet's 3-split folders -> shards -> ``segdist eval --split test
--full-res`` scores exactly the test images at their own size (the real set: docs/benchmarks.md, "CamVid")."""

from __future__ import annotations

import json

import pytest

from tests.buildutil import CAMVID_CLASSES, make_camvid_like, run_cli

SPLITS = (("train", 3), ("val", 2), ("test", 5))
H, W = 36, 48  # CamVid's 360x480 at a tenth: not a multiple of 32, so the full-resolution path pads and crops


@pytest.fixture(scope="module")
def camvid(tmp_path_factory):
    """3-split shards of CamVid-shaped images and an untrained 11-class model saved as training saves it."""
    from segdist.checkpoint import ModelMeta, save_model
    from segdist.config import load_config
    from segdist.models import create_model
    from segdist.shards import build_shards
    from segdist.shards.classes import ClassTable

    tmp = tmp_path_factory.mktemp("camvid")
    src = make_camvid_like(tmp / "CamVid", counts=SPLITS, size=(H, W), seed=3)
    shards = tmp / "shards"
    build_shards(src, shards, void=11, classes=CAMVID_CLASSES, workers=1, progress=False)
    cfg = load_config(None, ["model.pretrained=none", "data.resize=short_side", "data.image_size=[32, 32]",
                             f"data.shards={shards}", "data.num_workers=0", "data.batch_size=2"])
    manifest = json.loads((shards / "manifest.json").read_text())
    meta = ModelMeta(cfg, tuple(manifest["class_names"]), 11, False, classes=ClassTable.from_manifest(manifest))
    save_model(create_model(cfg.model, 11).eval(), tmp / "best", meta)
    return tmp / "best", shards


def test_eval_split_test_full_res_counts_every_test_pixel_once_and_prints_the_table(camvid, tmp_path):
    ckpt, shards = camvid
    r = run_cli("eval", ckpt, "--shards", shards, "--split", "test", "--full-res", "--out", tmp_path / "eval")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    n_test = dict(SPLITS)["test"]
    assert m["num_samples"] == n_test and m["resolution"].startswith("native")
    valid = n_test * (H - 1) * W  # each mask's top row is void (11, stored as 255): not counted
    per_class = m["per_class"]
    assert [c["name"] for c in per_class] == json.loads(CAMVID_CLASSES.read_text())["classes"]
    assert sum(c["tp"] + c["fn"] for c in per_class) == valid  # every valid pixel has one true class...
    assert sum(c["tp"] + c["fp"] for c in per_class) == valid  # ... and one predicted class
    # the network-input scores ride along: centred 32x32 crops of the test images
    assert sum(c["tp"] + c["fn"] for c in m["input_res"]["per_class"]) < valid
    # the printed table (scored at 36x48, predicted from the 32-pixel short side the model trained at)
    assert "test at native (resize: short side to 32)" in r.stdout and f"({n_test} samples)" in r.stdout
    for c in per_class:
        assert f"{c['name']}: IoU {c['iou']:.4f}  tp {c['tp']} fp {c['fp']} fn {c['fn']}" in r.stdout
    assert f"headline (full resolution): IoU {m['iou']:.4f}" in r.stdout
    assert (tmp_path / "eval" / "confusion.png").is_file()
