"""`benchmark: {backend: ..., dtype: ...}` in a pipeline config: parsed into the benchmark section, a wrong value refused at load."""

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


def test_the_benchmark_dtype_is_read_and_checked(tmp_path):
    """benchmark.dtype: the dtype models are scored and logged in (float32 unless asked); fp16 and typos refused."""
    assert load_pipeline_config(SMOKE_CONFIG).benchmark.dtype == "float32"
    text = SMOKE_CONFIG.read_text()
    path = tmp_path / "pipeline.yaml"
    path.write_text(text.replace("benchmark: {dataset: svamp,", "benchmark: {dataset: svamp, dtype: bfloat16,"))
    assert load_pipeline_config(path).benchmark.dtype == "bfloat16"
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith("benchmark:"))
    for bad in ("float16", "bf16"):
        path.write_text(text.replace("benchmark: {dataset: svamp,", f"benchmark: {{dataset: svamp, dtype: {bad},"))
        with pytest.raises(ConfigError, match=rf"^{path} line {line}: benchmark.dtype: '{bad}': use float32 or "
                                              "bfloat16$"):
            load_pipeline_config(path)
