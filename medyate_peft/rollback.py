"""Undo what a failed `get_peft_model` / `PeftModel.from_pretrained` did to the user's model.

PEFT wraps the base model in place (layers replaced, base weights frozen, attributes and hooks
added) before it reads the adapter weights, so a load that fails on a bad file would leave the
user's model half-wrapped. A snapshot taken before holds every module's attributes and the items
of its containers (children, parameters, buffers, hooks, adapter dicts) one level deep, and puts
them back on failure. Parameter and buffer *values* are not copied: nothing on these paths writes
into them before the adapter has been validated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


class ModuleSnapshot:
    """Structure and trainability of a module tree, restorable in place."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(module, _copy_attributes(module)) for module in model.modules()]
        self.requires_grad = [(param, param.requires_grad) for param in model.parameters()]

    def restore(self) -> None:
        for module, saved in self.modules:
            for key in set(module.__dict__) - set(saved):
                del module.__dict__[key]
            for key, (original, contents) in saved.items():
                if isinstance(original, list):
                    original[:] = contents
                elif contents is not None:
                    original.clear()
                    original.update(contents)
                module.__dict__[key] = original
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)


def _copy_attributes(module: nn.Module) -> dict[str, tuple[Any, Any]]:
    """Each attribute with, for containers (children, parameters, buffers, hooks...), a copy of its items."""
    return {key: (value, _contents(value)) for key, value in module.__dict__.items()}


def _contents(value: Any) -> Any:
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (list, set)):
        return type(value)(value)
    return None


@contextlib.contextmanager
def restored_on_error(model: nn.Module) -> Iterator[None]:
    """Run a block that changes `model` in place; if it raises, put `model` back as it was."""
    snapshot = ModuleSnapshot(model)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise
