"""segdist.shards.build: builds of real datasets, real corrupt files and real processes; every option."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from segdist import shards
from segdist.errors import UserError
from segdist.synth import make_synthetic
from tests.buildutil import CAMVID_CLASSES, decode, make_camvid_like, make_small_shards, read_samples, run_cli
from tests.conftest import CLOTHING, HUMAN_SEG, REPO, require_dataset


# ----------------------------------------------------------------------------- helpers
def source_mask_01(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The documented repair: nearest-neighbour resize (pixel centres) to the image size, 0/255 -> 0/1."""
    mask = np.asarray(Image.open(path))
    if mask.shape[::-1] != size:
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST_EXACT)
    return (mask > 0).astype(np.uint8)


# ----------------------------------------------------------------------------- human-segmentation
@pytest.fixture(scope="module")
def human_csv(tmp_path_factory):
    root = require_dataset(HUMAN_SEG)
    out = tmp_path_factory.mktemp("human") / "shards"
    manifest = shards.build_shards(root / "train.csv", out, workers=2, progress=False)
    return out, manifest


def test_human_seg_csv_counts_split_repairs_and_ignored(human_csv):
    out, manifest = human_csv
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert (manifest["format"], manifest["version"], manifest["task"]) == ("segdist-shards", 1, "binary")
    assert manifest["num_classes"] == 2 and manifest["ignore_index"] == 255
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {"train": 232, "val": 58}
    counts = manifest["counts"]
    assert (counts["samples"], counts["resized"], counts["skipped"]) == (290, 198, 0)
    assert counts["reencoded"] == 2  # the two grayscale JPEGs become RGB PNGs
    assert {(e["path"], e["reason"].split(" (")[0]) for e in manifest["ignored"]} == {
        ("Training_Images/.DS_Store", "stray file"), ("Ground_Truth/.DS_Store", "stray file")}
    # The documented split rule: the round(0.2 * N) keys with the smallest sha256("42:key") are val.
    ranked = sorted(manifest["sources"], key=lambda k: hashlib.sha256(f"42:{k}".encode()).hexdigest())
    assert {k for k, v in manifest["sources"].items() if v["split"] == "val"} == set(ranked[:58])
    names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    assert names == [f"train-{i:06d}.tar" for i in range(4)]  # 232 = 3 x 64 + 40
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [64, 64, 64, 40]


def test_human_seg_verify_passes_and_info_prints(human_csv):
    out, _ = human_csv
    assert shards.verify_shards(out, workers=2, progress=False) == []
    text = shards.summarize(shards.read_manifest(out))
    assert "train" in text and "232" in text and "foreground" in text


def test_human_seg_round_trip_every_pixel(human_csv):
    out, manifest = human_csv
    samples = read_samples(out)
    assert sorted(samples) == sorted(manifest["sources"])
    kept_jpegs = 0
    for key, files in samples.items():
        src = manifest["sources"][key]
        src_image = HUMAN_SEG / src["image"]
        if "image.jpg" in files:
            assert files["image.jpg"] == src_image.read_bytes()  # original bytes, untouched
            kept_jpegs += 1
            image = decode(files["image.jpg"])
        else:
            image = decode(files["image.png"])
            np.testing.assert_array_equal(image, np.asarray(Image.open(src_image).convert("RGB")))
        mask = decode(files["mask.png"])
        assert image.shape[:2] == mask.shape, key
        np.testing.assert_array_equal(mask, source_mask_01(HUMAN_SEG / src["mask"], image.shape[1::-1]))
    assert kept_jpegs == 288


def test_human_seg_folders_build_matches_csv_build(human_csv, tmp_path):
    out_csv, csv_manifest = human_csv
    out = tmp_path / "from-folders"
    manifest = shards.build_shards(images=HUMAN_SEG / "Training_Images", masks=HUMAN_SEG / "Ground_Truth",
                                   out=out, workers=2, progress=False)
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {"train": 232, "val": 58}
    assert (manifest["counts"]["resized"], len(manifest["ignored"])) == (198, 2)
    # Same keys, same split, same bytes: the CSV and its folders are one dataset.
    assert manifest["splits"] == csv_manifest["splits"]
    assert manifest["sources"] == csv_manifest["sources"]


def test_kill_9_during_build_leaves_nothing_and_rerun_completes(tmp_path):
    root = require_dataset(HUMAN_SEG)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "segdist.cli", "shards", "build", str(root / "train.csv"),
                             "--out", str(out), "--workers", "1", "--samples-per-shard", "4"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not list(tmp_path.glob(".killed.tmp-*/train-000001.tar")):  # mid-write: a 2nd shard exists
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "no shard appeared within 120 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert list(tmp_path.glob(".killed.tmp-*"))  # the partial build is only in the hidden temp folder

    manifest = shards.build_shards(root / "train.csv", out, workers=2, progress=False)
    assert manifest["counts"]["samples"] == 290
    assert manifest["stale_removed"] and not list(tmp_path.glob(".killed.*"))  # temp folder and lock gone
    assert shards.verify_shards(out, progress=False) == []


# ----------------------------------------------------------------------------- a corrupted copy
def _save_exif_rotated(src: Path, dst: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    Image.open(src).save(dst, "JPEG", quality=90, exif=exif)


@pytest.fixture
def broken_dataset(tmp_path):
    """Real human-seg files plus every kind of damage and oddity the builder must handle."""
    root = require_dataset(HUMAN_SEG)
    ds = tmp_path / "broken"
    img, msk = ds / "images", ds / "masks"
    (img / "sub").mkdir(parents=True)
    (msk / "sub").mkdir(parents=True)
    src_i, src_m = root / "Training_Images", root / "Ground_Truth"
    for n in ("1", "10", "276", "97"):  # 276 and 97 have down-scaled masks; 97 is grayscale
        shutil.copy(src_i / f"{n}.jpg", img / f"h{n}.jpg")
        shutil.copy(src_m / f"{n}.png", msk / f"h{n}.png")
    data = (src_i / "10.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(data[: len(data) // 2])
    shutil.copy(src_m / "10.png", msk / "truncated.png")
    shutil.copy(src_i / "1.jpg", img / "zero.jpg")
    (msk / "zero.png").write_bytes(b"")
    shutil.copy(src_i / "1.jpg", img / "nomask.jpg")
    shutil.copy(src_m / "1.png", msk / "orphan.png")
    rgba = Image.open(src_i / "1.jpg").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(img / "rgba.png")
    shutil.copy(src_m / "1.png", msk / "rgba.png")
    shutil.copy(src_i / "10.jpg", img / "deep.jpg")
    deep = (np.asarray(Image.open(src_m / "10.png")) > 0).astype(np.uint16) * 65535
    assert cv2.imwrite(str(msk / "deep.png"), deep)  # 16-bit grayscale PNG, values {0, 65535}
    shutil.copy(src_i / "1.jpg", img / "pal.jpg")
    pal = Image.fromarray((np.asarray(Image.open(src_m / "1.png")) > 0).astype(np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)  # index 1 shows red: must read as 1, not 76
    pal.save(msk / "pal.png")
    shutil.copy(src_i / "1.jpg", img / "aspect.jpg")
    Image.open(src_m / "1.png").resize((100, 100), Image.NEAREST).save(msk / "aspect.png")
    (img / "text.jpg").write_text("this is not a JPEG\n")
    shutil.copy(src_m / "1.png", msk / "text.png")
    _save_exif_rotated(src_i / "10.jpg", img / "rotated.jpg")
    shutil.copy(src_m / "10.png", msk / "rotated.png")  # drawn on the stored (sideways) pixels
    shutil.copy(src_i / "1.jpg", img / "sub" / "Deep_Name.JPG")
    shutil.copy(src_m / "1.png", msk / "sub" / "Deep_Name.png")
    shutil.copy(src_i / "10.jpg", img / "a.b.c.jpeg")
    shutil.copy(src_m / "10.png", msk / "a.b.c.png")
    (img / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (img / "notes.txt").write_text("annotator notes")
    return ds


EXPECTED_SKIPPED = {
    ("images/truncated.jpg", "unreadable image"),
    ("masks/zero.png", "empty file"),
    ("images/nomask.jpg", "no mask"),
    ("masks/orphan.png", "mask without image"),
    ("masks/aspect.png", "different aspect ratio"),
    ("images/text.jpg", "not a readable image"),
}
EXPECTED_KEYS = {"h1", "h10", "h276", "h97", "rgba", "deep", "pal", "rotated", "sub_Deep_Name", "a_b_c"}


def _skip_kinds(entries: list[dict]) -> set[tuple[str, str]]:
    kinds = {r for _, r in EXPECTED_SKIPPED}
    return {(e["path"], next((k for k in kinds if k in e["reason"]), e["reason"])) for e in entries}


def test_broken_copy_via_cli_skips_repairs_and_lists_everything(broken_dataset, tmp_path):
    out = tmp_path / "out"
    result = run_cli("shards", "build", broken_dataset, "--out", out, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "skipped 6" in result.stdout and "images/truncated.jpg" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert _skip_kinds(manifest["skipped"]) == EXPECTED_SKIPPED
    assert {(e["path"], e["reason"].split(" (")[0]) for e in manifest["ignored"]} == {
        ("images/.DS_Store", "stray file"), ("images/notes.txt", "not an image file")}
    assert set(manifest["sources"]) == EXPECTED_KEYS
    assert manifest["task"] == "binary"
    c = manifest["counts"]
    assert (c["samples"], c["resized"], c["oriented"], c["skipped"], c["ignored"]) == (10, 2, 1, 6, 2)
    assert c["reencoded"] == 3  # rgba (alpha dropped), h97 (gray -> RGB), rotated (pixels turned)
    assert run_cli("shards", "verify", out).returncode == 0

    samples = read_samples(out)
    src = broken_dataset
    rgba = decode(samples["rgba"]["image.png"])
    np.testing.assert_array_equal(rgba, np.asarray(Image.open(src / "images/rgba.png"))[..., :3])
    deep = decode(samples["deep"]["mask.png"])
    np.testing.assert_array_equal(deep, (cv2.imread(str(src / "masks/deep.png"), cv2.IMREAD_UNCHANGED) > 0))
    pal = decode(samples["pal"]["mask.png"])
    np.testing.assert_array_equal(pal, np.asarray(Image.open(src / "masks/pal.png")))  # indices, not colours
    upright = np.asarray(ImageOps.exif_transpose(Image.open(src / "images/rotated.jpg")))
    np.testing.assert_array_equal(decode(samples["rotated"]["image.png"]), upright)
    turned = np.rot90(np.asarray(Image.open(src / "masks/rotated.png")), -1)  # the same turn as the image
    np.testing.assert_array_equal(decode(samples["rotated"]["mask.png"]), (turned > 0).astype(np.uint8))
    for key, files in samples.items():
        image = decode(files.get("image.jpg") or files["image.png"])
        assert image.shape[:2] == decode(files["mask.png"]).shape, key
        assert image.ndim == 3 and image.shape[2] == 3, key


def test_on_error_fail_stops_with_a_clear_message_and_no_output(broken_dataset, tmp_path):
    out = tmp_path / "out"
    result = run_cli("shards", "build", broken_dataset, "--out", out, "--on-error", "fail")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("segdist: error: ") and "--on-error fail" in result.stderr
    assert any(path in result.stderr for path, _ in EXPECTED_SKIPPED)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_a_stopped_build_prints_one_line_and_nothing_after_it(tmp_path, on_error):
    """The error is the last word: no tar writer finalised later into a closed file (stderr noise)."""
    src = tmp_path / "src"
    for d in ("images", "masks"):
        (src / d).mkdir(parents=True)
    for i in range(6):
        cv2.imwrite(str(src / "images" / f"{i}.jpg"), np.full((40, 40, 3), 100, np.uint8))
        mask = np.zeros((40, 40), np.uint8)
        mask[5:10] = 1 if i < 4 else 7  # 7 is outside --classes
        cv2.imwrite(str(src / "masks" / f"{i}.png"), mask)
    (src / "classes.json").write_text('["bg", "fg"]')
    out = tmp_path / "out"
    result = run_cli("shards", "build", src, "--out", out, "--classes", src / "classes.json", "--on-error", on_error,
                     "--samples-per-shard", "2", process=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("segdist: error: mask masks/4.png has values 7")
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


# ----------------------------------------------------------------------------- rebuilds
@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    return make_small_shards(tmp_path_factory.mktemp("small"))


def test_rebuild_is_byte_identical_and_replaces_the_old_build(small_shards, tmp_path):
    out = tmp_path / "again"
    syn = small_shards.parent / "syn"
    first = shards.build_shards(syn, out, samples_per_shard=6, workers=2, progress=False)
    second = shards.build_shards(syn, out, samples_per_shard=6, workers=1, progress=False)
    assert first["splits"] == second["splits"] == shards.read_manifest(small_shards)["splits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp folder, old copy or lock left


# ----------------------------------------------------------------------------- clothing-parsing palette masks
def test_clothing_palette_masks_read_as_class_indices(tmp_path):
    root = require_dataset(CLOTHING)
    ds = tmp_path / "clothes"
    (ds / "images").mkdir(parents=True)
    (ds / "masks").mkdir()
    for n in ("0001", "0002", "0003", "0004", "0005"):
        shutil.copy(root / "photos" / f"{n}.jpg", ds / "images")
        shutil.copy(root / "masks" / f"{n}.png", ds / "masks")
    out = tmp_path / "out"
    manifest = shards.build_shards(ds, out, classes=root / "classes.json", workers=1, progress=False)
    assert (manifest["task"], manifest["num_classes"]) == ("multiclass", 59)
    assert manifest["class_names"][:3] == ["null", "accessories", "bag"]
    with Image.open(ds / "masks" / "0001.png") as im:  # the dataset's own class colours, for predicted masks
        pal = im.getpalette()
    assert manifest["palette"] == [pal[3 * i:3 * i + 3] for i in range(59)]
    assert shards.open_shards(str(out)).palette == manifest["palette"]
    for key, files in read_samples(out).items():
        expected = np.asarray(Image.open(ds / "masks" / f"{key}.png"))  # mode P: the indices
        np.testing.assert_array_equal(decode(files["mask.png"]), expected)
        assert files["image.jpg"] == (ds / "images" / f"{key}.jpg").read_bytes()
    assert shards.verify_shards(out, workers=1, progress=False) == []


# ----------------------------------------------------------------------------- sources and options
def _tiny_pairs(folder: Path, n: int = 4, size: int = 40) -> None:
    make_synthetic(folder, n=n, size=size, seed=9)


def test_csv_and_jsonl_manifests_with_custom_columns_splits_and_absolute_paths(tmp_path):
    syn = tmp_path / "syn"
    _tiny_pairs(syn, n=6)
    rows = [(f"images/{i:04d}.jpg", str(syn / "masks" / f"{i:04d}.png"), "train" if i < 4 else "valid")
            for i in range(6)]
    (syn / "list.csv").write_text("photo,label_map,fold\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    m = shards.build_shards(syn / "list.csv", tmp_path / "a", image_col="photo", mask_col="label_map",
                            split_col="fold", workers=1, progress=False)
    assert {s: v["samples"] for s, v in m["splits"].items()} == {"train": 4, "val": 2}
    assert m["split"]["method"] == "given"
    (syn / "list.jsonl").write_text("".join(json.dumps({"img": a, "mask": b}) + "\n" for a, b, _ in rows))
    m = shards.build_shards(syn / "list.jsonl", tmp_path / "b", val_fraction=0.5, workers=1, progress=False)
    assert {s: v["samples"] for s, v in m["splits"].items()} == {"train": 3, "val": 3}
    with pytest.raises(UserError, match="cannot tell which column"):
        (syn / "bad.csv").write_text("a,b\nx,y\n")
        shards.build_shards(syn / "bad.csv", tmp_path / "c", progress=False)


def test_split_folders_mask_pattern_and_nested_folders(tmp_path):
    syn = tmp_path / "syn"
    _tiny_pairs(syn, n=5)
    ds = tmp_path / "ds"
    for split, ids in (("train", range(3)), ("val", range(3, 5))):
        (ds / split / "images" / "deep").mkdir(parents=True)
        (ds / split / "masks" / "deep").mkdir(parents=True)
        for i in ids:
            shutil.copy(syn / "images" / f"{i:04d}.jpg", ds / split / "images" / "deep" / f"{i}.JPG")
            shutil.copy(syn / "masks" / f"{i:04d}.png", ds / split / "masks" / "deep" / f"{i}_mask.png")
    m = shards.build_shards(ds, tmp_path / "out", mask_pattern="{stem}_mask.png", workers=1, progress=False)
    assert {s: v["samples"] for s, v in m["splits"].items()} == {"train": 3, "val": 2}
    assert set(m["sources"]) == {"train_deep_0", "train_deep_1", "train_deep_2", "val_deep_3", "val_deep_4"}
    assert m["source"]["kind"] == "split-folders" and m["split"] == {"method": "given"}


def test_segnet_camvid_layout_via_cli_gives_three_splits_11_classes_and_void(tmp_path):
    src = make_camvid_like(tmp_path / "CamVid", counts=(("train", 6), ("val", 4), ("test", 5)))
    out = tmp_path / "shards"
    r = run_cli("shards", "build", src, "--out", out, "--void", 11, "--classes", CAMVID_CLASSES, "--workers", 1)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert (m["task"], m["num_classes"], m["source"]["kind"]) == ("multiclass", 11, "split-folders")
    assert m["class_names"][2] == "pole" and m["class_names"][-1] == "bicyclist"
    assert {s: v["samples"] for s, v in m["splits"].items()} == {"train": 6, "val": 4, "test": 5}
    assert m["split"] == {"method": "given"} and m["counts"]["skipped"] == 0
    assert all(v["void_pixels"] == v["samples"] * 48 for v in m["splits"].values())  # the top row of each mask
    for key, files in read_samples(out).items():
        split, _, name = key.partition("_")
        source = np.asarray(Image.open(src / f"{split}annot" / f"{name}.png"))
        np.testing.assert_array_equal(decode(files["mask.png"]), np.where(source == 11, 255, source))


def test_unknown_mask_values_error_ignore_and_skip(tmp_path):
    syn = tmp_path / "syn"
    make_synthetic(syn, n=4, size=40, classes=4, seed=1)
    (tmp_path / "classes.json").write_text(json.dumps(["bg", "one"]))  # declares 2 classes, masks hold 0..3
    kw = dict(classes=tmp_path / "classes.json", workers=1, progress=False)
    with pytest.raises(UserError, match=r"outside the 2 declared classes.*--unknown-values"):
        shards.build_shards(syn, tmp_path / "a", **kw)
    assert not (tmp_path / "a").exists()
    m = shards.build_shards(syn, tmp_path / "b", unknown_values="ignore", **kw)
    assert m["counts"]["unknown_values_ignored"] >= 1
    assert all(set(np.unique(decode(f["mask.png"]))) <= {0, 1, 255} for f in read_samples(tmp_path / "b").values())
    m = shards.build_shards(syn, tmp_path / "c", unknown_values="skip", **kw)
    assert m["skipped"] and all("not declared classes" in e["reason"] for e in m["skipped"])


def test_void_value_is_stored_as_255(tmp_path):
    syn = tmp_path / "syn"
    make_synthetic(syn, n=6, size=40, classes=4, seed=2)
    m = shards.build_shards(syn, tmp_path / "out", void=3, val_fraction=0, workers=1, progress=False)
    assert (m["task"], m["num_classes"]) == ("multiclass", 3)  # values 0, 1, 2 are classes; 3 is void
    assert m["splits"]["train"]["void_pixels"] > 0
    for key, files in read_samples(tmp_path / "out").items():
        source = np.asarray(Image.open(syn / "masks" / f"{key}.png"))
        np.testing.assert_array_equal(decode(files["mask.png"]), np.where(source == 3, 255, source))


def test_rgb_colour_masks_with_palette_file(tmp_path):
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "masks").mkdir()
    colours = [[0, 0, 0], [255, 0, 0], [0, 128, 255]]
    labels = np.zeros((30, 40), np.uint8)
    labels[5:15, 5:20], labels[18:28, 22:38] = 1, 2
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(ds / "images" / "x.png")
    Image.fromarray(np.array(colours, np.uint8)[labels]).save(ds / "masks" / "x.png")
    (tmp_path / "palette.json").write_text(json.dumps({"colors": colours, "classes": ["bg", "red", "blue"]}))
    m = shards.build_shards(ds, tmp_path / "out", palette=tmp_path / "palette.json", val_fraction=0,
                            workers=1, progress=False)
    assert (m["task"], m["class_names"]) == ("multiclass", ["bg", "red", "blue"])
    assert m["palette"] == colours
    files = read_samples(tmp_path / "out")["x"]
    np.testing.assert_array_equal(decode(files["mask.png"]), labels)
    assert "image.png" in files  # an unchanged 8-bit RGB PNG keeps its bytes
    assert files["image.png"] == (ds / "images" / "x.png").read_bytes()
    (tmp_path / "void.json").write_text(json.dumps({"colors": colours, "void": 255}))  # an index, not a colour
    with pytest.raises(UserError, match="'void' is 255; it must be an \\[r, g, b\\] colour"):
        shards.build_shards(ds, tmp_path / "out2", palette=tmp_path / "void.json", workers=1, progress=False)


def test_max_side_gray_channels_and_shard_size(tmp_path):
    syn = tmp_path / "syn"
    make_synthetic(syn, n=8, size=128, seed=3)
    m = shards.build_shards(syn, tmp_path / "a", max_side=64, channels=1, reencode="jpeg", jpeg_quality=90,
                            shard_size_mb=0.005, workers=1, progress=False)
    assert m["image_size"]["max_w"] == 64 and m["counts"]["downscaled"] == 8 and m["channels"] == 1
    assert len(m["splits"]["train"]["shards"]) > 1  # 5 kB shards hold one or two samples
    for files in read_samples(tmp_path / "a").values():
        image, mask = decode(files["image.jpg"]), decode(files["mask.png"])
        assert image.shape == (64, 64) and mask.shape == (64, 64)
    assert shards.verify_shards(tmp_path / "a", workers=1, progress=False) == []


def test_anti_aliased_binary_masks_need_a_threshold(tmp_path):
    syn = tmp_path / "syn"
    _tiny_pairs(syn, n=4)
    for p in (syn / "masks").iterdir():  # 0/255 masks, one of them blurred at the edges
        mask = cv2.imread(str(p), cv2.IMREAD_UNCHANGED) * 255
        cv2.imwrite(str(p), cv2.GaussianBlur(mask, (5, 5), 0) if p.name == "0002.png" else mask)
    with pytest.raises(UserError, match=r"masks/0002.png.*--mask-threshold 127"):
        shards.build_shards(syn, tmp_path / "a", workers=1, progress=False)
    m = shards.build_shards(syn, tmp_path / "b", mask_threshold=127, workers=1, progress=False)
    assert m["task"] == "binary"
    assert all(set(np.unique(decode(f["mask.png"]))) <= {0, 1} for f in read_samples(tmp_path / "b").values())


def test_cmyk_16bit_and_gray_images_become_8bit_rgb(tmp_path):
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "masks").mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(ds / "images" / "cmyk.jpg", quality=95)
    wide = (rng.integers(0, 65536, (24, 32))).astype(np.uint16)
    assert cv2.imwrite(str(ds / "images" / "wide.png"), wide)
    Image.fromarray(rgb[..., 0]).save(ds / "images" / "gray.png")
    for name in ("cmyk", "wide", "gray"):
        Image.fromarray((rgb[..., 1] > 127).astype(np.uint8)).save(ds / "masks" / f"{name}.png")
    m = shards.build_shards(ds, tmp_path / "out", val_fraction=0, workers=1, progress=False)
    assert m["counts"]["reencoded"] == 3 and m["counts"]["skipped"] == 0
    samples = read_samples(tmp_path / "out")
    for key, files in samples.items():
        image = decode(files["image.png"])
        assert image.dtype == np.uint8 and image.shape == (24, 32, 3), key
    cmyk = np.asarray(Image.open(ds / "images" / "cmyk.jpg").convert("RGB"))
    np.testing.assert_array_equal(decode(samples["cmyk"]["image.png"]), cmyk)
    expected_wide = ((wide.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)  # full 16-bit range -> 8 bit
    np.testing.assert_array_equal(decode(samples["wide"]["image.png"])[..., 0], expected_wide)
    np.testing.assert_array_equal(decode(samples["gray"]["image.png"]), np.repeat(rgb[..., :1], 3, axis=2))


def test_masks_beside_images_with_a_pattern(tmp_path):
    syn = tmp_path / "syn"
    _tiny_pairs(syn, n=3)
    both = tmp_path / "both"
    both.mkdir()
    for i in range(3):
        shutil.copy(syn / "images" / f"{i:04d}.jpg", both / f"im{i}.jpg")
        shutil.copy(syn / "masks" / f"{i:04d}.png", both / f"im{i}_mask.png")
    shutil.copy(syn / "images" / "0000.jpg", both / "lonely.jpg")
    m = shards.build_shards(images=both, masks=both, mask_pattern="{stem}_mask.png", out=tmp_path / "out",
                            workers=1, progress=False)
    assert set(m["sources"]) == {"im0", "im1", "im2"}
    assert [(e["path"], e["reason"].split(" (")[0]) for e in m["skipped"]] == [("lonely.jpg", "no mask")]
    with pytest.raises(UserError, match="--mask-pattern"):
        shards.build_shards(images=both, masks=both, out=tmp_path / "o2", progress=False)


def test_out_folder_safety(tmp_path):
    syn = tmp_path / "syn"
    _tiny_pairs(syn)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="--force"):
        shards.build_shards(syn, foreign, workers=1, progress=False)
    assert (foreign / "keep.txt").exists()
    with pytest.raises(UserError, match="replace the source"):
        shards.build_shards(syn / "images", syn, images=syn / "images", masks=syn / "masks", workers=1, progress=False)
    with pytest.raises(UserError, match="val-fraction"):
        shards.build_shards(syn, tmp_path / "o", val_fraction=1.5)
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="--out .*afile is a file, so no folder can be made there"):
        shards.build_shards(syn, tmp_path / "afile" / "shards", workers=1, progress=False)


def test_cli_flags_are_the_build_options():
    """`segdist shards build` passes its flags to build_shards by BuildOptions field name, with its defaults."""
    parser = argparse.ArgumentParser()
    shards.add_cli(parser.add_subparsers())
    args = vars(parser.parse_args(["shards", "build", "src", "--out", "out"]))
    defaults = shards.BuildOptions()
    for f in dataclasses.fields(shards.BuildOptions):
        assert f.name in args, f.name
        if f.name != "workers":  # the CLI says 0 (CPU count), the API None (the same)
            assert args[f.name] == getattr(defaults, f.name), f.name
