"""`segdist eval`: full-resolution scores (--mode resize|sliding) equal a hand count, on 1 and 2 processes."""

from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import HUMAN_SEG, require_dataset

VAL = ["104", "10", "15", "17", "19"]  # human-segmentation photos of 5 different non-square shapes (and one square)


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """Real photos and masks (human-segmentation), longer side 96 px, in shards: val 2 + 2 + 1 samples, train 1."""
    from segdist.shards import build_shards

    root = require_dataset(HUMAN_SEG)
    tmp = tmp_path_factory.mktemp("evalshards")
    for split, stems in {"train": ["1"], "val": VAL}.items():
        for sub in ("images", "masks"):
            (tmp / "src" / split / sub).mkdir(parents=True)
        for s in stems:
            (tmp / "src" / split / "images" / f"{s}.jpg").symlink_to(root / "Training_Images" / f"{s}.jpg")
            (tmp / "src" / split / "masks" / f"{s}.png").symlink_to(root / "Ground_Truth" / f"{s}.png")
    build_shards(tmp / "src", tmp / "shards", max_side=96, samples_per_shard=2, workers=1, progress=False)
    return tmp / "shards"


def val_samples(shards) -> list[dict]:
    from segdist.shards import open_shards
    from segdist.shards import read_samples

    urls, sizes = open_shards(str(shards)).split("val")
    return [s for url, n in zip(urls, sizes) for s in read_samples(url, n)]


@pytest.fixture(scope="module")
def mixed_ckpt(tmp_path_factory, photo_shards):
    """A tiny untrained binary model (64 px) whose output bias puts its median logit on the val photos
    at 0, so its masks mix both classes and the counts below are not trivially all-background."""
    from segdist.augment import normalize
    from segdist.checkpoint import ModelMeta, save_model
    from segdist.config import load_config
    from segdist.models import create_model

    cfg = load_config(None, ["model.pretrained=none", "data.image_size=64"])
    model = create_model(cfg.model, 1).eval()
    rows = [cv2.resize(rgb(s), (64, 64), interpolation=cv2.INTER_LINEAR) for s in val_samples(photo_shards)]
    x = normalize(torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2), cfg.augment.mean, cfg.augment.std)
    with torch.no_grad():
        model.segmentation_head[0].bias -= model(x).median()
    out = tmp_path_factory.mktemp("mixed") / "best"
    save_model(model, out, ModelMeta(cfg, ("background", "foreground"), 2, True))
    return out


def rgb(sample: dict) -> np.ndarray:
    data = sample["image.jpg"] if "image.jpg" in sample else sample["image.png"]
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def count(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(2 classes, tp/fp/fn) by hand, 255 in the truth ignored."""
    valid = gt != 255
    return np.array([[np.sum((pred == c) & (gt == c) & valid), np.sum((pred == c) & (gt != c) & valid),
                      np.sum((pred != c) & (gt == c) & valid)] for c in (0, 1)])


def counts_of(metrics: dict) -> np.ndarray:
    return np.array([[c["tp"], c["fp"], c["fn"]] for c in metrics["per_class"]])


def test_native_resize_eval_equals_a_hand_count(mixed_ckpt, photo_shards, capsys):
    """Each val image squashed to 64 px by hand, logits resized back to its native size, counted with numpy."""
    from segdist.checkpoint import read_meta
    from segdist.evaluate import evaluate_native
    from segdist.models import load_model

    meta, model = read_meta(mixed_ckpt), load_model(mixed_ckpt)
    mean, std = torch.tensor(meta.mean).view(3, 1, 1), torch.tensor(meta.std).view(3, 1, 1)
    want, shapes = np.zeros((2, 3), np.int64), set()
    for s in val_samples(photo_shards):
        img, gt = rgb(s), cv2.imdecode(np.frombuffer(s["mask.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        h, w = gt.shape
        assert img.shape[:2] == (h, w) and h < 128 and w < 128  # under 2x down the resize rule is bilinear
        x = cv2.resize(img, (64, 64), interpolation=cv2.INTER_LINEAR)
        x = (torch.from_numpy(x).permute(2, 0, 1).float() / 255.0 - mean) / std
        with torch.no_grad():
            logits = F.interpolate(model(x[None]), size=(h, w), mode="bilinear", align_corners=False)
        want += count((torch.sigmoid(logits[0, 0]) > 0.5).numpy(), gt)
        shapes.add((h, w))
    assert len(shapes) == len(VAL) and want[1, 0] > 0 and want[0, 0] > 0  # both classes predicted somewhere

    metrics = evaluate_native(mixed_ckpt, str(photo_shards), mode="resize", as_json=True)
    assert metrics["num_samples"] == len(VAL)
    assert np.array_equal(counts_of(metrics), want), (counts_of(metrics), want)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["resolution"] == "native (resize: squashed to 64x64)" and "loss" not in printed


def test_native_sliding_eval_counts_what_predict_predicts(mixed_ckpt, photo_shards, capsys):
    import segdist
    from segdist.evaluate import evaluate_native

    model = segdist.load(mixed_ckpt, device="cpu", mode="sliding", tta="flip", blend="linear")
    want = np.zeros((2, 3), np.int64)
    for s in val_samples(photo_shards):
        gt = cv2.imdecode(np.frombuffer(s["mask.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        want += count(model.predict(rgb(s)), gt)
    metrics = evaluate_native(mixed_ckpt, str(photo_shards), mode="sliding", tta="flip", blend="linear")
    assert np.array_equal(counts_of(metrics), want)
    assert "val at native (sliding 64x64 windows (overlap 0.5, linear), TTA flip): IoU" in capsys.readouterr().out


def test_default_eval_is_still_the_stream_and_says_its_resolution(mixed_ckpt, photo_shards, capsys):
    from segdist.cli import main

    assert main(["eval", str(mixed_ckpt), "--shards", str(photo_shards), "--json", "--num-workers", "0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["num_samples"] == len(VAL) and "loss" in out
    assert out["resolution"] == "the network input 64x64 (data.resize squash)"
    assert main(["eval", str(mixed_ckpt), "--shards", str(photo_shards), "--tta", "flip"]) == 2
    assert "--tta needs --mode resize or sliding" in capsys.readouterr().err


def test_full_res_reports_both_resolutions_with_full_res_the_headline(mixed_ckpt, photo_shards, capsys, tmp_path):
    """`--full-res` = the `--mode resize` counts (headline) + the stream scores; pixel accuracy by hand."""
    from segdist.cli import main

    args = [str(mixed_ckpt), "--shards", str(photo_shards), "--json", "--num-workers", "0"]
    outs = {}
    for name, extra in {"full": ["--full-res"], "resize": ["--mode", "resize"], "stream": []}.items():
        assert main(["eval", *args, *extra]) == 0
        outs[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    full, resize, stream = outs["full"], outs["resize"], outs["stream"]
    assert counts_of(full) == pytest.approx(counts_of(resize)) and full["iou"] == resize["iou"]
    assert full["resolution"].startswith("native") and full["input_res"]["iou"] == stream["iou"]
    assert full["iou"] != full["input_res"]["iou"]  # the two resolutions really differ here
    tp = counts_of(full)[:, 0]
    assert full["pixel_acc"] == pytest.approx(tp.sum() / (tp.sum() + counts_of(full)[:, 1].sum()))
    assert main(["eval", *args[:-3], "--full-res", "--tta", "flip"]) == 0
    text = capsys.readouterr().out
    assert "val at the network input 64x64" in text and "TTA flip" in text and "headline (full resolution): IoU" in text
    assert main(["eval", *args, "--full-res", "--mode", "sliding"]) == 2
    assert "--full-res" in capsys.readouterr().err
    assert main(["eval", *args, "--full-res", "--out", str(tmp_path / "ev")]) == 0
    written = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert written["iou"] == full["iou"] and written["input_res"]["iou"] == stream["iou"]
    assert len(written["confusion"]) == 2 and written["per_class"][1]["name"] == "foreground"
    assert (tmp_path / "ev" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "file").write_text("x")
    assert main(["eval", *args, "--out", str(tmp_path / "file" / "ev")]) == 2  # refused before evaluating
    err = capsys.readouterr()
    assert "--out" in err.err and "file is a file, so no folder can be made there" in err.err and "IoU" not in err.out


@pytest.mark.slow
def test_training_evaluates_at_full_resolution_each_epoch(photo_shards, tmp_path, capsys):
    """train.eval_full_res: the logged headline is what `segdist eval --full-res --tta flip` gives on the
    saved model; the network-input score is logged beside it and best/ follows the headline."""
    from segdist.cli import main
    from segdist.config import load_config
    from segdist.evaluate import evaluate_full_res
    from segdist.train import run

    base = [f"data.shards={photo_shards}", "data.image_size=64", "data.batch_size=1", "data.num_workers=0",
            "model.pretrained=none", "track.backend=none", f"train.out_dir={tmp_path}", "train.name=fr",
            "train.overlays=0"]
    cfg = load_config(None, [*base, "train.epochs=1", "train.eval_full_res=true", "train.eval_tta=flip"])
    run(cfg)
    logged = [json.loads(line) for line in (tmp_path / "fr" / "metrics.jsonl").read_text().splitlines()][-1]
    again = evaluate_full_res(tmp_path / "fr" / "best", str(photo_shards), tta="flip", num_workers=0, as_json=True)
    assert logged["val_iou"] == again["iou"] and logged["val_input_iou"] == again["input_res"]["iou"]
    assert logged["val_pixel_acc"] == again["pixel_acc"]
    assert "TTA flip" in (tmp_path / "fr" / "best" / "README.md").read_text()
    # A resume that scores differently starts best/ afresh instead of comparing across resolutions.
    run(load_config(None, [*base, "train.epochs=2", "train.resume=auto"]))
    printed = capsys.readouterr().out
    assert "best/ was scored full_res+flip" in printed and "this run scores input" in printed
    assert "TTA flip" not in (tmp_path / "fr" / "best" / "README.md").read_text()
    loop = json.loads(max((tmp_path / "fr" / "states").glob("step-*")).joinpath("loop.json").read_text())
    assert loop["best_at"] == "input"
    assert main(["train", "--config", "configs/demo.yaml", "train.eval_tta=flipp"]) == 2


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_process_sliding_eval_equals_one_process(mixed_ckpt, photo_shards):
    from tests.test_distributed import LAUNCH, run

    args = ["-m", "segdist", "eval", str(mixed_ckpt), "--shards", str(photo_shards), "--mode", "sliding",
            "--tta", "flip", "--json", "--batch-size", "3", "--num-workers", "1"]
    single, double = (json.loads(run([*launcher, *args]).stdout.strip().splitlines()[-1])
                      for launcher in ([sys.executable], LAUNCH))
    assert single["num_samples"] == double["num_samples"] == len(VAL)
    assert single["per_class"] == double["per_class"]
    for key in ("iou", "dice", "micro_iou", "micro_dice"):
        assert single[key] == double[key]
