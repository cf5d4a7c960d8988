"""segdist.shards.sample: per-sample repairs (the build tests cover the rest end to end)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from segdist import shards


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil_exif_transpose(orientation):
    array = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "PNG", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(buf)))
    np.testing.assert_array_equal(shards.apply_orientation(array, orientation), expected)


def odd_images(folder) -> dict[str, str]:
    """Files OpenCV would read wrongly or not at all, each with the reason a build or predict must give."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)) for i in range(3)]
    frames[0].save(folder / "anim.webp", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(folder / "pages.tif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.random.default_rng(0).random((32, 32), np.float32)).save(folder / "gray32f.tif")
    cv2.imwrite(str(folder / "rgb32f.tif"), np.random.default_rng(0).random((32, 32, 3), np.float32))
    return {"anim.webp": "3 frames (an animated or multi-page WEBP)", "pages.tif": "3 frames (an animated or "
            "multi-page TIFF)", "gray32f.tif": "a 32-bit float TIFF", "rgb32f.tif": "a float32 image with 3 channel"}


def test_multi_frame_and_float_images_are_skipped_for_what_they_are(tmp_path):
    """Not frame 1 of an animation or of a multi-page TIFF, and a float TIFF is named as one."""
    import cv2

    reasons = odd_images(tmp_path / "images")
    (tmp_path / "masks").mkdir()
    for name in [*reasons, "ok.png"]:
        cv2.imwrite(str(tmp_path / "masks" / f"{name.split('.')[0]}.png"), np.eye(32, dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "images" / "ok.png"), np.zeros((32, 32, 3), np.uint8))
    manifest = shards.build_shards(tmp_path, tmp_path / "out", workers=1, progress=False, val_fraction=0)
    skipped = {s["path"].split("/")[-1]: s["reason"] for s in manifest["skipped"]}
    assert skipped.keys() == reasons.keys() and manifest["counts"]["samples"] == 1
    for name, says in reasons.items():
        assert skipped[name].startswith(says), (name, skipped[name])
