"""Shared test setup: offline hub, one thread per process, the shared real-data samples."""

import os
from pathlib import Path

import pytest

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process: tests start several processes (torchrun ranks, train.py, eval.py) on a
# 2-core machine, and oversubscribed threads cost ~10x there. Set before torch is imported; inherited by children.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


def shared_data_path() -> Path:
    """../shared/data beside the repository, or $FEEDBACKALIGN_SHARED_DATA."""
    return Path(os.environ.get("FEEDBACKALIGN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real upstream-format samples; required in CI (CI=true), skipped with a reason elsewhere."""
    path = shared_data_path()
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared data not found at {path}: CI must run the real-data tests")
        pytest.skip(f"shared data not found at {path} (set FEEDBACKALIGN_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from feedbackalign.models import load_tokenizer

    return load_tokenizer("tiny")
