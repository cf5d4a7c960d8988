"""segdist.decode: JPEG headers, reduced decode, the BGR fallback, on-device decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.shardutil import make_loader
from segdist.shards import open_shards
from tests.shardutil import write_shards

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device,workers", [(d, w) for d in DEVICES for w in (0, 2)])
def test_device_jpeg_decode_matches_cpu_decode(tmp_path, device, workers):
    from segdist.decode import to_device

    jpg = write_shards(tmp_path, {"val": [6]}, size=96, ext="jpg")
    urls, sizes = open_shards(str(jpg)).split("val")
    kw = dict(batch_size=3, image_size=64, train=False, pin_memory=False, num_workers=workers)
    on_cpu = list(make_loader(urls, sizes, **kw))
    on_dev = list(make_loader(urls, sizes, device_decode=True, **kw))
    assert len(on_dev) == len(on_cpu) == 2  # 6 samples in batches of 3
    assert all(b["jpeg"] and all(j is not None for j in b["jpeg"]) for b in on_dev)
    for a, b in zip(on_cpu, on_dev):
        ia, ma = to_device(a, device)
        ib, mb = to_device(b, device)
        assert ib.dtype == torch.uint8 and ib.shape == ia.shape and ib.device.type == device
        assert torch.equal(ma, mb)
        # different decoders and resamplers: close, not equal
        assert (ia.float() - ib.float()).abs().mean() < 4.0


# ------------------------------------------------------------------ the persistent loader


def test_jpeg_size_reads_the_frame_header_like_pil(tmp_path):
    import io

    import cv2
    from PIL import Image

    from segdist.decode import jpeg_size
    from tests.conftest import HUMAN_SEG, require_dataset

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (37, 53, 3), np.uint8)
    variants = [cv2.imencode(".jpg", img)[1].tobytes(),
                cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()]
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: an APP1 segment before the frame header
    Image.fromarray(img).save(buf, "JPEG", exif=exif, icc_profile=b"\0" * 3000)
    variants.append(buf.getvalue())
    photos = sorted(require_dataset(HUMAN_SEG).rglob("*.jpg"))[::10]
    variants += [p.read_bytes() for p in photos]
    for data in variants:
        assert jpeg_size(data) == Image.open(io.BytesIO(data)).size
    assert len(variants) > 20
    for broken in (b"\xff\xd8", b"\xff\xd8\xff\xe0\x00", b"\xff\xd8garbage", variants[0][:20]):
        assert jpeg_size(broken) is None


def test_decode_without_opencv_rgb_flag_gives_the_same_pixels(monkeypatch):
    """OpenCV < 4.10 has no IMREAD_COLOR_RGB: the BGR path must give identical output."""
    import cv2

    import segdist.decode as stream

    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (300, 200, 3), np.uint8)
    blobs = [cv2.imencode(".jpg", img)[1].tobytes(), cv2.imencode(".png", img)[1].tobytes()]
    with_flag = [stream.decode_image(b, 64) for b in blobs] + [stream.decode_image(blobs[0], 128)]
    monkeypatch.setattr(stream, "_RGB", None)
    out = np.zeros((64, 64, 3), np.uint8)
    without = [stream.decode_image(b, 64) for b in blobs] + [stream.decode_image(blobs[0], 128)]
    assert all(np.array_equal(a, b) for a, b in zip(with_flag, without))
    assert stream.decode_image(blobs[1], 64, out=out) is out and np.array_equal(out, with_flag[1])


def test_a_jpeg_the_device_decoder_rejects_falls_back_to_the_cpu_and_is_counted(tmp_path, monkeypatch):
    """nvJPEG refusing one image must not raise on one rank (the others would wait in the next
    collective); the rejection is simulated: torchvision's decoder raises for one of the images."""
    import torchvision.io

    from segdist.decode import to_device

    jpg = write_shards(tmp_path, {"val": [4]}, size=96, ext="jpg")
    urls, sizes = open_shards(str(jpg)).split("val")
    kw = dict(batch_size=4, image_size=64, train=False, pin_memory=False, num_workers=0)
    (batch,) = list(make_loader(urls, sizes, device_decode=True, **kw))
    (plain,) = list(make_loader(urls, sizes, **kw))
    bad = batch["jpeg"][2]
    real = torchvision.io.decode_jpeg

    def picky(data, *args, **kwargs):
        items = data if isinstance(data, list) else [data]
        if any(bytes(d.numpy()) == bad for d in items):
            raise RuntimeError("nvjpeg: unsupported JPEG (simulated)")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    stats: dict = {}
    image, mask = to_device(batch, "cpu", stats)
    assert stats == {"decode_fallbacks": 1}
    ref, _ = to_device(plain, "cpu")
    assert (image.float() - ref.float()).abs().mean() < 4.0


@pytest.mark.parametrize("mode,hw,scale", [("short_side", (64, 96), (0.5, 2.0)), ("none", (96, 64), (0.5, 1.5)),
                                            ("short_side", (128, 128), (1.0, 1.0))])
def test_placed_image_and_mask_stay_aligned_on_real_photos(mode, hw, scale):
    """Crop/pad placement moves image and mask together: the mask drawn into the image (a lossless
    PNG whose pixels are the mask) comes out where the placed mask says, on real, non-square masks."""
    import cv2

    from segdist.decode import place
    from tests.conftest import HUMAN_SEG, require_dataset

    root = require_dataset(HUMAN_SEG)
    masks = sorted((root / "Ground_Truth").glob("*.png"))[:6]
    for k, path in enumerate(masks):
        m = (cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 127).astype(np.uint8)
        h, w = m.shape
        assert h != w
        image = cv2.imencode(".png", np.dstack([m * 200] * 3))[1].tobytes()
        mask = cv2.imencode(".png", m)[1].tobytes()
        for rng in (np.random.default_rng(k), None):
            img_row, mask_row = np.zeros((*hw, 3), np.uint8), np.zeros(hw, np.uint8)
            place(image, mask, mode, hw, img_row, mask_row, scale=scale, rng=rng)
            valid = mask_row != 255
            fg = (mask_row == 1).astype(np.uint8)
            kernel = np.ones((3, 3), np.uint8)  # resampling blends about a pixel around a border
            inside = valid & (cv2.dilate(fg, kernel) == cv2.erode(fg, kernel))
            assert inside.mean() > 0.2
            # a shift of 2 px would disagree along the whole silhouette: several % of these pixels
            assert ((img_row[..., 0] > 100) != (mask_row == 1))[inside].mean() < 0.005, path.name
            assert (img_row[~valid] == 0).all()  # padding: black image, ignored mask


def test_placement_without_rng_is_centred_and_with_the_short_side_resized():
    import cv2

    from segdist.decode import place

    m = np.zeros((100, 300), np.uint8)
    m[:, 145:155] = 1  # a vertical bar in the middle
    image = cv2.imencode(".png", np.dstack([m * 200] * 3))[1].tobytes()
    img_row, mask_row = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8)
    place(image, cv2.imencode(".png", m)[1].tobytes(), "short_side", (64, 64), img_row, mask_row)
    cols = np.flatnonzero(mask_row[32] == 1)
    assert 28 <= cols.min() and cols.max() <= 35  # 300 -> 192 wide, centre crop keeps the bar centred
    assert (mask_row != 255).all()
