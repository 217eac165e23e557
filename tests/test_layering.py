"""The method core imports nothing from the PEFT layer (medyate_peft/medyate/), not even lazily.

Read from the sources (every import statement, at any depth, followed through the package), since
importing a module in a fresh interpreter runs the package's __init__, which loads the tuner anyway.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medyate_peft"
PEFT_LAYER = "medyate_peft.medyate"
CORE = ("budget", "candidates", "ddp", "growth", "guards", "kernels", "oracles", "optim_state", "planner",
        "pools", "ranking", "sampling", "sparse_probe", "step_budget", "strategies")


def _source(module: str) -> Path | None:
    parts = module.split(".")[1:]
    for path in (PACKAGE.joinpath(*parts).with_suffix(".py"), PACKAGE.joinpath(*parts, "__init__.py")):
        if path.is_file():
            return path
    return None


def _imports(module: str) -> set[str]:
    """Package modules `module`'s source imports anywhere (top level, functions, TYPE_CHECKING blocks)."""
    path = _source(module)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            if node.module:  # `from . import x` imports the modules x, not the package's __init__
                found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names if _source(f"{target}.{alias.name}")}
    return {name for name in found if name.split(".")[0] == "medyate_peft" and _source(name)}


def _chain_to_peft_layer(module: str) -> list[str] | None:
    """The import chain from `module` into the PEFT layer, if there is one."""
    parent: dict[str, str | None] = {module: None}
    todo = [module]
    while todo:
        current = todo.pop()
        if current == PEFT_LAYER or current.startswith(PEFT_LAYER + "."):
            chain = [current]
            while parent[chain[-1]] is not None:
                chain.append(parent[chain[-1]])
            return chain[::-1]
        for name in sorted(_imports(current) - set(parent)):
            parent[name] = current
            todo.append(name)
    return None


@pytest.mark.parametrize("name", CORE)
def test_core_module_imports_nothing_from_the_peft_layer(name):
    chain = _chain_to_peft_layer(f"medyate_peft.{name}")
    assert chain is None, " -> ".join(chain)


def test_the_check_sees_a_module_that_reaches_the_peft_layer():
    # serialization reads the tuner's layers, so it is not core: the check must find its import
    assert _chain_to_peft_layer("medyate_peft.serialization") == ["medyate_peft.serialization",
                                                                   "medyate_peft.medyate.layer"]
