"""Predict: masks, overlays and probabilities at each input's original size in every mode; bad inputs are clear
errors."""

from __future__ import annotations

import copy
import functools
import itertools
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from segdist.errors import UserError
from segdist.infer import predict_paths
from tests.cliutil import run_segdist
from tests.conftest import HUMAN_SEG, REPO, require_dataset


def test_predict_keeps_original_size(ckpt, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sizes = {"wide.jpg": (45, 130), "tall.png": (201, 77)}
    for name, (h, w) in sizes.items():
        cv2.imwrite(str(src / name), np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    (src / "broken.jpg").write_bytes(b"not an image")
    msg = predict_paths(ckpt, src, tmp_path / "out", device="cpu")
    assert "predicted 2 image(s)" in msg and "skipped 1 unreadable: broken.jpg" in msg
    for name, (h, w) in sizes.items():
        stem = name.rsplit(".", 1)[0]
        mask = cv2.imread(str(tmp_path / "out" / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        ov = cv2.imread(str(tmp_path / "out" / "overlays" / f"{stem}.png"))
        assert mask.shape == (h, w) and ov.shape == (h, w, 3)
        assert set(np.unique(mask)) <= {0, 255}


def test_predict_real_photo_size(ckpt, tmp_path):
    photo = require_dataset(HUMAN_SEG) / "Training_Images" / "1.jpg"
    predict_paths(ckpt, photo, tmp_path, device="cpu")
    h, w = cv2.imread(str(photo)).shape[:2]
    assert cv2.imread(str(tmp_path / "masks" / "1.png"), cv2.IMREAD_UNCHANGED).shape == (h, w)


def test_missing_input_and_bad_checkpoint_are_user_errors(ckpt, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        predict_paths(ckpt, tmp_path / "nope", tmp_path / "o")
    with pytest.raises(UserError, match="not a segdist model folder"):
        predict_paths(tmp_path, tmp_path, tmp_path / "o")
    p = run_segdist("predict", tmp_path / "x", tmp_path, "--out", tmp_path / "o")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "segdist: error:" in p.stderr


def test_unusable_out_device_and_damaged_model_folder_are_user_errors(ckpt, tmp_path):
    import shutil

    photo = tmp_path / "a.png"
    cv2.imwrite(str(photo), np.zeros((20, 30, 3), np.uint8))
    (tmp_path / "taken").write_text("a file where the output folder should go")
    with pytest.raises(UserError, match="--out .*taken is a file; pass a folder"):
        predict_paths(ckpt, photo, tmp_path / "taken", device="cpu")
    with pytest.raises(UserError, match="--out .*taken is a file, so no folder can be made there"):
        predict_paths(ckpt, photo, tmp_path / "taken" / "sub", device="cpu")
    with pytest.raises(UserError, match="'gpu' is not a device"):
        predict_paths(ckpt, photo, tmp_path / "o", device="gpu")
    with pytest.raises(UserError, match="predicts on auto, cpu, cuda, cuda:N or mps"):
        predict_paths(ckpt, photo, tmp_path / "o", device="meta")
    bad_gpu = "cuda:99" if torch.cuda.is_available() else "cuda"
    with pytest.raises(UserError, match="no such GPU|CUDA GPU\\(s\\)"):
        predict_paths(ckpt, photo, tmp_path / "o", device=bad_gpu)
    torn = tmp_path / "torn"
    shutil.copytree(ckpt, torn)
    (torn / "segdist.json").write_text('{"image_size": 64, "me')  # cut short
    with pytest.raises(UserError, match="segdist.json is unreadable .* the model folder is damaged"):
        predict_paths(torn, photo, tmp_path / "o", device="cpu")
    (torn / "segdist.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="holds list, not a segdist model description"):
        predict_paths(torn, photo, tmp_path / "o", device="cpu")
    p = run_segdist("predict", torn, photo, "--out", tmp_path / "o")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "the folder is damaged" in p.stderr
    assert not (tmp_path / "o").exists()  # checked, not created: runs that stopped early leave no empty folder


def test_same_stem_in_subfolders_and_extensions_do_not_overwrite(ckpt, tmp_path):
    src = tmp_path / "in"
    for rel in ("a/x.jpg", "b/x.jpg", "x.jpg", "x.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(src / rel), np.zeros((40, 50, 3), np.uint8))
    predict_paths(ckpt, src, tmp_path / "out", device="cpu")
    got = sorted(str(p.relative_to(tmp_path / "out" / "masks")) for p in (tmp_path / "out" / "masks").rglob("*.png"))
    assert got == ["a/x.png", "b/x.png", "x_jpg.png", "x_png.png"]


def huge_png() -> bytes:
    """A valid PNG header that claims 60000 x 60000 pixels: cv2.imread raises on it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_an_image_opencv_refuses_is_skipped_with_its_reason(ckpt, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a_huge.png").write_bytes(huge_png())
    cv2.imwrite(str(src / "b_ok.png"), np.zeros((30, 40, 3), np.uint8))
    msg = predict_paths(ckpt, src, tmp_path / "out", device="cpu")
    assert "predicted 1 image(s)" in msg and "skipped 1 unreadable: a_huge.png (larger than OpenCV" in msg
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["b_ok.png"]


def test_train_eval_and_predict_make_byte_identical_network_input(tmp_path):
    """One rule from bytes to pixels: the train stream, the val stream and predict agree exactly."""
    import torch
    import webdataset as wds

    from segdist.augment import DeviceAugment, normalize
    from segdist.checkpoint import ModelMeta
    from segdist.config import AugmentConfig, load_config
    from segdist.infer import network_input
    from tests.shardutil import make_loader

    photos = sorted((require_dataset(HUMAN_SEG) / "Training_Images").glob("*.jpg"))[:4]
    raw = {f"k{i}": p.read_bytes() for i, p in enumerate(photos)}
    mask = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
    with wds.TarWriter(str(tmp_path / "s.tar")) as w:
        for k, data in raw.items():
            w.write({"__key__": k, "image.jpg": data, "mask.png": mask})
    size = 96
    meta = ModelMeta(load_config(None, [f"data.image_size={size}"]), ("bg", "fg"), 2, True)
    rows = {}
    for train in (True, False):
        loader = make_loader([str(tmp_path / "s.tar")], [len(raw)], batch_size=2, image_size=size, train=train,
                             num_workers=0, pin_memory=False)
        for b in loader:
            for k, img in zip(b["key"], b["image"]):
                rows.setdefault(k, []).append(img)
    assert sorted(rows) == sorted(raw)
    for k, data in raw.items():
        want = network_input(data, meta)
        assert want.dtype == torch.uint8 and want.shape == (3, size, size)
        assert all(torch.equal(got, want) for got in rows[k]), k
        x_eval, _ = DeviceAugment(AugmentConfig(), train=False)(rows[k][1][None], torch.zeros(1, size, size))
        assert torch.equal(x_eval, normalize(want[None], meta.mean, meta.std))


# ----------------------------------------------------------------------------- modes, TTA, blending
@functools.lru_cache(maxsize=4)
def loaded(ckpt):
    from segdist.models import load_model

    return load_model(ckpt)


def predictor(ckpt, mode="resize", data=None, image_size=None, batch_size=4, **options):
    """A Predictor on the CPU for ``ckpt``'s model (loaded once), with its meta's data keys / image size changed."""
    from segdist.checkpoint import read_meta
    from segdist.infer import Predictor, options_for

    meta = copy.deepcopy(read_meta(ckpt))
    for k, v in {**(data or {}), **({"image_size": image_size} if image_size is not None else {})}.items():
        setattr(meta.config.data, k, v)
    return Predictor(loaded(ckpt), meta, options_for(meta, mode, **options), "cpu", batch_size=batch_size)


def photo(name: str = "1.jpg"):
    return require_dataset(HUMAN_SEG) / "Training_Images" / name


@pytest.mark.parametrize("resize", ["squash", "none", "short_side"])
def test_sliding_over_a_one_window_image_is_exactly_plain_inference(ckpt, resize):
    rgb = cv2.cvtColor(cv2.resize(cv2.imread(str(photo())), (64, 64), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    data = {"resize": resize, "short_side": 64}
    plain = predictor(ckpt, "resize", data).predict_proba(rgb)
    for blend in ("gaussian", "linear", "mean"):
        sliding = predictor(ckpt, "sliding", data, blend=blend).predict_proba(rgb)
        assert sliding.shape == plain.shape == (1, 64, 64) and sliding.dtype == np.float32
        assert np.array_equal(sliding, plain), blend


def test_masks_have_the_originals_size_in_every_mode(ckpt):
    """Non-square photos, a non-square training size, every data.resize x --mode, TTA scales too."""
    from segdist import infer

    photos = itertools.cycle([photo("1.jpg"), photo("104.jpg")])
    for (resize, mode), f in zip(itertools.product(("squash", "short_side", "none"), infer.MODES), photos):
        tta = "flip,0.75" if (resize, mode) == ("short_side", "resize") else ""
        mask = predictor(ckpt, mode, {"resize": resize}, image_size=[64, 96], overlap=0.0, tta=tta).predict(f)
        assert mask.shape == cv2.imread(str(f)).shape[:2], (resize, mode)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}


@pytest.mark.parametrize("mode", ["resize", "sliding"])
def test_tta_flip_is_the_mean_of_the_image_and_its_mirror(ckpt, mode):
    rgb = cv2.cvtColor(cv2.imread(str(photo("104.jpg"))), cv2.COLOR_BGR2RGB)[:80, :100]
    data = {"resize": "none"}  # sliding: 2 x 3 windows of 64 px, the last column not on the stride
    plain = predictor(ckpt, mode, data, batch_size=1)  # one input per batch in both: the same kernels
    both = predictor(ckpt, mode, data, batch_size=1, tta="flip").predict_proba(rgb)
    mirrored = plain.predict_proba(rgb[:, ::-1])[..., ::-1]
    np.testing.assert_allclose(both, (plain.predict_proba(rgb) + mirrored) / 2, rtol=0, atol=1e-6)


class ConstantLogits(torch.nn.Module):
    """A 'model' whose logits are the same constants at every pixel: blending must give them back."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values, dtype=torch.float32)

    def forward(self, x):
        return self.values.view(1, -1, 1, 1).expand(len(x), -1, *x.shape[-2:]).clone()


@pytest.mark.parametrize("blend", ["gaussian", "linear", "mean"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
def test_blend_weights_sum_to_one_at_every_pixel(blend, overlap):
    from segdist.checkpoint import ModelMeta
    from segdist.config import load_config
    from segdist.infer import Predictor, options_for, plan_views

    cfg = load_config(None, ["data.image_size=[32, 64]", "augment.mean=[0.5, 0.5, 0.5]",
                             "augment.std=[0.25, 0.25, 0.25]"])
    meta = ModelMeta(cfg, ("a", "b", "c"), 3, False)
    opts = options_for(meta, "sliding", overlap=overlap, blend=blend)
    (view,) = plan_views(opts, (100, 130))
    assert len(view.origins) > 4 and max(y for y, _ in view.origins) == 100 - 32  # last window at the edge
    assert max(x for _, x in view.origins) == 130 - 64
    values = [0.3, -1.2, 2.0]
    probs = Predictor(ConstantLogits(values), meta, opts).predict_proba(np.zeros((100, 130, 3), np.uint8))
    want = torch.tensor(values).softmax(0).numpy()
    np.testing.assert_allclose(probs, np.broadcast_to(want[:, None, None], probs.shape), rtol=0, atol=1e-6)
    binary = Predictor(ConstantLogits([0.7]), meta, opts).predict_proba(np.zeros((20, 130, 3), np.uint8))  # padded
    np.testing.assert_allclose(binary, float(torch.sigmoid(torch.tensor(0.7))), rtol=0, atol=1e-6)


def test_bad_options_are_user_errors(ckpt):
    for kw, msg in (({"tta": "flop"}, "neither 'flip' nor a scale"), ({"overlap": 1.0}, "--overlap"),
                    ({"blend": "max"}, "--blend 'max'"), ({"mode": "tiles"}, "--mode 'tiles'")):
        with pytest.raises(UserError, match=msg):
            predictor(ckpt, **{"mode": "resize", **kw})


# ----------------------------------------------------------------------------- inputs and outputs
def test_glob_and_shard_folder_inputs(ckpt, tmp_path):
    from tests.shardutil import write_shards

    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for rel, (h, w) in {"a.jpg": (30, 50), "b.png": (40, 40), "sub/c.jpg": (52, 33)}.items():
        cv2.imwrite(str(src / rel), np.full((h, w, 3), 90, np.uint8))
    (src / "notes.jpg.txt").write_text("not an image")
    msg = predict_paths(ckpt, [str(src / "**" / "*.jpg")], tmp_path / "g", device="cpu")
    assert "predicted 2 image(s)" in msg
    got = {str(p.relative_to(tmp_path / "g" / "masks")): cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape
           for p in (tmp_path / "g" / "masks").rglob("*.png")}
    assert got == {"a.png": (30, 50), "sub/c.png": (52, 33)}
    with pytest.raises(UserError, match="matches no images"):
        predict_paths(ckpt, [str(src / "*.tif")], tmp_path / "none", device="cpu")

    shards = write_shards(tmp_path / "shards", {"train": [2], "val": [2, 1]}, size=40)
    msg = predict_paths(ckpt, [shards, src / "a.jpg"], tmp_path / "s", device="cpu", overlays=False)
    assert "predicted 4 image(s) into" in msg and not (tmp_path / "s" / "overlays").exists()
    assert sorted(p.name for p in (tmp_path / "s" / "masks").iterdir()) == ["a.png", "val_00002.png",
                                                                            "val_00003.png", "val_00004.png"]
    predict_paths(ckpt, [shards], tmp_path / "t", device="cpu", split="train")
    assert sorted(p.name for p in (tmp_path / "t" / "masks").iterdir()) == ["train_00000.png", "train_00001.png"]


@pytest.fixture(scope="module")
def ckpt3(tmp_path_factory):
    """A tiny untrained 3-class model with class colours in its meta (the shards --palette format)."""
    from segdist.checkpoint import ModelMeta, save_model
    from segdist.config import load_config
    from segdist.models import create_model

    cfg = load_config(None, ["model.pretrained=none", "data.image_size=64"])
    out = tmp_path_factory.mktemp("ckpt3") / "best"
    meta = ModelMeta(cfg, ("bg", "shirt", "hair"), 3, False, [[0, 0, 0], [220, 20, 60], [30, 144, 255]])
    save_model(create_model(cfg.model, 3), out, meta)
    return out


def test_multiclass_masks_are_palette_pngs_with_the_class_colours(ckpt3, tmp_path):
    import json

    from PIL import Image

    import segdist

    f = photo("104.jpg")
    predict_paths(ckpt3, f, tmp_path / "a", device="cpu")
    im = Image.open(tmp_path / "a" / "masks" / "104.png")
    assert im.mode == "P" and im.getpalette()[:9] == [0, 0, 0, 220, 20, 60, 30, 144, 255]
    ids = np.asarray(im)
    assert np.array_equal(ids, segdist.load(ckpt3, device="cpu").predict(f)) and set(np.unique(ids)) <= {0, 1, 2}
    colours = tmp_path / "colours.json"
    colours.write_text(json.dumps({"colors": [[1, 2, 3], [4, 5, 6], [7, 8, 9]], "classes": ["a", "b", "c"]}))
    predict_paths(ckpt3, f, tmp_path / "b", device="cpu", palette=colours)
    assert Image.open(tmp_path / "b" / "masks" / "104.png").getpalette()[:9] == list(range(1, 10))


def test_probability_outputs(ckpt, ckpt3, tmp_path):
    f = photo("1.jpg")
    h, w = cv2.imread(str(f)).shape[:2]
    predict_paths(ckpt, f, tmp_path / "bn", device="cpu", probs="npy")
    p = np.load(tmp_path / "bn" / "probs" / "1.npy")
    assert p.dtype == np.float16 and p.shape == (1, h, w) and 0 <= p.min() and p.max() <= 1
    predict_paths(ckpt, f, tmp_path / "bp", device="cpu", probs="png16")
    q = cv2.imread(str(tmp_path / "bp" / "probs" / "1.png"), cv2.IMREAD_UNCHANGED)
    assert q.dtype == np.uint16 and q.shape == (h, w)
    np.testing.assert_allclose(q / 65535, p[0], atol=2e-3)  # float16 vs 16-bit steps
    predict_paths(ckpt3, f, tmp_path / "mn", device="cpu", probs="npy")
    p3 = np.load(tmp_path / "mn" / "probs" / "1.npy")
    assert p3.dtype == np.float16 and p3.shape == (3, h, w)
    np.testing.assert_allclose(p3.astype(np.float32).sum(0), 1, atol=3e-3)
    predict_paths(ckpt3, f, tmp_path / "mp", device="cpu", probs="png16")
    files = sorted((tmp_path / "mp" / "probs" / "1").iterdir())
    assert [x.name for x in files] == ["0.png", "1.png", "2.png"]
    assert all(cv2.imread(str(x), cv2.IMREAD_UNCHANGED).dtype == np.uint16 for x in files)


def test_load_predicts_paths_arrays_and_bytes_at_their_size(ckpt):
    import segdist

    model = segdist.load(ckpt, device="cpu")
    f = photo("104.jpg")
    h, w = cv2.imread(str(f)).shape[:2]
    by_path = model.predict(f)
    assert by_path.shape == (h, w) and by_path.dtype == np.uint8
    assert np.array_equal(model.predict(str(f)), by_path) and np.array_equal(model.predict(f.read_bytes()), by_path)
    rgb = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
    assert model.predict(rgb).shape == (h, w) and model.predict(rgb[:50, :70]).shape == (50, 70)
    assert model.predict(rgb[..., 0]).shape == (h, w)  # gray
    probs = model.predict_proba(rgb)
    assert probs.shape == (1, h, w) and probs.dtype == np.float32
    with pytest.raises(UserError, match="uint8 RGB array"):
        model.predict(rgb.astype(np.float32))
    with pytest.raises(UserError, match="cannot decode"):
        model.predict(b"not an image")


def test_import_segdist_stays_cheap():
    code = "import sys, segdist; assert callable(segdist.load); print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.stdout.strip() == "False", p.stderr


def test_predict_command_with_sliding_tta_and_probs(ckpt, tmp_path, capsys):
    from segdist.cli import main

    f = photo("1.jpg")
    rc = main(["predict", str(ckpt), str(f.parent / "1[01].jpg"), "--out", str(tmp_path), "--mode", "sliding",
               "--overlap", "0.25", "--blend", "linear", "--tta", "flip", "--probs", "npy", "--no-overlays",
               "--device", "cpu", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert rc == 0 and "sliding 64x64 windows (overlap 0.25, linear), TTA flip" in out
    n = 2
    assert f"predicted {n} image(s)" in out and len(list((tmp_path / "probs").glob("*.npy"))) == n
    assert main(["predict", str(ckpt), str(f), "--out", str(tmp_path), "--tta", "flip,x"]) == 2
    assert "segdist: error: --tta: 'x'" in capsys.readouterr().err


def test_multi_frame_and_float_images_are_skipped_for_what_they_are(ckpt, tmp_path):
    """An animated WebP or a multi-page TIFF is not predicted as its first frame; a float TIFF is named as one."""
    from segdist.infer.predict import predict_paths
    from tests.test_shards_sample import odd_images

    reasons = odd_images(tmp_path / "in")
    summary = predict_paths(ckpt, tmp_path / "in", tmp_path / "out", device="cpu")
    assert summary.startswith("predicted 0 image(s)") and "skipped 4 unreadable" in summary
    said = {"anim.webp": "3 frames (animated or multi-page WebP)",
            "pages.tif": "3 frames (animated or multi-page TIFF)", "gray32f.tif": "a float32 TIFF with 1 channel(s)",
            "rgb32f.tif": "a float32 TIFF with 3 channel(s)"}
    for name, says in said.items():
        assert f"{name} ({says}" in summary, (name, summary)
    assert reasons.keys() == said.keys()


def test_sliding_windows_are_bounded_and_counted(ckpt):
    """--overlap 0.99 on a 10000x200 image would be 1.4 million windows at stride 1 (hours): refused at once, naming
    the numbers and the fix; a sane overlap runs, every window counted by the progress bar."""
    import time

    from segdist.infer import Predictor

    wide = np.zeros((200, 10000, 3), np.uint8)
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        Predictor.load(ckpt, "cpu", "sliding", overlap=0.99).predict(wide)
    assert time.monotonic() - t0 < 30
    assert str(e.value).startswith("sliding windows over a 200x10000 image at --overlap 0.99 (stride 1 px) would be "
                                   "1361369 windows of 64x64")
    assert "lower --overlap (0.5: 1872 windows) or use --mode resize" in str(e.value)

    class Count:
        total = n = 0

        def refresh(self):
            pass

        def update(self, k):
            self.n += k

    predictor = Predictor.load(ckpt, "cpu", "sliding", overlap=0.5, batch_size=16)
    predictor.windows = Count()
    assert predictor.predict(wide[:, :96]).shape == (200, 96)
    assert predictor.windows.total == predictor.windows.n == 6 * 2  # rows at 0, 32, ..., 136; cols at 0, 32
