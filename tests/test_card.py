"""The model card states the one resize rule, and its OpenCV/numpy recipe reproduces segdist's network input."""

from __future__ import annotations

import re
import shutil

import cv2
import numpy as np
import pytest

from segdist.card import model_card
from segdist.checkpoint import ModelMeta
from segdist.config import load_config
from segdist.infer import network_input
from segdist.resize import RULE_TEXT
from tests.conftest import HUMAN_SEG, require_dataset


def card_code(meta: ModelMeta) -> str:
    text = model_card("runs/x/best", meta)
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (code,) = [b for b in blocks if "def network_input(path)" in b]
    return code


MODES = {"squash": ["data.image_size=[96, 128]"],
         "short_side": ["data.image_size=[64, 96]", "data.resize=short_side", "data.short_side=150"],
         "none": ["data.image_size=64", "data.resize=none"]}


@pytest.mark.parametrize("mode", MODES)
def test_the_cards_recipe_reproduces_the_network_input_on_real_photos(mode, tmp_path):
    photos = sorted((require_dataset(HUMAN_SEG) / "Training_Images").glob("*.jpg"))[::37]
    meta = ModelMeta(load_config(None, MODES[mode]), ("background", "person"), 2, True)
    scope: dict = {}
    exec(card_code(meta), scope)  # the card's code, as a user would paste it
    png = tmp_path / "photo.png"  # a PNG too: no reduced decode there
    cv2.imwrite(str(png), cv2.imread(str(photos[0])))
    reduced, worst = 0, 0
    for path in [*photos, png]:
        want = network_input(path.read_bytes(), meta).numpy()
        got = scope["network_input"](str(path))
        assert got.dtype == np.uint8 and got.shape == (1, *want.shape), (path.name, got.shape, want.shape)
        worst = max(worst, int(np.abs(got[0].astype(int) - want).max()))
        h, w = cv2.imread(str(path)).shape[:2]
        reduced += path.suffix == ".jpg" and min(h / want.shape[1], w / want.shape[2]) >= 2
    assert worst <= 1, worst  # what the card promises ("within one level of 255")
    # the reduced-decode branch of the recipe was exercised (native size never reduces)
    assert len(photos) >= 7 and (reduced >= 3 if mode != "none" else reduced == 0)


def test_the_card_states_the_rule_and_no_other_resize():
    meta = ModelMeta(load_config(None, ["data.image_size=64"]), ("background", "person"), 2, True)
    text = model_card("runs/x/best", meta)
    assert RULE_TEXT in text and "squashed to 64x64" in text
    assert "Image.BOX" not in text and "PIL" not in text  # the old card's other resize


def test_the_onnx_snippet_feeds_the_recipes_input(ckpt, tmp_path):
    """The card's ONNX Runtime lines, run against a real export of ``ckpt``, on a real photo."""
    from segdist.checkpoint import read_meta
    from segdist.export import export_onnx

    photo = sorted((require_dataset(HUMAN_SEG) / "Training_Images").glob("*.jpg"))[0]
    folder = tmp_path / "best"
    shutil.copytree(ckpt, folder)
    export_onnx(folder, tmp_path / "model.onnx", count=1)
    text = model_card(folder, read_meta(folder))
    code = card_code(read_meta(folder))
    onnx_block = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "onnxruntime" in b][0]
    scope: dict = {}
    exec(code.replace('"photo.jpg"', repr(str(photo))), scope)
    exec(onnx_block.replace('"model.onnx"', repr(str(tmp_path / "model.onnx")))
         .replace('"photo.jpg"', repr(str(photo))), scope)
    assert scope["logits"].shape == (1, 1, 64, 64) and scope["mask"].shape == (64, 64)
