"""Shared test setup.

8 simulated CPU devices for mesh/sharding tests (must be set before JAX is imported), and the
repository root whose ``data/`` holds the paper's data (see ``data/README.md``).
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def shared_dir() -> Path:
    """The repository root: ``shared_dir / "data"`` is the in-repository data directory."""
    assert (REPO / "data" / "gsm8k" / "train_1.jsonl").is_file(), f"{REPO / 'data'} is incomplete (see data/README.md)"
    return REPO
