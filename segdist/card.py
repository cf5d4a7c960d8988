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
from .checkpoint import ModelMeta
from .config import STRIDE, Config
from .resize import RULE_TEXT

INPUT, OUTPUT = "image", "logits"


# -- the card -------------------------------------------------------------------------------
def _classes(meta: ModelMeta) -> str:
    names = list(meta.class_names) or [str(i) for i in range(meta.num_classes)]
    listed = ", ".join(f"{i} = {n}" for i, n in enumerate(names))
    if meta.binary:
        return f"binary ({listed}): one logit per pixel, class 1 where the logit > 0"
    return f"{len(names)} classes ({listed}): one logit per class, the class is the argmax"


def _fingerprint(meta: ModelMeta) -> list[str]:
    """The training data's identity (shards.fingerprint): a resume or comparison names what differs from it."""
    if not meta.dataset:
        return []
    splits = ", ".join(f"{s} {v['shards']} shards ({v['digest'][:12]})" for s, v in meta.dataset["splits"].items())
    return [f"- data fingerprint: `{meta.dataset['digest'][:16]}` (shard names + sha256 + class table): {splits}; "
            f"ignore index {meta.class_table.ignore_index}"]


def _input_rule(meta: ModelMeta) -> str:
    """How training made an image into network pixels (``data.resize``), in words."""
    (h, w), data = meta.image_hw, meta.config.data
    if data.resize == "short_side":
        size = (f"short side resized to {data.short_side or min(h, w)} (aspect kept), padded with black at the "
                f"bottom and right to multiples of {STRIDE}; trained on {h}x{w} (H x W) crops")
    elif data.resize == "none":
        size = f"native resolution, padded with black at the bottom and right to multiples of {STRIDE}; trained on " \
               f"{h}x{w} (H x W) crops"
    else:
        size = f"squashed to {h}x{w} (H x W), aspect not kept, as in training"
    return f"RGB, {size}. Resizing: {RULE_TEXT}; JPEGs larger than that are decoded at 1/2, 1/4 or 1/8 scale first"


def input_code(meta: ModelMeta) -> list[str]:
    """Python (OpenCV + numpy only) that turns a photo into this model's uint8 (1, 3, H, W) input."""
    (h, w), data = meta.image_hw, meta.config.data
    if data.resize == "squash":
        size = [f"H, W = {h}, {w}"]
    else:
        short = data.short_side or min(h, w)
        f = f"{short} / min(h0, w0)" if data.resize == "short_side" else "1.0"
        size = [f"f = {f}", "H, W = max(1, round(h0 * f)), max(1, round(w0 * f))"]
    pad = [] if data.resize == "squash" else [
        f"x = np.pad(x, ((0, -H % {STRIDE}), (0, -W % {STRIDE}), (0, 0)))  # black at the bottom and right"]
    return [
        "import cv2, numpy as np",
        "",
        "def network_input(path):",
        "    img = cv2.imread(path, cv2.IMREAD_COLOR)  # BGR, EXIF orientation applied",
        "    h0, w0 = img.shape[:2]",
        *(f"    {line}" for line in size),
        "    if path.lower().endswith((\".jpg\", \".jpeg\")):  # libjpeg's reduced decode, while it still covers H x W",
        "        for k, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),",
        "                        (2, cv2.IMREAD_REDUCED_COLOR_2)):",
        "            if w0 // k >= W and h0 // k >= H:",
        "                img = cv2.imread(path, flag)",
        "                break",
        "    h, w = img.shape[:2]",
        "    area = h >= 2 * H and w >= 2 * W  # the resize rule: area from twice the size, else bilinear",
        "    img = cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA if area else cv2.INTER_LINEAR)",
        "    x = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)",
        *(f"    {line}" for line in pad),
        "    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # uint8 (1, 3, H, W)",
    ]


def _recipe(cfg: Config, binary: bool) -> list[str]:
    model, data, optim, train, loss = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.loss
    augment = {k: v for k, v in cfg.augment.__dict__.items() if k not in ("mean", "std")}
    loss_name = loss.name
    if loss_name == "auto":  # config.LossConfig: auto = dice_bce for binary, dice_ce otherwise
        loss_name = f"auto` = `{'dice_bce' if binary else 'dice_ce'}"
    loss_args = ", ".join(f"{k}={v}" for k, v in loss.__dict__.items() if k != "name")
    return [
        (f"- architecture: `{model.arch}`, encoder `{model.encoder}`, "
         f"encoder weights at the start: `{model.pretrained}`"),
        f"- loss: `{loss_name}` ({loss_args})",
        (f"- optimiser: `{optim.name}`, lr {optim.lr} (encoder lr {optim.encoder_lr or 'same'}), "
         f"weight decay {optim.weight_decay}, schedule `{optim.scheduler}`, "
         f"warmup {optim.warmup_steps} steps, EMA {optim.ema}"),
        (f"- epochs: {train.epochs}, batch size {data.batch_size} per device, "
         f"mixed precision `{train.mixed_precision}`, seed {train.seed}"),
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


def model_card(folder: str | Path, meta: ModelMeta, metrics: dict | None = None) -> str:
    """The Markdown text of :func:`write_model_card`."""
    cfg, (h, w), c = meta.config, meta.image_hw, meta.out_channels
    mean, std = list(meta.mean), list(meta.std)
    pred = "mask = logits[0, 0] > 0" if meta.binary else "mask = logits[0].argmax(0)"
    return "\n".join([
        f"# {cfg.model.arch} segmentation model (segdist)",
        "",
        "## Data",
        f"- shards: `{cfg.data.shards or '?'}`",
        *_fingerprint(meta),
        f"- classes: {_classes(meta)}",
        f"- input: {_input_rule(meta)}",
        f"- normalisation: `(x / 255 - mean) / std`, mean {mean}, std {std}",
        "",
        "## Recipe",
        *_recipe(cfg, meta.binary),
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
        "The network input, with OpenCV and numpy alone (the pixels segdist feeds the model, within one",
        "level of 255):",
        "```python",
        *input_code(meta),
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
        'x = torch.from_numpy(network_input("photo.jpg"))  # uint8 (1, 3, H, W)',
        f"logits = model((x / 255 - mean) / std)  # float32 (1, {c}, H, W)",
        "```",
        "",
        f"ONNX Runtime, after `segdist export {folder} --onnx model.onnx` (normalisation is in the graph;",
        f"uint8 in, logits out; a graph exported without `--dynamic` takes exactly (1, 3, {h}, {w})):",
        "```python",
        "import onnxruntime as ort",
        'session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])',
        f'logits = session.run(None, {{"{INPUT}": network_input("photo.jpg")}})[0]',
        f"{pred}  # logits: float32 (1, {c}, H, W)",
        "```",
        "",
    ])


def write_model_card(folder: Path, meta: ModelMeta, metrics: dict | None) -> None:
    """Write ``folder/README.md`` (atomically): data, classes, input size, normalisation, recipe,
    ``metrics`` (as :meth:`segdist.metrics.SegCounts.compute` returns them; None: none) and how to
    load the model with segdist, SMP and ONNX Runtime. Replaces the generic card of ``save_pretrained``."""
    atomic_write_text(Path(folder) / "README.md", model_card(folder, meta, metrics))
