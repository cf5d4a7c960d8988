"""What leaves segdist with a trained model: an ONNX file proven equal to PyTorch.

``export_onnx(ckpt, out)`` (``segdist export CKPT --onnx OUT``) writes the model of a checkpoint
folder (``runs/<name>/best``) with its normalisation folded in: the graph takes **uint8 RGB**
``(B, 3, H, W)`` and returns float32 **logits** ``(B, C, H, W)`` (C = 1 for a binary model,
K for K classes). It is fixed at ``(1, 3, H, W)`` with ``H, W`` = ``meta.image_hw``, or
with ``dynamic`` has batch, height and width axes (height and width multiples of 32).

Before the file appears, onnxruntime (CPU) runs it on real images: val samples of a shard folder,
else photos from a folder, else (the last resort) synthetic images from :mod:`segdist.synth`,
each made into the network input by :func:`segdist.infer.predictor.network_input`, the pixels
training sees. PyTorch runs the same uint8 inputs through :func:`segdist.augment.normalize` and the
model. The export is refused (a :class:`UserError`, nothing written) unless max |Δlogit| <=
:data:`MAX_ABS` and the predicted class agrees on >= :data:`MIN_AGREEMENT` of the pixels.

The exporter is torch's TorchScript-based one (``dynamo=False``): on the 2-core CI machine it
exports the test model in ~3 s where ``dynamo=True`` takes ~50 s, and it needs no ``onnxscript``.
It is deprecated in torch; when torch drops it, switch to ``dynamo=True`` and add ``onnxscript``
to the ``export`` extra (the parity check above catches any difference either way).

The graph's interface (input size, output channels, tensor names) is the one the model card
states: :mod:`segdist.card` defines it, this module builds to it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import torch
from torch import nn

from ..atomic import atomic_write_bytes, check_out_file
from ..augment import normalize
from ..card import INPUT, OUTPUT
from ..config import STRIDE
from ..checkpoint import read_meta
from ..decode import DecodeError
from ..errors import UserError
from ..metrics import logits_to_pred
from ..models import load_model
from ..resize import resize_batch
from ..shards import IMAGE_EXTS, image_bytes, open_shards, read_samples
from ..infer.predictor import network_input
from ..synth import make_sample
from .options import DEFAULT_COUNT, DEFAULT_OPSET, OPSETS

EXTRA = "pip install 'segdist[export]'"
MAX_ABS = 1e-3
"""Largest |ONNX logit - PyTorch logit| an export may have."""
MIN_AGREEMENT = 0.999
"""Smallest share of pixels whose predicted class (binary: logit > 0) must agree."""

# -- the optional extra ---------------------------------------------------------------------
def missing_extra_message(module: str) -> str:
    """The one line a user without the ``export`` extra sees."""
    return f"segdist export needs the '{module}' package, which is not installed: {EXTRA}"


def require_onnx():
    """``(onnx, onnxruntime)``, or a UserError saying which extra to install."""
    try:  # here, not at the top: the optional `export` extra, needed by this command only
        import onnx
        import onnxruntime
    except ImportError as e:
        raise UserError(missing_extra_message(e.name or "onnx")) from None
    return onnx, onnxruntime


# -- the graph ------------------------------------------------------------------------------
class Uint8Model(nn.Module):
    """uint8 RGB ``(B, 3, H, W)`` -> float32 logits ``(B, C, H, W)``: normalisation, then the model.

    The normalisation is :func:`segdist.augment.normalize` itself (traced into constants), so
    the graph's arithmetic is the one training and ``segdist predict`` use.
    """

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model, self.mean, self.std = model, tuple(mean), tuple(std)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(image, self.mean, self.std))


def onnx_bytes(model: nn.Module, meta: dict, dynamic: bool = False, opset: int = DEFAULT_OPSET) -> bytes:
    """The ONNX model (bytes) of ``model`` with the normalisation of ``meta`` folded in.

    Input ``image`` uint8 (1, 3, H, W) at ``meta.image_hw``, or (batch, 3, height, width)
    with ``dynamic``; output ``logits`` float32 (B, C, H, W).
    """
    if opset not in OPSETS:
        raise UserError(f"--opset {opset} is not supported; use {OPSETS.start}..{OPSETS.stop - 1} "
                        f"(default {DEFAULT_OPSET})")
    h, w = meta.image_hw
    axes = {0: "batch", 2: "height", 3: "width"}
    buf = io.BytesIO()
    # Silenced: the exporter's deprecation notice, and TracerWarnings for normalize's channel
    # count and mean/std becoming constants, which is what they are. The parity check judges.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(Uint8Model(model.eval(), meta.mean, meta.std),
                              (torch.zeros(1, 3, h, w, dtype=torch.uint8),), buf, dynamo=False,
                              opset_version=opset, input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: axes, OUTPUT: axes} if dynamic else None)
        except RuntimeError as e:  # torch.onnx's errors (unsupported operator...) are RuntimeErrors
            raise UserError(f"the ONNX exporter failed at opset {opset}: "
                            f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from None
    return buf.getvalue()


# -- the check inputs -----------------------------------------------------------------------
def shard_inputs(shards: str, count: int) -> list[bytes]:
    """Image bytes of the first ``count`` samples of the val split (train when there is none)."""
    shard_set = open_shards(shards)
    split = "val" if "val" in shard_set.splits else "train"
    found = []
    for url, ident in zip(shard_set.split(split)[0], shard_set.identity(split)):
        for sample in read_samples(url, ident):
            found.append(image_bytes(sample))
            if len(found) == count:
                return found
    return found


def folder_inputs(folder: str, count: int) -> list[bytes]:
    """Bytes of the first ``count`` image files (sorted, recursive) under ``folder``."""
    if not Path(folder).is_dir():
        raise UserError(f"--images '{folder}' is not a folder")
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    return [f.read_bytes() for f in files[:count]]


def synthetic_inputs(count: int) -> list[bytes]:
    """``count`` PNGs of the embedded synthetic dataset: textured shapes, not photos."""
    return [cv2.imencode(".png", make_sample(i)[0][:, :, ::-1])[1].tobytes() for i in range(count)]


def check_inputs(meta: dict, shards: str | None = None, images: str | None = None,
                 count: int = DEFAULT_COUNT) -> tuple[list[torch.Tensor], str]:
    """The network inputs, uint8 (3, h, w) each, and where they came from, in words.

    From ``shards`` if given, else from the ``images`` folder, else synthetic; each made by
    :func:`segdist.infer.predictor.network_input` (a squash model: all at ``image_size``; other
    resize rules: each at its own size). An image that cannot be decoded is skipped; none at all
    is a UserError.
    """
    if count < 1:
        raise UserError(f"--count must be >= 1; got {count}")
    if shards:
        encoded, source = shard_inputs(shards, count), f"images from shards '{shards}'"
    elif images:
        encoded, source = folder_inputs(images, count), f"photos from '{images}'"
    else:
        encoded, source = synthetic_inputs(count), "synthetic images (segdist.synth; no --shards or --images given)"
    pixels = []
    for data in encoded:
        try:
            pixels.append(network_input(data, meta))
        except DecodeError:  # an unreadable file: the others still prove the export
            continue
    if not pixels:
        raise UserError(f"no readable image among the {len(encoded)} {source}")
    return pixels, f"{len(pixels)} {source}"


def resized(images: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(N, 3, h, w)`` -> uint8 ``(N, 3, *hw)``: the same pictures at another size, by the one rule."""
    if tuple(images.shape[2:]) == hw:
        return images
    return resize_batch(list(images), hw)


def check_batches(pixels: list[torch.Tensor], hw: tuple[int, int], dynamic: bool) -> list[list[torch.Tensor]]:
    """The uint8 (B, 3, H, W) batches to run, as one list per check.

    Fixed graph: each image alone, resized to ``hw`` where its network input has another size.
    Dynamic graph: images of one size in one batch; then all of them resized to
    ``(H + 32, W + 64)`` in one batch, a size the graph was not traced at.
    """
    if not dynamic:
        return [[resized(p[None], hw) for p in pixels]]
    sizes = sorted({tuple(p.shape[1:]) for p in pixels})
    native = [torch.stack([p for p in pixels if tuple(p.shape[1:]) == s]) for s in sizes]
    other = (hw[0] + STRIDE, hw[1] + 2 * STRIDE)
    return [native, [torch.cat([resized(b, other) for b in native])]]


# -- the proof ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parity:
    """ONNX Runtime against PyTorch on the same uint8 inputs."""

    max_abs: float  # largest |Δlogit|
    mean_abs: float  # mean |Δlogit| over every logit
    agreement: float  # share of pixels with the same predicted class
    images: int
    sizes: tuple[tuple[int, int], ...]  # the (H, W) the inputs had
    runtime: str  # "onnxruntime 1.x (CPUExecutionProvider)"

    def ok(self, max_abs: float = MAX_ABS, min_agreement: float = MIN_AGREEMENT) -> bool:
        return self.max_abs <= max_abs and self.agreement >= min_agreement

    def __str__(self) -> str:
        sizes = ", ".join(f"{h}x{w}" for h, w in self.sizes)
        return (f"max |Δlogit| {self.max_abs:.2e}, mean |Δlogit| {self.mean_abs:.2e}, argmax agreement "
                f"{100 * self.agreement:.3f} % on {self.images} image(s) at {sizes} ({self.runtime})")


@torch.no_grad()
def compare(onnx_model: bytes, model: nn.Module, meta: dict, batches: list[torch.Tensor]) -> Parity:
    """Run each uint8 batch (B, 3, H, W) through ONNX Runtime (CPU) and through ``normalize`` +
    ``model``; the differences of their float32 logits (B, C, H, W), over all batches."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    # ORT's idle threads spin for a while after each run, starving the PyTorch run that follows
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    model = model.eval()
    worst, total, logits, agree, pixels = 0.0, 0.0, 0, 0, 0
    for x in batches:
        want = model(normalize(x, meta.mean, meta.std)).float()
        got = torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])
        if got.shape != want.shape:
            raise UserError(f"the ONNX model returns {tuple(got.shape)} for input {tuple(x.shape)}; "
                            f"PyTorch returns {tuple(want.shape)}")
        diff = (got - want).abs()
        worst, total, logits = max(worst, float(diff.max())), total + float(diff.double().sum()), logits + diff.numel()
        agree += int((logits_to_pred(got) == logits_to_pred(want)).sum())
        pixels += x.shape[0] * x.shape[2] * x.shape[3]
    return Parity(worst, total / logits, agree / pixels, sum(len(x) for x in batches),
                  tuple(sorted({tuple(x.shape[2:]) for x in batches})),
                  f"onnxruntime {ort.__version__} ({session.get_providers()[0]})")


def export_onnx(ckpt: str | Path, out: str | Path, dynamic: bool = False, opset: int = DEFAULT_OPSET,
                shards: str | None = None, images: str | None = None, count: int = DEFAULT_COUNT,
                max_abs: float = MAX_ABS, min_agreement: float = MIN_AGREEMENT) -> list[str]:
    """Export checkpoint folder ``ckpt`` to ``out`` (see the module docstring); the report lines.

    ``out`` is written (atomically) only after every check of :func:`check_batches` passes; on a
    failed one it is left as it was and a UserError gives the figures. ``ckpt`` is only read.
    """

    onnx, _ = require_onnx()
    check_out_file(out, "--onnx")  # before the export and its check, not after them
    meta = read_meta(ckpt)
    model = load_model(ckpt)
    pixels, source = check_inputs(meta, shards, images, count)  # a bad --shards fails before the export
    data = onnx_bytes(model, meta, dynamic, opset)
    onnx.checker.check_model(onnx.load_from_string(data))
    h, w = meta.image_hw
    results = [compare(data, model, meta, batches) for batches in check_batches(pixels, (h, w), dynamic)]
    for r in results:
        if not r.ok(max_abs, min_agreement):
            raise UserError(f"ONNX Runtime disagrees with PyTorch: {r}; an export needs max |Δlogit| <= "
                            f"{max_abs:g} and argmax agreement >= {100 * min_agreement:g} %; '{out}' not written")
    atomic_write_bytes(out, data)
    shape = "(batch, 3, height, width)" if dynamic else f"(1, 3, {h}, {w})"
    return [(f"exported {ckpt} to {out} ({len(data) / 1e6:.1f} MB, opset {opset}): uint8 RGB {shape} -> "
             f"float32 logits with {meta.out_channels} channel(s), normalisation inside"),
            f"checked on {source}:", *(f"  {r}" for r in results)]
