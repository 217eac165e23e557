"""Test-suite setup: offline Hugging Face, few threads, seeded torch, the shared assets folder."""

import os
from pathlib import Path

# Before anything imports huggingface_hub / datasets: without network every hub call retries ~45 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

# Small, fixed thread count: CI has 2 cores; MEDYATE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MEDYATE_TEST_THREADS", "2")))

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    """``<shared>/assets``, shared = $MEDYATE_SHARED_DIR or ``<repo>/../shared``; else skip."""
    env = os.environ.get("MEDYATE_SHARED_DIR")
    shared = Path(env) if env else REPO_ROOT.parent / "shared"
    assets = shared / "assets"
    if not assets.is_dir():
        source = "$MEDYATE_SHARED_DIR" if env else "<repo>/../shared (set MEDYATE_SHARED_DIR to override)"
        pytest.skip(f"shared assets not found: {assets} from {source}")
    return assets


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)
