"""The model card: ``README.md`` beside the checkpoint it describes (``runs/<name>/best``).

``write_model_card(folder, meta, metrics)`` writes ``folder/README.md``: data, classes, input,
recipe, metrics, and three ways to load the model (segdist, SMP alone, ONNX Runtime after
``segdist export``). Training writes it with every new best model (:mod:`segdist.train`), so
training needs this module and never :mod:`segdist.export`.

The model's interface lives here too, as the card states it and :mod:`segdist.export` builds the
graph to it: the input size (:func:`input_hw`, multiples of :data:`STRIDE`), the output channels
(:func:`out_channels`) and the ONNX tensor names (:data:`INPUT`, :data:`OUTPUT`).
"""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_write_text
from .resize import as_hw
from .errors import UserError

INPUT, OUTPUT = "image", "logits"
STRIDE = 32  # every SMP encoder downsamples 5 times


# -- the model's interface ------------------------------------------------------------------
def input_hw(meta: dict) -> tuple[int, int]:
    """``meta["image_size"]`` (S, or [H, W]) as (H, W), both multiples of :data:`STRIDE`."""
    h, w = as_hw(meta["image_size"])
    if h % STRIDE or w % STRIDE:
        raise UserError(f"image_size {h}x{w} in segdist.json is not a multiple of {STRIDE}; "
                        f"the model cannot be exported at that size")
    return h, w


def out_channels(meta: dict) -> int:
    return 1 if meta["binary"] else int(meta["num_classes"])


# -- the card -------------------------------------------------------------------------------
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
