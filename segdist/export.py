"""What leaves segdist with a trained model: an ONNX file proven equal to PyTorch, and a model card.

``export_onnx(ckpt, out)`` (``segdist export CKPT --onnx OUT``) writes the model of a checkpoint
folder (``runs/<name>/best``) with its normalisation folded in: the graph takes **uint8 RGB**
``(B, 3, H, W)`` and returns float32 **logits** ``(B, C, H, W)`` (C = 1 for a binary model,
K for K classes). It is fixed at ``(1, 3, H, W)`` with ``H, W`` = ``meta["image_size"]``, or
with ``dynamic`` has batch, height and width axes (height and width multiples of 32).

Before the file appears, onnxruntime (CPU) runs it on real images: val samples of a shard folder,
else photos from a folder, else (the last resort) synthetic images from :mod:`segdist.synth`,
each made into the network input by :func:`segdist.infer.network_input`, the pixels training
sees. PyTorch runs the same uint8 inputs through :func:`segdist.augment.normalize` and the
model. The export is refused (a :class:`UserError`, nothing written) unless max |Δlogit| <=
:data:`MAX_ABS` and the predicted class agrees on >= :data:`MIN_AGREEMENT` of the pixels.

The exporter is torch's TorchScript-based one (``dynamo=False``): on the 2-core CI machine it
exports the test model in ~3 s where ``dynamo=True`` takes ~50 s, and it needs no ``onnxscript``.
It is deprecated in torch; when torch drops it, switch to ``dynamo=True`` and add ``onnxscript``
to the ``export`` extra (the parity check above catches any difference either way).

``write_model_card(folder, meta, metrics)`` writes ``folder/README.md``: data, classes, input,
recipe, metrics, and three ways to load the model.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_write_bytes, atomic_write_text, check_out_file
from .augment import normalize
from .checkpoint import read_meta
from .resize import as_hw
from .errors import UserError
from .infer import network_input
from .metrics import logits_to_pred
from .models import load_model

EXTRA = "pip install 'segdist[export]'"
DEFAULT_OPSET = 17
OPSETS = range(11, 21)
"""Opsets the TorchScript exporter writes for these models (Resize needs 11; 20 is its maximum)."""
MAX_ABS = 1e-3
"""Largest |ONNX logit - PyTorch logit| an export may have."""
MIN_AGREEMENT = 0.999
"""Smallest share of pixels whose predicted class (binary: logit > 0) must agree."""
INPUT, OUTPUT = "image", "logits"
STRIDE = 32  # every SMP encoder downsamples 5 times
DEFAULT_COUNT = 8


# -- the optional extra ---------------------------------------------------------------------
def missing_extra_message(module: str) -> str:
    """The one line a user without the ``export`` extra sees."""
    return f"segdist export needs the '{module}' package, which is not installed: {EXTRA}"


def require_onnx():
    """``(onnx, onnxruntime)``, or a UserError saying which extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise UserError(missing_extra_message(e.name or "onnx")) from None
    return onnx, onnxruntime


# -- the graph ------------------------------------------------------------------------------
def input_hw(meta: dict) -> tuple[int, int]:
    """``meta["image_size"]`` (S, or [H, W]) as (H, W), both multiples of :data:`STRIDE`."""
    h, w = as_hw(meta["image_size"])
    if h % STRIDE or w % STRIDE:
        raise UserError(f"image_size {h}x{w} in segdist.json is not a multiple of {STRIDE}; "
                        f"the model cannot be exported at that size")
    return h, w


def out_channels(meta: dict) -> int:
    return 1 if meta["binary"] else int(meta["num_classes"])


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

    Input ``image`` uint8 (1, 3, H, W) at ``meta["image_size"]``, or (batch, 3, height, width)
    with ``dynamic``; output ``logits`` float32 (B, C, H, W).
    """
    if opset not in OPSETS:
        raise UserError(f"--opset {opset} is not supported; use {OPSETS.start}..{OPSETS.stop - 1} "
                        f"(default {DEFAULT_OPSET})")
    h, w = input_hw(meta)
    axes = {0: "batch", 2: "height", 3: "width"}
    buf = io.BytesIO()
    # Silenced: the exporter's deprecation notice, and TracerWarnings for normalize's channel
    # count and mean/std becoming constants, which is what they are. The parity check judges.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(Uint8Model(model.eval(), meta["mean"], meta["std"]),
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
    from .shards import open_shards
    from .stream import read_samples

    shard_set = open_shards(shards)
    urls = shard_set.split("val" if "val" in shard_set.splits else "train")[0]
    found = []
    for url in urls:
        for sample in read_samples(url):
            found.append(sample.get("image.jpg") or sample["image.png"])  # read_samples checked one is there
            if len(found) == count:
                return found
    return found


def folder_inputs(folder: str, count: int) -> list[bytes]:
    """Bytes of the first ``count`` image files (sorted, recursive) under ``folder``."""
    from .shards import IMAGE_EXTS

    if not Path(folder).is_dir():
        raise UserError(f"--images '{folder}' is not a folder")
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    return [f.read_bytes() for f in files[:count]]


def synthetic_inputs(count: int) -> list[bytes]:
    """``count`` PNGs of the embedded synthetic dataset: textured shapes, not photos."""
    from .synth import make_sample

    return [cv2.imencode(".png", make_sample(i)[0][:, :, ::-1])[1].tobytes() for i in range(count)]


def check_inputs(meta: dict, shards: str | None = None, images: str | None = None,
                 count: int = DEFAULT_COUNT) -> tuple[list[torch.Tensor], str]:
    """The network inputs, uint8 (3, h, w) each, and where they came from, in words.

    From ``shards`` if given, else from the ``images`` folder, else synthetic; each made by
    :func:`segdist.infer.network_input` (a squash model: all at ``image_size``; other resize
    rules: each at its own size). An image that cannot be decoded is skipped; none at all is a
    UserError.
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
        except ValueError:  # an unreadable file: the others still prove the export
            continue
    if not pixels:
        raise UserError(f"no readable image among the {len(encoded)} {source}")
    return pixels, f"{len(pixels)} {source}"


def resized(images: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(N, 3, h, w)`` -> uint8 ``(N, 3, *hw)``: the same pictures at another size."""
    if tuple(images.shape[2:]) == hw:
        return images
    x = F.interpolate(images.float(), size=hw, mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


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
        want = model(normalize(x, meta["mean"], meta["std"])).float()
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
    h, w = input_hw(meta)
    results = [compare(data, model, meta, batches) for batches in check_batches(pixels, (h, w), dynamic)]
    for r in results:
        if not r.ok(max_abs, min_agreement):
            raise UserError(f"ONNX Runtime disagrees with PyTorch: {r}; an export needs max |Δlogit| <= "
                            f"{max_abs:g} and argmax agreement >= {100 * min_agreement:g} %; '{out}' not written")
    atomic_write_bytes(out, data)
    shape = "(batch, 3, height, width)" if dynamic else f"(1, 3, {h}, {w})"
    return [(f"exported {ckpt} to {out} ({len(data) / 1e6:.1f} MB, opset {opset}): uint8 RGB {shape} -> "
             f"float32 logits with {out_channels(meta)} channel(s), normalisation inside"),
            f"checked on {source}:", *(f"  {r}" for r in results)]


# -- the model card -------------------------------------------------------------------------
def _classes(meta: dict) -> str:
    names = meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]
    listed = ", ".join(f"{i} = {n}" for i, n in enumerate(names))
    if meta["binary"]:
        return f"binary ({listed}): one logit per pixel, class 1 where the logit > 0"
    return f"{len(names)} classes ({listed}): one logit per class, the class is the argmax"


def _input_rule(data: dict, h: int, w: int) -> str:
    """How training made an image into network pixels (``data.resize``; older checkpoints squashed)."""
    rule = data.get("resize", "squash")
    if rule == "short_side":
        return (f"RGB, short side resized to {data.get('short_side') or min(h, w)} (aspect kept); "
                f"trained on {h}x{w} (H x W) crops")
    if rule == "none":
        return f"RGB at its native resolution; trained on {h}x{w} (H x W) crops"
    return f"RGB squashed to {h}x{w} (H x W), aspect not kept, as in training"


def _recipe(cfg: dict, binary: bool) -> list[str]:
    model, data, optim, train = (cfg.get(k, {}) for k in ("model", "data", "optim", "train"))
    loss, augment = cfg.get("loss", {}), dict(cfg.get("augment", {}))
    augment.pop("mean", None), augment.pop("std", None)
    loss_name = loss.get("name")
    if loss_name == "auto":  # config.LossConfig: auto = dice_bce for binary, dice_ce otherwise
        loss_name = f"auto` = `{'dice_bce' if binary else 'dice_ce'}"
    loss_args = ", ".join(f"{k}={v}" for k, v in loss.items() if k != "name")
    return [
        (f"- architecture: `{model.get('arch')}`, encoder `{model.get('encoder')}`, "
         f"encoder weights at the start: `{model.get('pretrained')}`"),
        f"- loss: `{loss_name}` ({loss_args})",
        (f"- optimiser: `{optim.get('name')}`, lr {optim.get('lr')} (encoder lr {optim.get('encoder_lr') or 'same'}), "
         f"weight decay {optim.get('weight_decay')}, schedule `{optim.get('scheduler')}`, "
         f"warmup {optim.get('warmup_steps')} steps, EMA {optim.get('ema')}"),
        (f"- epochs: {train.get('epochs')}, batch size {data.get('batch_size')} per device, "
         f"mixed precision `{train.get('mixed_precision')}`, seed {train.get('seed')}"),
        "- augmentation: " + ", ".join(f"{k}={v}" for k, v in augment.items()),
    ]


def _metrics(metrics: dict | None) -> list[str]:
    if not metrics:
        return ["No metrics were recorded with this card."]

    def fmt(v) -> str:
        return "n/a (absent)" if v is None else f"{v:.4f}"

    when = f", epoch {metrics['epoch']}" if "epoch" in metrics else ""
    lines = [(f"Validation ({metrics.get('num_samples', '?')} images{when}): IoU **{fmt(metrics.get('iou'))}**, "
              f"Dice **{fmt(metrics.get('dice'))}** (exact: summed TP/FP/FN counts; binary scores the "
              "foreground class).")]
    if "resolution" in metrics:
        lines[0] += f" Scored at {metrics['resolution']}."
    if "pixel_acc" in metrics:
        lines[0] += f" Pixel accuracy {fmt(metrics['pixel_acc'])}."
    if "input_res" in metrics:
        inp = metrics["input_res"]
        lines[0] += f" At the network input: IoU {fmt(inp.get('iou'))}, Dice {fmt(inp.get('dice'))}."
    if metrics.get("per_class"):
        lines += ["", "| class | IoU | Dice |", "|---|---|---|"]
        lines += [f"| {c['name']} | {fmt(c.get('iou'))} | {fmt(c.get('dice'))} |" for c in metrics["per_class"]]
    return lines


def model_card(folder: str | Path, meta: dict, metrics: dict | None = None) -> str:
    """The Markdown text of :func:`write_model_card`."""
    cfg = meta.get("config", {})
    h, w = input_hw(meta)
    c = out_channels(meta)
    mean, std = list(meta["mean"]), list(meta["std"])
    pred = "mask = logits[0, 0] > 0" if meta["binary"] else "mask = logits[0].argmax(0)"
    return "\n".join([
        f"# {cfg.get('model', {}).get('arch', 'SMP')} segmentation model (segdist)",
        "",
        "## Data",
        f"- shards: `{cfg.get('data', {}).get('shards', '?')}`",
        f"- classes: {_classes(meta)}",
        f"- input: {_input_rule(cfg.get('data', {}), h, w)}",
        f"- normalisation: `(x / 255 - mean) / std`, mean {mean}, std {std}",
        "",
        "## Recipe",
        *_recipe(cfg, meta["binary"]),
        "",
        "## Metrics",
        *_metrics(metrics),
        "",
        "## Loading it",
        "",
        "segdist (decode, resize and normalisation as in training; masks at the photo's size):",
        "```python",
        "import segdist",
        f'p = segdist.load("{folder}")',
        'mask = p.predict("photo.jpg")',
        "```",
        "",
        "segmentation-models-pytorch alone: `smp.from_pretrained` rebuilds the model from `config.json`",
        "(timm builds a `tu-` encoder by name) and loads `model.safetensors`; nothing is downloaded, as",
        "`encoder_weights` is null there. `segdist.models.load_model(folder)` is the same call with",
        "one-line errors; it is not needed. Normalise the input yourself:",
        "```python",
        "import segmentation_models_pytorch as smp, torch",
        f'model = smp.from_pretrained("{folder}").eval()',
        f"mean, std = torch.tensor({mean}).view(1, 3, 1, 1), torch.tensor({std}).view(1, 3, 1, 1)",
        f"x = torch.zeros(1, 3, {h}, {w}, dtype=torch.uint8)  # your RGB image, H and W multiples of 32",
        f"logits = model((x / 255 - mean) / std)  # float32 (1, {c}, {h}, {w})",
        "```",
        "",
        f"ONNX Runtime, after `segdist export {folder} --onnx model.onnx` (normalisation is in the graph;",
        "uint8 in, logits out):",
        "```python",
        "import numpy as np, onnxruntime as ort",
        "from PIL import Image",
        'session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])',
        f'x = np.asarray(Image.open("photo.jpg").convert("RGB").resize(({w}, {h}), Image.BOX))',
        f'logits = session.run(None, {{"{INPUT}": np.ascontiguousarray(x.transpose(2, 0, 1)[None])}})[0]',
        f"{pred}  # logits: float32 (1, {c}, {h}, {w})",
        "```",
        "",
    ])


def write_model_card(folder: Path, meta: dict, metrics: dict | None) -> None:
    """Write ``folder/README.md`` (atomically): data, classes, input size, normalisation, recipe,
    ``metrics`` (as :meth:`segdist.metrics.SegCounts.compute` returns them; None: none) and how to
    load the model with segdist, SMP and ONNX Runtime. Replaces the generic card of ``save_pretrained``."""
    atomic_write_text(Path(folder) / "README.md", model_card(folder, meta, metrics))
