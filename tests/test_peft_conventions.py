"""PEFT conventions on MeDyate: trainability, parameter counts, config docs, file modes, epochs, progress."""

from __future__ import annotations

import dataclasses
import io
import os
import pydoc
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel, get_peft_model
from test_core import INPUT, ConvZoo, batch, train_steps

import medyate_peft  # noqa: F401  (registers the method)
from medyate_peft import MeDyateConfig
from medyate_peft.progress import LineProgress, progress


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def conv_zoo_model(**kwargs) -> PeftModel:
    torch.manual_seed(0)
    config = MeDyateConfig(budget_kb=4.0, input_size=INPUT, strategy="full_random", **kwargs)
    return get_peft_model(ConvZoo(), config)


HEAD = {f"base_model.model.classifier.modules_to_save.{{}}.{p}" for p in ("weight", "bias")}


def head(adapter: str) -> set[str]:
    return {name.format(adapter) for name in HEAD}


def test_requires_grad_follows_the_active_adapter_as_for_peft_tuners(tmp_path):
    model = conv_zoo_model()
    assert trainable(model) == {"base_model.medyate_values.default", *head("default")}
    model.add_adapter("other", MeDyateConfig(budget_kb=2.0, input_size=INPUT, target_modules=["tokens"]))
    assert trainable(model) == {"base_model.medyate_values.default", *head("default")}  # a new adapter is frozen
    model.set_adapter("other")
    assert trainable(model) == {"base_model.medyate_values.other", *head("other")}
    with model.disable_adapter():
        assert trainable(model) == set()
    assert trainable(model) == {"base_model.medyate_values.other", *head("other")}
    model.base_model.set_requires_grad("default")
    assert "base_model.medyate_values.default" in trainable(model)
    model.base_model.set_requires_grad(["default", "other"], requires_grad=False)
    assert not {"base_model.medyate_values.default", "base_model.medyate_values.other"} & trainable(model)

    model.set_adapter("default")
    model.save_pretrained(tmp_path)
    for is_trainable in (False, True):
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(ConvZoo(), tmp_path, is_trainable=is_trainable)
        expected = {"base_model.medyate_values.default", *head("default")} if is_trainable else set()
        assert trainable(loaded) == expected
        loaded.load_adapter(tmp_path / "other", "other", is_trainable=True)
        assert trainable(loaded) == expected | {"base_model.medyate_values.other", *head("other")}


def test_print_trainable_parameters_counts_trained_values_against_the_base_model(capsys):
    torch.manual_seed(0)
    base_params = sum(p.numel() for p in ConvZoo().parameters())
    model = get_peft_model(ConvZoo(), MeDyateConfig(budget_kb=4.0, strategy="full_random"))
    head_params = 12 * 5 + 5
    assert model.get_nb_trainable_parameters() == (1024 + head_params, base_params)  # before planning: the vector
    x, y = batch()
    model.train()
    F.cross_entropy(model(x), y).backward()  # plans at the first training batch
    selection = model.base_model.selection()
    layers = model.base_model.medyate_layers()
    used = sum(len(idx) * layers[name].slice_shape[0] * layers[name].slice_shape[1] for name, idx in selection.items())
    assert 0 < used < 1024
    assert model.get_nb_trainable_parameters() == (used + head_params, base_params)
    model.print_trainable_parameters()
    assert f"all params: {base_params:,}" in capsys.readouterr().out


def test_config_documents_every_field_as_peft_configs_do():
    doc = pydoc.render_doc(MeDyateConfig, renderer=pydoc.plaintext)
    own = {f.name for f in dataclasses.fields(MeDyateConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    assert "Args:" in doc
    undocumented = [name for name in sorted(own) if f"{name} (`" not in doc]
    assert undocumented == [], f"MeDyateConfig fields missing from its Args section: {undocumented}"


def test_adapter_files_get_the_mode_of_every_other_file(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    model = conv_zoo_model()
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    modes = {p.name: p.stat().st_mode & 0o777 for p in target.iterdir()}
    assert modes == dict.fromkeys(["README.md", "adapter_config.json", "adapter_model.safetensors"], 0o666 & ~umask)
    (target / "adapter_model.safetensors").chmod(0o640)  # a user's choice survives the next save
    model.save_pretrained(target)
    assert (target / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o640


def _epoch(model, optimizer, data) -> None:
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _model_optimizer_data(seed: int, batches: int) -> tuple:
    model = conv_zoo_model()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(4, *INPUT, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(batches)]
    return model, optimizer, data


def test_a_second_epoch_without_resample_warns_once():
    model, optimizer, data = _model_optimizer_data(3, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _epoch(model, optimizer, data)
            model.base_model.resample(optimizer)
    assert not [w for w in caught if "came round again" in str(w.message)]
    with pytest.warns(UserWarning, match="came round again after 5 batches without resample"):
        _epoch(model, optimizer, data)
        _epoch(model, optimizer, data[::-1])  # shuffled order: the samples are still recognised
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _epoch(model, optimizer, data)
    assert not [w for w in caught if "came round again" in str(w.message)]  # once


def test_a_memory_report_on_a_training_batch_is_not_taken_for_the_data_coming_round():
    model, optimizer, data = _model_optimizer_data(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _epoch(model, optimizer, data)
        for x, _ in data:  # measured after the last epoch, before any resample(), as a benchmark does
            model.base_model.memory_report(x, compare_lean=False)
    assert not [w for w in caught if "came round again" in str(w.message)]
    with pytest.warns(UserWarning, match="came round again after 3 batches without resample"):
        _epoch(model, optimizer, data)  # the watch still works after the reports


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_plain_lines_off_a_terminal():
    out = io.StringIO()
    bar = progress(range(20), "epoch 1/2", file=out)
    assert isinstance(bar, LineProgress)
    for step in bar:
        bar.set_postfix(loss=f"{step / 10:.1f}")
    lines = out.getvalue().splitlines()
    assert lines[0] == "epoch 1/2: 2/20, loss=0.1" and lines[-1] == "epoch 1/2: 20/20, loss=1.9" and len(lines) == 10
    assert "\r" not in out.getvalue()
    assert not isinstance(progress(range(3), "x", file=_Terminal()), LineProgress)
    assert list(progress(range(3), "x", disable=True)) == [0, 1, 2]


@pytest.mark.parametrize("bias", ["medyate_only", "all"])
def test_bias_option_trains_saves_and_reloads_biases_as_lora_does(bias, tmp_path):
    model = conv_zoo_model(bias=bias)
    biases = {n for n in trainable(model) if n.endswith(".bias") and ".modules_to_save." not in n}
    wrapped = {f"base_model.model.{name}.base_layer.bias" for name, layer in model.base_model.medyate_layers().items()
               if layer.get_base_layer().bias is not None}
    assert biases == wrapped  # ConvZoo's other bias is the head's: trained through its modules_to_save copy
    train_steps(model, steps=2, lr=0.1)
    x, _ = batch()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(ConvZoo(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    with pytest.raises(ValueError, match="bias must be one of"):
        MeDyateConfig(bias="lora_only")


def test_several_trainable_active_adapters_sum_in_forward_and_refuse_backward():
    model = conv_zoo_model(init_weights=False, modules_to_save=[])  # PEFT sets one modules_to_save at a time
    model.add_adapter("other", MeDyateConfig(budget_kb=4.0, input_size=INPUT, strategy="full_random",
                                             init_weights=False, modules_to_save=[]))
    x, _ = batch()
    model.train()
    outputs = {}
    for adapter in ("default", "other"):
        model.set_adapter(adapter)
        with torch.no_grad():
            outputs[adapter] = model(x)
    model.base_model.set_adapter(["default", "other"])
    assert {"base_model.medyate_values.default", "base_model.medyate_values.other"} <= trainable(model)
    combined = model(x)  # both adapters' deltas count, as with several active LoRA adapters
    assert not torch.allclose(combined, outputs["default"]) and not torch.allclose(combined, outputs["other"])
    with pytest.raises(RuntimeError, match="several active MeDyate adapters are being trained at once"):
        combined.sum().backward()
