"""How a :class:`~segdist.infer.predictor.Predictor` predicts: :class:`Options` and the user's choices.

The model's resize rule comes from its checkpoint meta (``data.resize``, ``data.image_size``...);
the user picks the mode, window overlap and blend, test-time augmentation (``--tta``) and the
binary threshold. The defaults and choices here are the ones ``segdist predict``/``eval`` show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:  # an annotation only: the CLI reads this module's defaults without loading torch
    from ..checkpoint import ModelMeta

MODES = ("resize", "sliding")
BLENDS = ("gaussian", "linear", "mean")
PROB_FORMATS = ("npy", "png16")
BATCH_SIZE = 8
"""Network inputs (windows) per device batch unless the caller says otherwise."""


@dataclass(frozen=True)
class Options:
    """How a :class:`Predictor` predicts: the model's resize rule (from its meta) and the user's choices."""

    image_hw: tuple[int, int]  # data.image_size: the squash size and the sliding window
    resize: str = "squash"  # data.resize
    short_side: int = 0  # data.short_side (0: the short side of image_hw)
    reduced: bool = True  # data.reduced_decode
    mode: str = "resize"
    overlap: float = 0.5
    blend: str = "gaussian"
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    threshold: float = 0.5


def parse_tta(spec: str | None) -> tuple[bool, tuple[float, ...]]:
    """``--tta``: ``flip``, ``flip,0.75,1.0,1.25``, ``0.5,1`` or ``''``/``none`` -> (flip, scales)."""
    flip, scales = False, []
    for tok in (t.strip().lower() for t in str(spec or "").split(",")):
        if tok in ("", "none"):
            continue
        if tok == "flip":
            flip = True
            continue
        try:
            scale = float(tok)
        except ValueError:
            raise UserError(f"--tta: '{tok}' is neither 'flip' nor a scale (e.g. --tta flip,0.75,1.0,1.25)") from None
        if not 0.05 <= scale <= 8:
            raise UserError(f"--tta: scale {tok} is outside 0.05..8")
        scales.append(scale)
    return flip, tuple(scales) or (1.0,)


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a UserError naming ``what`` and the choices."""
    if value not in choices:
        raise UserError(f"{what} '{value}' is not one of {', '.join(choices)}")
    return value


def options_for(meta: ModelMeta, mode: str = "resize", overlap: float = 0.5, blend: str = "gaussian",
                tta: str | None = "", threshold: float = 0.5) -> Options:
    """Options from a model's training rule (``meta.config.data``) and the user's choices."""
    data = meta.config.data
    if not 0 <= overlap < 1:
        raise UserError(f"--overlap {overlap}: must be in [0, 1) (stride = window x (1 - overlap))")
    if not 0 <= threshold <= 1:
        raise UserError(f"--threshold {threshold}: a probability, in [0, 1]")
    flip, scales = parse_tta(tta)
    return Options(meta.image_hw, data.resize, data.short_side, data.reduced_decode,
                   check_choice("--mode", mode, MODES), float(overlap), check_choice("--blend", blend, BLENDS), flip,
                   scales, float(threshold))


def describe_options(opts: Options) -> str:
    """One line: what the predictions are made from, e.g.
    ``sliding 64x64 windows (overlap 0.5, gaussian), TTA flip``."""
    h, w = opts.image_hw
    if opts.mode == "sliding":
        what = f"sliding {h}x{w} windows (overlap {opts.overlap:g}, {opts.blend})"
        if opts.resize == "short_side":
            what += f" over the image with short side {opts.short_side or min(h, w)}"
    elif opts.resize == "squash":
        what = f"resize: squashed to {h}x{w}"
    elif opts.resize == "short_side":
        what = f"resize: short side to {opts.short_side or min(h, w)}"
    else:
        what = "resize: native size"
    tta = (["flip"] if opts.flip else []) + ([f"scales {','.join(f'{s:g}' for s in opts.scales)}"]
                                              if opts.scales != (1.0,) else [])
    return what + (f", TTA {' + '.join(tta)}" if tta else "")
