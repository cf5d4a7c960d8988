"""The one resize rule: OpenCV on the CPU and the batched device variant agree on real photos."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from segdist.resize import DEVICE_TOLERANCE, interpolation, resize_batch, resize_to, resize_weights
from tests.conftest import HUMAN_SEG, require_dataset


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    files = sorted((require_dataset(HUMAN_SEG) / "Training_Images").glob("*.jpg"))[::29]
    return [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]


def targets(h: int, w: int) -> list[tuple[int, int]]:
    """Area (>= 2x down, integer and fractional factors), bilinear down (< 2x) and up, odd sizes."""
    return [(320, 320), (h // 2, w // 2), (h // 3 + 1, w // 3 + 7), (int(h * 0.7), int(w * 0.6)),
            (2 * h - 3, w + 11), (64, 96)]


def test_device_variant_equals_opencv_on_real_photos(photos):
    assert len(photos) >= 8
    kinds, worst, means = set(), 0, []
    for img in photos:
        h, w = img.shape[:2]
        t = torch.from_numpy(img).permute(2, 0, 1)
        for hw in targets(h, w):
            want = resize_to(img, hw).astype(np.int16)
            got = resize_batch([t], hw)[0].permute(1, 2, 0).numpy().astype(np.int16)
            diff = np.abs(want - got)
            worst, kinds = max(worst, int(diff.max())), kinds | {interpolation((h, w), hw)}
            means.append(diff.mean())
    assert kinds == {"area", "linear"}
    assert worst <= DEVICE_TOLERANCE and np.mean(means) < 0.1, (worst, np.mean(means))


def test_one_batch_of_mixed_sizes_equals_each_image_alone(photos):
    """The batched product pads every image to the largest; the padding must not leak into any output."""
    tensors = [torch.from_numpy(img).permute(2, 0, 1) for img in photos[:4]]
    tensors[1] = tensors[1][:, : tensors[1].shape[1] // 3]  # other aspect and size, area for some, linear for others
    batch = resize_batch(tensors, (96, 128))
    for b, t in enumerate(tensors):
        assert torch.equal(batch[b], resize_batch([t], (96, 128))[0])


@pytest.mark.parametrize("n_in,n_out", [(10, 3), (7, 7), (5, 12), (1000, 320), (3, 1)])
@pytest.mark.parametrize("kind", ["area", "linear"])
def test_weights_are_a_partition_of_unity(n_in, n_out, kind):
    w = resize_weights(n_in, n_out, kind)
    assert w.shape == (n_out, n_in) and (w >= 0).all()
    assert torch.allclose(w.sum(1), torch.ones(n_out), atol=1e-5)


def test_the_rule_picks_area_only_from_twice_the_size_on_both_axes():
    assert interpolation((640, 640), (320, 320)) == "area"
    assert interpolation((639, 640), (320, 320)) == "linear"
    assert interpolation((1000, 500), (320, 320)) == "linear"
    assert interpolation((100, 100), (320, 320)) == "linear"
