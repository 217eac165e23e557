"""The installed peft release's own test modules, fetched as its sdist at test time (never committed).

`load("test_custom_models")` downloads `peft==<installed version>` as a source distribution with pip
(once per checkout: it is cached in the git-ignored `.peft_release_tests/`), extracts the test module
and the helper modules it imports from peft's tests folder, and imports them as the package
`peft_release_tests`. Without a reachable package index the caller is told to skip.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

CACHE = Path(__file__).resolve().parents[1] / ".peft_release_tests"
PACKAGE = "peft_release_tests"
_RELATIVE_IMPORT = re.compile(r"^from \.(\w+) import", re.MULTILINE)
# What pip prints when no package index can be reached (as opposed to, say, a version without sdist).
_UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                "ConnectTimeout", "ProxyError", "Network is unreachable", "Max retries exceeded")


class IndexUnreachable(RuntimeError):
    """pip could not reach a package index to fetch peft's sdist."""


def _download_sdist(version: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
               f"peft=={version}", "-d", str(into)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        if any(marker in output for marker in _UNREACHABLE):
            raise IndexUnreachable(f"no package index reachable to fetch the peft {version} sdist:\n{output[-2000:]}")
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {done.returncode}):\n{output[-4000:]}")
    sdists = sorted(into.glob(f"peft-{version}.tar.gz"))
    if not sdists:
        raise RuntimeError(f"pip downloaded no peft-{version}.tar.gz into {into}:\n{output[-2000:]}")
    return sdists[0]


def _extract_tests(sdist: Path, module: str, package_dir: Path) -> None:
    """The test module and, transitively, the sibling modules it imports relatively, as a package."""
    with tarfile.open(sdist) as archive:
        members = {Path(m.name).name: m for m in archive.getmembers()
                   if m.isfile() and Path(m.name).parent.name == "tests" and len(Path(m.name).parts) == 3}
        wanted, seen = [module], set()
        while wanted:
            name = wanted.pop()
            if name in seen:
                continue
            seen.add(name)
            if f"{name}.py" not in members:
                raise RuntimeError(f"{sdist.name} has no tests/{name}.py")
            text = archive.extractfile(members[f"{name}.py"]).read().decode("utf-8")
            (package_dir / f"{name}.py").write_text(text, encoding="utf-8")
            wanted.extend(_RELATIVE_IMPORT.findall(text))
    (package_dir / "__init__.py").write_text(f'"""Tests of the peft {sdist.name} sdist."""\n', encoding="utf-8")


def _fetched(module: str) -> Path:
    """The folder to put on sys.path: `<cache>/<version>/`, holding the package with `module`."""
    version = importlib.metadata.version("peft")
    root = CACHE / version
    if (root / PACKAGE / f"{module}.py").is_file():
        return root
    CACHE.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        staging = Path(tmp) / version
        (staging / PACKAGE).mkdir(parents=True)
        _extract_tests(_download_sdist(version, Path(tmp)), module, staging / PACKAGE)
        if root.exists():  # an older fetch without this module
            shutil.rmtree(root)
        staging.rename(root)
    return root


def load(module: str) -> ModuleType:
    """Import `peft_release_tests.<module>` from the installed peft release's sdist."""
    root = str(_fetched(module))
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"{PACKAGE}.{module}")
