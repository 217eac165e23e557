#!/usr/bin/env bash
# Create/update the development environment. Idempotent; safe to re-run.
#
#   bash scripts/setup_env.sh [VENV_DIR]        (default: .venv, relative to the repo root)
#
# Environment:
#   PYTHON               interpreter used to create a missing venv (default: python3, needs >= 3.10)
#   MEDYATE_TORCH_SPEC   pip spec for torch, used ONLY when the venv has no importable torch
#                        (default: torch==2.13.0; e.g. "torch==2.13.0 --index-url <your CUDA index>")
#
# Steps: venv -> torch (only if missing) -> pip install -e ".[dev,bench]" -> torchvision repair check.
# pip output goes to VENV_DIR/setup_env.log and is shown only when a step fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${1:-.venv}"
PY_BOOT="${PYTHON:-python3}"
TORCH_SPEC="${MEDYATE_TORCH_SPEC:-torch==2.13.0}"
CONSTRAINTS=".ci/constraints.txt"

say() { echo "setup_env: $*"; }
die() { echo "setup_env: ERROR: $*" >&2; exit 1; }

LOG=""
# run_logged "what" cmd...: run quietly; on failure show the log tail and stop.
run_logged() {
    local what="$1"; shift
    if ! "$@" >>"$LOG" 2>&1; then
        echo "setup_env: ERROR: $what failed; last lines of $LOG:" >&2
        tail -n 40 "$LOG" >&2
        exit 1
    fi
}

# 1. venv
PY="$VENV/bin/python"
if [[ ! -x "$PY" ]]; then
    command -v "$PY_BOOT" >/dev/null || die "'$PY_BOOT' not found; set PYTHON=/path/to/python3.10+"
    "$PY_BOOT" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$PY_BOOT is $("$PY_BOOT" -V 2>&1); medyate-peft needs Python >= 3.10 (set PYTHON=...)"
    say "creating venv $VENV with $("$PY_BOOT" -V 2>&1)"
    "$PY_BOOT" -m venv "$VENV" || die "could not create venv $VENV (is the python3-venv package installed?)"
fi
LOG="$VENV/setup_env.log"
: >"$LOG"

# 2. torch: install only if none is importable, so a user's own (e.g. CUDA) torch is kept.
if ! "$PY" -c 'import torch' >>"$LOG" 2>&1; then
    if "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
        tail -n 5 "$LOG" >&2
        die "torch is installed in $VENV but does not import (see above); repair or uninstall it, then re-run"
    fi
    say "installing $TORCH_SPEC"
    # shellcheck disable=SC2086  # MEDYATE_TORCH_SPEC may carry pip options, split on purpose
    run_logged "pip install $TORCH_SPEC" "$PY" -m pip install -q $TORCH_SPEC
fi
TORCH_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')"

# 3. the project. .ci/constraints.txt pins torch and the torchvision built against it for the CI
# machine. Apply it only when the venv's torch has the pinned version (local tags like +cpu/+cu126
# ignored, as pip does): otherwise it would make pip replace the user's torch, which step 2 promises
# not to do. In that case pin torch to exactly what is installed instead and let pip choose the
# torchvision release that matches it (torchvision wheels declare their exact torch).
PINNED_TORCH="$(sed -n 's/^torch==\([^[:space:]#;]*\).*/\1/p' "$CONSTRAINTS" | head -n 1)"
if [[ -n "$PINNED_TORCH" && "${TORCH_VERSION%%+*}" == "${PINNED_TORCH%%+*}" ]]; then
    CONSTRAINT_FILE="$CONSTRAINTS"
else
    CONSTRAINT_FILE="$VENV/torch-constraint.txt"
    echo "torch==$TORCH_VERSION" >"$CONSTRAINT_FILE"
    say "keeping installed torch $TORCH_VERSION (not the $CONSTRAINTS pin torch==$PINNED_TORCH)"
fi
say "installing medyate-peft[dev,bench] (editable) with torch $TORCH_VERSION"
run_logged "pip install -e .[dev,bench]" "$PY" -m pip install -q -c "$CONSTRAINT_FILE" -e ".[dev,bench]"

# 4. torchvision repair (writes files only where `import torchvision` has the known nms breakage).
# Run by path, not with -m: -m would import medyate_peft/__init__.py, which may import peft and so
# torchvision, i.e. crash on exactly the breakage this step repairs.
"$PY" medyate_peft/_torchvision_fix.py || die "torchvision check failed (see above)"

say "ready: $("$PY" -c 'import importlib.metadata as m, sys; print(f"Python {sys.version.split()[0]}, " + ", ".join(f"{d} {m.version(d)}" for d in ("torch", "torchvision", "timm", "peft", "transformers")))')"
say "activate with: source $VENV/bin/activate"
