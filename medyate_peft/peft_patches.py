"""Crash-safe saves and clean failed loads for MeDyate adapters, through PEFT's usual entry points.

Users call `model.save_pretrained(dir)`, `PeftModel.from_pretrained(base, dir)` and
`model.load_adapter(dir, name)`, which are PEFT's methods. For models and folders holding MeDyate
adapters (and only for those) they are wrapped so that:
- a save writes into a temporary folder that replaces `dir` atomically (`atomic.atomic_directory`);
- a load first checks the folder's config (form, `peft_type`, required keys) and weights file
  (missing, truncated, lacking the `modules_to_save` weights) before anything touches the model, and
  a `from_pretrained` that fails later (an adapter for another base model), of any PEFT method, puts
  the model back as it was (`rollback.ModuleSnapshot`) instead of leaving it half-wrapped;
- a save whose base model is named by a loader spec (`mcu:...`, `timm:...`), which is neither a
  folder nor a Hub id, skips PEFT's Hub lookup for a vocabulary check (and its warning);
- `print_trainable_parameters` counts the values trained (the selection's weight slots, the head)
  against the base model's own parameters (`MeDyateModel.trainable_parameter_counts`).
A local path that does not exist (which cannot be a hub id either) is reported as such. Everything
else (arguments, files written, errors for other PEFT methods) is PEFT's behaviour.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peft import PeftModel
from peft.utils import PeftType
from safetensors import SafetensorError, safe_open
from torch import nn

from .atomic import atomic_directory
from .rollback import ModuleSnapshot
from .serialization import names_module

logger = logging.getLogger(__name__)
CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
REQUIRED_KEYS = ("budget_kb", "strategy")  # no default could stand in for them: the budget is the adapter's
_RESAVE = "save it again with model.save_pretrained(...) or copy the complete file again"


class AdapterFileError(ValueError):
    """An adapter folder whose files are missing, truncated or corrupt."""


def _is_medyate_config(config: Any) -> bool:
    return getattr(config, "peft_type", None) == PeftType.MEDYATE


def _is_medyate_model(model: PeftModel) -> bool:
    return any(_is_medyate_config(c) for c in model.peft_config.values())


def _has_tuner_layers(model: nn.Module) -> bool:
    """Whether any PEFT method (MeDyate, LoRA, ...) has wrapped layers of `model`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def check_adapter_folder(
    model_id: str | os.PathLike, subfolder: str | None = None, config: Any = None, model: nn.Module | None = None
) -> None:
    """For a local MeDyate adapter folder: raise a clear error if its config or weights file is missing,
    damaged or inconsistent, before anything touches the model.

    Given the `model` it loads onto, the weights of every module of it that modules_to_save names must
    be in the file. Only the safetensors header is read (cheap); other PEFT methods and hub ids pass.
    """
    folder = Path(model_id) / (subfolder or "")
    if not folder.is_dir():
        if _cannot_be_hub_id(str(model_id)):  # PEFT would report an invalid hub repo id
            raise FileNotFoundError(f"no adapter folder {folder} (and {model_id!r} is not a Hugging Face Hub id)")
        return
    if config is None:
        if not (folder / CONFIG_NAME).is_file():
            return
        config = read_medyate_config(folder)
        if config is None:
            return
        modules_to_save = config.get("modules_to_save")
    elif _is_medyate_config(config):
        modules_to_save = config.modules_to_save
    else:
        return
    keys = _weight_keys(folder)
    if keys is None or model is None:
        return
    names = [name for name, _ in model.named_modules()]
    for target in modules_to_save or ():
        present = any(names_module(name, target) for name in names)
        if present and not any(f".{target}." in f".{key}" for key in keys):
            raise AdapterFileError(
                f"{folder / SAFETENSORS_NAME} holds no weights of {target!r}, which the config names in "
                f"modules_to_save; the adapter is incomplete: {_RESAVE}"
            )


def read_medyate_config(folder: Path) -> dict[str, Any] | None:
    """The folder's adapter_config.json if it is a MeDyate adapter's, checked for form and required keys.

    None when the folder holds another PEFT method's adapter (PEFT reports its own problems).
    """
    path = folder / CONFIG_NAME
    text = path.read_text(encoding="utf-8", errors="replace")
    ours = "MEDYATE" in text or _holds_medyate_weights(folder / SAFETENSORS_NAME)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        if ours:
            raise AdapterFileError(f"{path} is truncated or corrupt ({err}); {_RESAVE}") from err
        return None
    if not isinstance(config, dict):
        if ours:
            raise AdapterFileError(f"{path} holds a JSON {type(config).__name__}, not an object of config fields; "
                                   f"{_RESAVE}")
        return None
    if config.get("peft_type") != PeftType.MEDYATE:
        if _holds_medyate_weights(folder / SAFETENSORS_NAME):
            found = f"says peft_type {config['peft_type']!r}" if "peft_type" in config else "lacks 'peft_type'"
            raise AdapterFileError(
                f"{path} {found}, but {folder / SAFETENSORS_NAME} holds a MeDyate adapter: the config was edited "
                f"or belongs to another adapter ('peft_type' must be 'MEDYATE'); {_RESAVE}"
            )
        return None
    for key in REQUIRED_KEYS:
        if key not in config:
            raise AdapterFileError(f"{path} lacks the required key {key!r}; {_RESAVE}")
    return config


def _weight_keys(folder: Path) -> list[str] | None:
    """Tensor names of the weights file (header only); None for a legacy .bin; errors if missing or damaged."""
    weights = folder / SAFETENSORS_NAME
    if not weights.exists():
        if (folder / BIN_NAME).exists():
            return None
        raise FileNotFoundError(
            f"{weights} is missing: {folder} holds a MeDyate adapter config but no weights file (an interrupted "
            f"copy or a save from an older tool?); {_RESAVE}"
        )
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(f"{weights} is truncated or corrupt ({err}); {_RESAVE}") from err


def _cannot_be_hub_id(model_id: str) -> bool:
    """A local-looking path: hub ids are `name` or `owner/name`, never absolute or relative to '.'."""
    return os.path.isabs(model_id) or model_id.startswith((".", "~")) or model_id.count("/") > 1


def _holds_medyate_weights(weights: Path) -> bool:
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return any(".medyate_" in key for key in handle.keys())
    except (SafetensorError, OSError):
        return False


def _bind(func: Callable, *args: Any, **kwargs: Any) -> inspect.BoundArguments:
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound


def _cannot_swap(target: Path) -> str | None:
    """Why a folder cannot be replaced by a sibling (None: it can)."""
    cwd = Path.cwd()
    if target == cwd or target in cwd.parents:
        return "it holds the working directory, which a swap would delete"
    if target.parent.is_dir() and not os.access(target.parent, os.W_OK | os.X_OK):
        return "its parent folder is read-only"
    return None


def _targets_embedding_layer(model: nn.Module) -> bool:
    """Whether a MeDyate layer sits on a module PEFT treats as an embedding layer (lm_head, embed_tokens)."""
    from peft.utils.other import EMBEDDING_LAYER_NAMES

    from .medyate.layer import MeDyateLayer

    return any(
        isinstance(m, MeDyateLayer) and name.rpartition(".")[2] in EMBEDDING_LAYER_NAMES
        for name, m in model.named_modules()
    )


def _is_model_spec(model_id: str | None) -> bool:
    """A loader spec such as 'mcu:mcunet-5fps' or 'timm:...': neither a folder nor a Hub id."""
    return bool(model_id) and ":" in model_id and not os.path.exists(model_id)


def _wrap_save_pretrained(original: Callable) -> Callable:
    @functools.wraps(original)
    def save_pretrained(self: PeftModel, *args: Any, **kwargs: Any) -> None:
        bound = _bind(original, self, *args, **kwargs)
        directory = bound.arguments["save_directory"]
        if not (_is_medyate_model(self) and bound.arguments["is_main_process"]) or os.path.isfile(directory):
            return original(*bound.args, **bound.kwargs)
        names = [c.base_model_name_or_path for c in self.peft_config.values()]
        if bound.arguments["save_embedding_layers"] == "auto" and all(map(_is_model_spec, names)):
            # PEFT would look the spec up on the Hub for a vocabulary check and warn that it cannot;
            # MeDyate trains no embedding, and without a config PEFT saves none either.
            bound.arguments["save_embedding_layers"] = False
        if bound.arguments["save_embedding_layers"] == "auto" and _targets_embedding_layer(self):
            # PEFT saves the whole base weight of a targeted lm_head/embed_tokens (LoRA users often
            # resized it); MeDyate leaves base weights untouched and stores the channel deltas, so
            # only a resized vocabulary needs it: pass save_embedding_layers=True then.
            bound.arguments["save_embedding_layers"] = False
        reason = _cannot_swap(Path(os.path.realpath(directory)))
        if reason:
            logger.warning("MeDyate: %s is saved in place, not atomically: %s", directory, reason)
            return original(*bound.args, **bound.kwargs)
        # PEFT updates an existing model card, so the old README.md is the staging folder's start.
        with atomic_directory(directory, seed_files=("README.md",)) as staging:
            bound.arguments["save_directory"] = str(staging)
            original(*bound.args, **bound.kwargs)

    return save_pretrained


def _wrap_from_pretrained(original: Callable) -> Callable:
    @functools.wraps(original)
    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> PeftModel:
        bound = _bind(original, cls, *args, **kwargs)
        model = bound.arguments["model"]
        check_adapter_folder(
            bound.arguments["model_id"], bound.arguments["kwargs"].get("subfolder"), bound.arguments["config"], model
        )
        already_wrapped = _has_tuner_layers(model)
        snapshot = ModuleSnapshot(model)
        try:
            return original(*bound.args, **bound.kwargs)
        except BaseException:  # whatever the PEFT method: the base model goes back as it was
            if not already_wrapped:
                snapshot.restore()
            raise

    return from_pretrained


def _wrap_load_adapter(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_adapter(self: PeftModel, *args: Any, **kwargs: Any) -> Any:
        if not _is_medyate_model(self):
            return original(self, *args, **kwargs)
        bound = _bind(original, self, *args, **kwargs)
        check_adapter_folder(bound.arguments["model_id"], bound.arguments["kwargs"].get("subfolder"), model=self)
        snapshot = ModuleSnapshot(self)
        try:
            return original(*bound.args, **bound.kwargs)
        except BaseException:
            snapshot.restore()
            raise

    return load_adapter


def _wrap_trainable_counts(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_nb_trainable_parameters(self: PeftModel) -> tuple[int, int]:
        if not _is_medyate_model(self):
            return original(self)
        return self.base_model.trainable_parameter_counts()

    return get_nb_trainable_parameters


def install() -> None:
    """Wrap PeftModel's save/load entry points and parameter counts once (idempotent)."""
    if getattr(PeftModel.save_pretrained, "_medyate_wrapped", False):
        return
    from_pretrained = PeftModel.__dict__["from_pretrained"].__func__
    wrappers = {
        "save_pretrained": _wrap_save_pretrained(PeftModel.save_pretrained),
        "load_adapter": _wrap_load_adapter(PeftModel.load_adapter),
        "get_nb_trainable_parameters": _wrap_trainable_counts(PeftModel.get_nb_trainable_parameters),
    }
    for name, wrapper in wrappers.items():
        wrapper._medyate_wrapped = True
        setattr(PeftModel, name, wrapper)
    wrapped_from = _wrap_from_pretrained(from_pretrained)
    wrapped_from._medyate_wrapped = True
    PeftModel.from_pretrained = classmethod(wrapped_from)
