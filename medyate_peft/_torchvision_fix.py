"""Repair for a torchvision wheel whose C++ extension cannot load with the installed torch.

Symptom: ``import torchvision`` (and so ``import timm`` / ``import peft``) dies with
``RuntimeError: operator torchvision::nms does not exist``. This happens e.g. with a CPU torch
next to a CUDA torchvision build: ``torchvision/_C.so`` fails to load (torchvision swallows that),
then ``torchvision/_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` /
``torchvision::qnms`` and fails because those operators were never defined. Defining the two
schemas first makes torchvision import and work (transforms, models; not its C++ ops).

``python -m medyate_peft._torchvision_fix`` (or ``python medyate_peft/_torchvision_fix.py``;
``scripts/setup_env.sh`` uses the path form because it does not import ``medyate_peft/__init__``,
which may import peft and hence torchvision) does, for the running interpreter's site-packages:

* healthy        -- ``import torchvision`` works in a subprocess with the repair disabled:
                    writes nothing (and removes a repair left over from an earlier broken state).
* broken         -- it fails with exactly the ``torchvision::nms does not exist`` message:
                    writes ``medyate_torchvision_fix.pth`` + ``_medyate_tv_schemas.py``, then checks
                    in a subprocess that torchvision (and timm / peft when installed) import.
* already fixed  -- broken with the repair disabled (env ``MEDYATE_TV_FIX_DISABLE=1``), files
                    present and up to date: only re-verifies.
* anything else  -- torchvision missing: nothing to do; any other import error: exit status 2.

``--remove`` deletes the two files. Standard library only; nothing here imports torch.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

PTH_NAME = "medyate_torchvision_fix.pth"
HELPER_NAME = "_medyate_tv_schemas"
DISABLE_ENV = "MEDYATE_TV_FIX_DISABLE"
BROKEN_MARKER = "operator torchvision::nms does not exist"

# One line, executed by site.py at every interpreter start: it cannot raise.
PTH_LINE = f"import sys; exec('try: import {HELPER_NAME}\\nexcept Exception: pass')\n"

HELPER_TEMPLATE = '''\
"""Written by medyate_peft._torchvision_fix; remove with
`python -m medyate_peft._torchvision_fix --remove` (or delete this file and {pth}).

On the first lookup of `torchvision` (never at interpreter start, so starting Python stays cheap)
this defines the schemas torchvision::nms / torchvision::qnms that torchvision's Python code needs,
because its C++ extension cannot load with this torch. Inert when {disable} is set, when torch or
torchvision is not the exact version this was written for, when the operators already exist, or
when torchvision's extension does load (then it registers the real operators itself).
"""
import os
import sys

_FOR_VERSIONS = {versions!r}
_SCHEMAS = {{
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}}


def _extension_loads(torch):
    from importlib.machinery import PathFinder

    spec = PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        for name in os.listdir(folder):
            if name.startswith("_C.") and name.endswith((".so", ".pyd")):
                try:
                    torch.ops.load_library(os.path.join(folder, name))
                    return True
                except (ImportError, OSError):
                    return False
    return False


def _apply():
    from importlib import metadata

    for dist, version in _FOR_VERSIONS.items():
        if metadata.version(dist) != version:
            return
    import torch

    ops = torch.ops.torchvision
    if hasattr(ops, "nms") or _extension_loads(torch):
        return
    for name, schema in _SCHEMAS.items():
        if not hasattr(ops, name):
            torch.library.define("torchvision::" + name, schema)


class _MedyateTorchvisionFinder:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass
            try:
                _apply()
            except Exception:
                pass
        return None


if not os.environ.get("{disable}") and not any(
    type(f).__name__ == "_MedyateTorchvisionFinder" for f in sys.meta_path
):
    sys.meta_path.insert(0, _MedyateTorchvisionFinder())
'''

VERIFY_CODE = (
    "import importlib.util, torchvision, torchvision.transforms.v2\n"
    "for m in ('timm', 'peft'):\n"
    "    if importlib.util.find_spec(m): __import__(m)\n"
)


def _import_check(python: str, code: str, *, repair_enabled: bool) -> tuple[str, str]:
    """Run ``code`` in a fresh interpreter; classify as ok / broken / missing / error."""
    env = dict(os.environ)
    if repair_enabled:
        env.pop(DISABLE_ENV, None)
    else:
        env[DISABLE_ENV] = "1"
    # Neutral cwd so that nothing in the current folder can shadow the packages under test.
    proc = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir()
    )
    err = proc.stderr.strip()
    if proc.returncode == 0:
        return "ok", err
    if BROKEN_MARKER in err:
        return "broken", err
    if "No module named 'torchvision'" in err:
        return "missing", err
    return "error", err


def _helper_source(python: str) -> str:
    code = "import importlib.metadata as m; print(repr({d: m.version(d) for d in ('torch', 'torchvision')}))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    versions = ast.literal_eval(out.strip())
    return HELPER_TEMPLATE.format(versions=versions, disable=DISABLE_ENV, pth=PTH_NAME)


def _files(site_packages: Path) -> tuple[Path, Path]:
    return site_packages / PTH_NAME, site_packages / f"{HELPER_NAME}.py"


def remove(site_packages: Path) -> bool:
    """Delete the repair files; True if there was something to delete."""
    pth, helper = _files(site_packages)
    found = False
    for path in (pth, helper, *(site_packages / "__pycache__").glob(f"{HELPER_NAME}.*.pyc")):
        if path.exists():
            path.unlink()
            found = True
    return found


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def install_if_broken(site_packages: Path, python: str | None = None) -> bool:
    """Install the repair into ``site_packages`` only if torchvision shows the nms breakage.

    ``python`` is the interpreter whose imports are checked (default: the running one; it must
    use ``site_packages``). Returns True if the repair is in place afterwards, False if none is
    needed. Raises RuntimeError if the breakage is unknown or the repair does not work.
    """
    site_packages = Path(site_packages)
    python = python or sys.executable
    pth, helper = _files(site_packages)
    present = pth.exists() or helper.exists()

    state, err = _import_check(python, "import torchvision", repair_enabled=False)
    if state in ("ok", "missing"):
        if present:
            remove(site_packages)
            print(f"torchvision: removed a repair that is no longer needed from {site_packages}")
        if state == "ok":
            print("torchvision imports fine; no repair needed")
        else:
            print("torchvision is not installed; nothing to repair")
        return False
    if state == "error":
        raise RuntimeError(
            "`import torchvision` fails, but not with the known "
            f"'{BROKEN_MARKER}' breakage; not repairing:\n{_tail(err)}"
        )

    source = _helper_source(python)
    up_to_date = (
        pth.exists() and helper.exists() and pth.read_text() == PTH_LINE and helper.read_text() == source
    )
    if not up_to_date:
        helper.write_text(source)  # helper first: the .pth never points at a missing module
        pth.write_text(PTH_LINE)

    state, err = _import_check(python, VERIFY_CODE, repair_enabled=True)
    if state != "ok":
        remove(site_packages)
        raise RuntimeError(f"the torchvision repair did not help; removed it again:\n{_tail(err)}")
    if up_to_date:
        print(f"torchvision: repair already installed in {site_packages}; imports verified")
    else:
        print(
            f"torchvision: C++ extension cannot load with this torch ('{BROKEN_MARKER}');\n"
            f"  installed {pth.name} + {helper.name} in {site_packages}\n"
            "  (defines torchvision::nms/qnms schemas on first import; transforms and models work, "
            "torchvision's C++ ops do not); imports verified"
        )
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medyate_peft._torchvision_fix",
        description="Repair `import torchvision` failing with 'torchvision::nms does not exist'.",
    )
    parser.add_argument("--remove", action="store_true", help="remove the repair files")
    parser.add_argument(
        "--site-packages",
        type=Path,
        default=Path(sysconfig.get_paths()["purelib"]),
        help="where to write/remove the files (default: this interpreter's site-packages)",
    )
    args = parser.parse_args(argv)
    if args.remove:
        found = remove(args.site_packages)
        print(f"torchvision repair {'removed from' if found else 'not present in'} {args.site_packages}")
        return 0
    try:
        install_if_broken(args.site_packages)
    except (RuntimeError, OSError) as exc:
        print(f"torchvision repair: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
