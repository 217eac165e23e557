"""The README's quickstart runs as printed, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def quickstart() -> str:
    """The first python block under the README's "## Quickstart" heading."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_quickstart_runs_offline(tmp_path: Path) -> None:
    """Both snippets (timm, transformers) train a step; the timm adapter is saved with channel deltas only."""
    code = quickstart()
    assert "timm.create_model" in code and "load_minilm" in code and len(code.splitlines()) <= 20
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    script = tmp_path / "quickstart.py"
    script.write_text(code + "\nprint('trainable', sum(p.numel() for p in vision.parameters() if p.requires_grad))\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trainable = int(re.search(r"^trainable (\d+)$", done.stdout, re.M).group(1))
    assert trainable <= 64 * 1024 / 4 + 1024 * 10 + 10  # the budget's flat vector + the 10-class head
    saved = load_file(tmp_path / "medyate-mobilenet" / "adapter_model.safetensors")
    assert any(".medyate_delta" in key for key in saved)
