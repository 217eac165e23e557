"""The papers' fp32 mcunet-zoo networks: architecture, slot totals, reference budgets, weight loading offline."""

from __future__ import annotations

import copy
import json
import urllib.error
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch import nn

import medyate_peft  # noqa: F401
from medyate_peft import MeDyateConfig, rank_layers
from medyate_peft.backbones import ZOO_NETS, load_zoo_model
from medyate_peft.backbones import mcunet_zoo as zoo
from medyate_peft.models import load_model

# TraDy's full-fine-tuning slot totals (spec section 7) and the reference budgets (spec section 2).
FULL_SLOTS = {"mbv2-w0.35": 1_252_320, "mcunet-5fps": 1_309_808, "proxyless-w0.3": 1_162_032}
BUDGETS = {"mbv2-w0.35": [27_946, 66_592, 93_696], "mcunet-5fps": [15_936, 64_832, 112_640],
           "proxyless-w0.3": [25_984, 72_960, 101_376]}
FEATURE_MIX = {"mbv2-w0.35": (112, 448), "mcunet-5fps": None, "proxyless-w0.3": (96, 384)}
INPUT = [3, 128, 128]


@pytest.fixture(scope="module")
def nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: load_zoo_model(name, pretrained=False) for name in ZOO_NETS}


def _convs(model: nn.Module) -> list[tuple[int, int, int, int, int]]:
    return [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.groups)
            for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", sorted(ZOO_NETS))
def test_zoo_network_has_batchnorm_feature_mix_and_the_papers_slot_total(name, nets):
    model = nets[name]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(convs)  # one BN per conv
    assert all(m.bias is None for m in convs) and isinstance(model.classifier.dropout, nn.Dropout)
    mix = FEATURE_MIX[name]
    if mix is None:
        assert model.feature_mix_layer is None
    else:
        assert (model.feature_mix_layer.conv.in_channels, model.feature_mix_layer.conv.out_channels) == mix
    assert model.classifier.linear.in_features == (mix[1] if mix else 160)
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, *INPUT)).shape == (2, 1000)
    tuner = get_peft_model(copy.deepcopy(model), MeDyateConfig(budget_kb=64, input_size=INPUT,
                                                               strategy="full_random")).base_model
    assert tuner.peft_config["default"].modules_to_save == ["classifier"]
    assert sum(c.layer_slots for c in tuner.layer_costs()) == FULL_SLOTS[name]


@pytest.mark.parametrize("name", sorted(ZOO_NETS))
def test_zoo_layers_are_the_int8_graphs_plus_feature_mix(name, nets, shared_assets):
    """tiny-training's int8 graph of the same network: the same convs in the same order, BN folded, no feature-mix."""
    arch = json.loads((shared_assets / "models" / "mcu" / f"{name}.json").read_text())["model"]
    int8 = [arch["first_conv"]]
    for block in arch["blocks"]:
        int8 += [block[part] for part in ("pointwise1", "depthwise", "pointwise2") if block[part] is not None]
    expected = [(c["in_channel"], c["out_channel"], c["kernel_size"][0], c["stride"], c["groups"]) for c in int8]
    got = _convs(nets[name])
    mix = FEATURE_MIX[name]
    assert got == expected + ([] if mix is None else [(*mix, 1, 1, 1)])
    residual = [b["residual"] is not None for b in arch["blocks"]]
    assert [b.residual for b in nets[name].blocks] == residual


@pytest.mark.parametrize("name", sorted(ZOO_NETS))
def test_reference_budgets_are_filled_and_the_alpha_rule_holds(name, nets):
    model = nets[name]
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, *INPUT, generator=g), torch.tensor([1, 2]))]
    ranking = rank_layers(model, data, steps=1, lr=0.0, progress=False)
    for slots in BUDGETS[name]:
        for strategy in ("full_random", "medyate", "trady"):
            config = MeDyateConfig(budget_kb=slots * 4 / 1024, input_size=INPUT, strategy=strategy,
                                   layer_ranking=ranking)
            plan = get_peft_model(copy.deepcopy(model), config).base_model.plans["default"]
            assert plan.budget == slots
            used = int(plan.pool.slots[plan.selected].sum())
            left = torch.ones(len(plan.pool), dtype=torch.bool)
            left[plan.selected] = False
            assert used <= slots and (not bool(left.any()) or int(plan.pool.slots[left].min()) > slots - used)
            if strategy == "medyate":  # the smallest top-K with B / M_K <= 0.2
                pool = sorted(plan.pool.costs, key=lambda c: ranking["lara"][c.name])
                total = sum(c.layer_slots for c in pool)
                assert slots / total <= 0.2 < slots / (total - pool[0].layer_slots)


@pytest.mark.parametrize("name", sorted(ZOO_NETS))
def test_zoo_network_is_the_mcunet_packages_own(name, nets):
    """mit-han-lab's ProxylessNASNets built from the same config: the same state-dict keys, shapes and outputs."""
    from mcunet.tinynas.nn.networks import ProxylessNASNets

    reference = ProxylessNASNets.build_from_config(copy.deepcopy(zoo.zoo_config(name))).eval()
    state = reference.state_dict()
    assert [(k, v.shape) for k, v in state.items()] == [(k, v.shape) for k, v in nets[name].state_dict().items()]
    g = torch.Generator().manual_seed(0)
    for key, value in state.items():  # non-trivial BN statistics, so that every part of the forward counts
        if value.is_floating_point():
            value.copy_(torch.rand(value.shape, generator=g) + 0.5 if "running_var" in key else
                        torch.randn(value.shape, generator=g) * 0.1)
    ours = copy.deepcopy(nets[name]).eval()
    ours.load_state_dict(state, strict=True)
    reference.load_state_dict(state)
    x = torch.randn(2, *INPUT, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)
    bn = next(m for m in reference.modules() if isinstance(m, nn.BatchNorm2d))
    assert all((m.momentum, m.eps) == (bn.momentum, bn.eps) for m in ours.modules() if isinstance(m, nn.BatchNorm2d))


def _write_zoo_files(model: nn.Module, name: str, folder: Path) -> None:
    stem = ZOO_NETS[name]
    (folder / f"{stem}.json").write_text(json.dumps(zoo.zoo_config(name)))
    torch.save({"state_dict": model.state_dict()}, folder / f"{stem}.pth")


def test_pretrained_weights_load_strictly_from_a_folder(nets, tmp_path):
    source = copy.deepcopy(nets["mbv2-w0.35"])
    with torch.no_grad():
        for module in source.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
    _write_zoo_files(source, "mbv2-w0.35", tmp_path)
    loaded = load_zoo_model("mbv2-w0.35", weights_dir=tmp_path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    head = load_zoo_model("mbv2-w0.35", num_classes=10, weights_dir=tmp_path).classifier.linear
    assert (head.in_features, head.out_features) == (448, 10)
    via_loader = load_model("zoo:mbv2-w0.35", num_classes=10, weights=str(tmp_path))
    assert via_loader.spec == "zoo:mbv2-w0.35" and via_loader.input_size == INPUT
    assert via_loader.transform(train=False).transforms[1].size == (128, 128)

    state = source.state_dict()
    state.pop("feature_mix_layer.conv.weight")  # weights of another network: an error, not a partial load
    torch.save({"state_dict": state}, tmp_path / f"{ZOO_NETS['mbv2-w0.35']}.pth")
    with pytest.raises(RuntimeError, match="feature_mix_layer.conv.weight"):
        load_zoo_model("mbv2-w0.35", weights_dir=tmp_path)


def test_offline_the_weights_fail_with_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"missing .*proxyless-w0.3-r176_imagenet.json.*download https://"):
        load_zoo_model("proxyless-w0.3", weights_dir=tmp_path)

    def offline(url: str, dst: str, progress: bool = True) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.delenv(zoo.ZOO_DIR_ENV, raising=False)
    with pytest.raises(OSError, match=r"could not download .*mcunet-5fps_imagenet.json.*weights_dir=<folder>"):
        load_zoo_model("mcunet-5fps")
    assert not list((tmp_path / "hub" / "mcunet_zoo").iterdir())  # nothing half-written
    with pytest.raises(ValueError, match="unknown mcunet zoo network"):
        load_zoo_model("mbv2-w1.0", pretrained=False)
