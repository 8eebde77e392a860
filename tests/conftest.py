"""Shared fixtures: the tiny tokenizer/model (built offline in seconds) and the real data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 5x faster for small models on this 2-core machine
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from sftkey.tiny import train_tiny_tokenizer

    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sftkey.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the project's ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The default model's tokenizer, when its converted folder is already cached (never converts in a test)."""
    from sftkey.models import default_model_dir, is_provisioned

    folder = default_model_dir()
    if not is_provisioned(folder):
        pytest.skip(f"default model not cached at {folder}; run `sftkey prepare --model default ...` once")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
