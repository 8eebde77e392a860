"""`benchmark: {backend: ...}` in a pipeline config: parsed into the benchmark section, a wrong name refused at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.config import load_pipeline_config
from sftkey.config_file import ConfigError

SMOKE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pipeline_smoke.yaml"


def test_the_benchmark_backend_is_read_and_checked(tmp_path):
    assert load_pipeline_config(SMOKE_CONFIG).benchmark.backend == "sftkey"  # the default
    text = SMOKE_CONFIG.read_text()
    assert "benchmark: {dataset: svamp," in text
    path = tmp_path / "pipeline.yaml"
    path.write_text(text.replace("benchmark: {dataset: svamp,", "benchmark: {dataset: svamp, backend: static,"))
    assert load_pipeline_config(path).benchmark.backend == "static"
    path.write_text(text.replace("benchmark: {dataset: svamp,", "benchmark: {dataset: svamp, backend: warp,"))
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith("benchmark:"))
    with pytest.raises(ConfigError, match=rf"^{path} line {line}: benchmark.backend: 'warp': use one of sftkey, "
                                          "static, continuous, vllm$"):
        load_pipeline_config(path)
