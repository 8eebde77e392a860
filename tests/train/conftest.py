"""Training fixtures: a tiny model, 24 small arithmetic problems in GSM8K form, and a config builder."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

ARITH = Path(__file__).resolve().parent / "fixtures" / "arith.jsonl"  # 24 records, 91-218 tiny-tokenizer tokens each

# A config small enough that a stage of a few steps takes well under a second on the tiny model. fp32, not auto:
# auto picks bf16 on CPUs where it is faster (sftkey.precision), and these tests must compute the same on every CPU.
BASE = {
    "seeds": [0],
    "data": {"dataset": "gsm8k", "path": str(ARITH), "max_length": 256},
    "train": {"batch_size": 4, "lr": 1.0e-3, "warmup_epochs": 0.5, "pack_length": 512, "precision": "fp32"},
    "arms": {
        "sft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 3}]},
        "sftkey_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 3},
                                                     {"name": "stage2", "loss": "key", "steps": 3}]},
    },
}


def merge(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "arms":
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="session")
def arith() -> Path:
    return ARITH


@pytest.fixture(scope="session")
def config_at(tiny_model_dir):
    """TrainConfig from BASE with changes (nested dicts merge; `arms` replaces), writing under `output_dir`; for
    fixtures wider than one test (a reference run trained once per module)."""
    from sftkey.train.config import config_from_dict

    def build(changes: dict | None, output_dir: Path):
        raw = merge(BASE, changes or {})
        raw.setdefault("model", str(tiny_model_dir))
        raw.setdefault("output_dir", str(output_dir))
        return config_from_dict(raw)

    return build


@pytest.fixture
def make_config(config_at, tmp_path):
    """TrainConfig from BASE with changes (nested dicts merge; `arms` replaces), writing under tmp_path."""

    def build(changes: dict | None = None, output_dir: Path | None = None):
        return config_at(changes, output_dir or tmp_path / "runs")

    return build
