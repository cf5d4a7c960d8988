"""Metrics from counts: hand-computed values, ignore pixels, absent classes, batch-split invariance."""

from __future__ import annotations

import pytest
import torch

from segdist.metrics import SegCounts, logits_to_pred


def test_binary_hand_computed():
    # 2x4 image: truth 1 on the left half, prediction 1 on the first three columns of row 0
    # and the first column of row 1 -> foreground tp=3, fp=1 (row 0 col 2), fn=1 (row 1 col 1).
    target = torch.tensor([[[1, 1, 0, 0], [1, 1, 0, 0]]])
    pred = torch.tensor([[[1, 1, 1, 0], [1, 0, 0, 0]]])
    c = SegCounts(2, binary=True)
    c.update(pred, target)
    r = c.compute(["bg", "fg"])
    fg = r["per_class"][1]
    assert (fg["tp"], fg["fp"], fg["fn"]) == (3, 1, 1)
    assert r["iou"] == pytest.approx(3 / 5)
    assert r["dice"] == pytest.approx(6 / 8)
    bg = r["per_class"][0]
    assert (bg["tp"], bg["fp"], bg["fn"]) == (3, 1, 1)
    assert r["num_samples"] == 1


def test_ignore_pixels_excluded():
    target = torch.tensor([[[1, 255], [0, 255]]])
    pred = torch.tensor([[[1, 1], [0, 0]]])
    c = SegCounts(2, binary=True)
    c.update(pred, target)
    r = c.compute()
    assert r["iou"] == 1.0 and r["per_class"][1]["fp"] == 0


def test_multiclass_absent_class_left_out_of_mean():
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 1, 1, 1]]])
    c = SegCounts(3, binary=False)
    c.update(pred, target)
    r = c.compute(["a", "b", "never"])
    assert r["per_class"][2]["iou"] is None
    # class 0: tp 1 fn 1 -> 1/2 ; class 1: tp 2 fp 1 -> 2/3
    assert r["iou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert r["micro_iou"] == pytest.approx(3 / (3 + 1 + 1))


def test_counts_independent_of_batch_split():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (6, 16, 16), generator=g)
    target[:, :2] = 255
    pred = torch.randint(0, 4, (6, 16, 16), generator=g)
    whole = SegCounts(4, binary=False)
    whole.update(pred, target)
    parts = SegCounts(4, binary=False)
    for i in (0, 1, 3):  # uneven pieces: 1, 2, 3 images
        j = {0: 1, 1: 3, 3: 6}[i]
        parts.update(pred[i:j], target[i:j])
    assert torch.equal(whole.counts, parts.counts)
    assert whole.compute() == parts.compute()


def test_logits_to_pred():
    assert torch.equal(logits_to_pred(torch.tensor([[[[-1.0, 2.0]]]])), torch.tensor([[[0, 1]]]))
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 2, 0, 0] = 5
    logits[0, 1, 0, 1] = 5
    assert torch.equal(logits_to_pred(logits), torch.tensor([[[2, 1]]]))


def test_update_counts_equal_the_boolean_indexing_reference():
    """The sync-free update (torch.where + an overflow bin) counts exactly what pred[valid] counted."""
    from segdist import IGNORE_INDEX
    from segdist.metrics import SegCounts

    def reference(pred, target, k):
        valid = target != IGNORE_INDEX
        p, t = pred[valid].long(), target[valid].long()
        cm = torch.bincount(t * k + p, minlength=k * k).reshape(k, k)
        tp = cm.diagonal()
        fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
        return torch.stack([tp, fp, fn, valid.sum() - tp - fp - fn])

    g = torch.Generator().manual_seed(0)
    for k in (2, 5, 59):
        target = torch.randint(0, k, (3, 17, 23), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.2] = IGNORE_INDEX
        pred = torch.randint(0, k, (3, 17, 23), generator=g)
        counts = SegCounts(k, binary=k == 2)
        counts.update(pred, target)
        assert torch.equal(counts.counts, reference(pred, target, k))


def test_confusion_rows_sum_to_one_and_the_plot_is_written(tmp_path):
    from segdist.track import plot_confusion

    counts = SegCounts(3, binary=False)
    target = torch.tensor([[[0, 0, 1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1, 2]]])
    counts.update(pred, target)
    assert counts.cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    conf = counts.confusion()
    assert conf.tolist() == [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    plot_confusion(conf, ["bg", "a", "b"], tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
