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
