"""benchmarks/pipeline_scale.py's pure helpers: the nvidia-smi samples, the busy shares, the config it runs and
its table (the benchmark itself runs whole pipelines: never in the test suite)."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline_scale.py"


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("pipeline_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pipeline_scale"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["pipeline_scale"]


def test_gpu_samples_are_parsed_per_gpu_and_bad_lines_skipped(scale):
    lines = ["0, 100\n", "1, 50\n", "0, 50\n", "1, [N/A]\n", "garbage\n", "1, 0\n", "0, 6"]
    samples = scale.parse_gpu_samples(lines)
    assert samples == {0: [100.0, 50.0, 6.0], 1: [50.0, 0.0]}
    assert scale.gpu_shares(samples) == {0: 0.52, 1: 0.25}
    assert scale.busy_share(samples) == 0.385
    assert scale.busy_share({}) is None


def test_cpu_share_and_completion(scale):
    assert scale.cpu_share(30.0, 20.0, 2) == 0.75
    assert scale.cpu_share(1.0, 0.0, 2) == 0.0
    assert scale.completed(0, "")
    assert scale.completed(1, "...\nsftkey pipeline: promotion refused: accuracy 0.01 < 0.05\n")
    assert not scale.completed(1, "sftkey pipeline: error: stage1_model failed")
    assert not scale.completed(124, "")


def test_a_train_config_is_wrapped_and_narrowed(scale):
    train = {"seeds": [0, 1, 2], "data": {"dataset": "gsm8k", "split": "train"},
             "arms": {"sft": {"format": "plain"}, "sft_tag": {"format": "tagged"}, "dft_tag": {"format": "tagged"}}}
    config = scale.pipeline_config(train, ["dft_tag", "sft"], [1])
    assert config == {"name": "pipeline_scale", "benchmark": {"dataset": "gsm8k", "split": "test"},
                      "training": {"seeds": [1], "data": {"dataset": "gsm8k", "split": "train"},
                                   "arms": {"dft_tag": {"format": "tagged"}, "sft": {"format": "plain"}}}}
    assert train["seeds"] == [0, 1, 2]  # the caller's dict is untouched
    pipeline = {"name": "smoke", "training": train}
    assert scale.pipeline_config(pipeline, None, None) == pipeline
    with pytest.raises(SystemExit, match="--arms: nope not in"):
        scale.pipeline_config(train, ["nope"], None)


def test_the_command_and_the_table(scale, tmp_path):
    command = scale.pipeline_command(tmp_path / "p.yaml", tmp_path / "w", 4, ["benchmark.limit=8"])
    assert command[1:] == ["-m", "sftkey.cli", "pipeline", "--config", str(tmp_path / "p.yaml"), "--work-dir",
                           str(tmp_path / "w"), "--set", "compute.concurrency=4", "--set", "benchmark.limit=8"]
    rows = [scale.Measurement(1, 100.0, 0.5, 0.1, {0: 0.5}, 0, True, "a"),
            scale.Measurement(2, 62.5, None, 0.2, {}, 1, True, "b"),
            scale.Measurement(4, 10.0, 0.9, 0.3, {0: 0.9}, 2, False, "c")]
    assert scale.table(rows).splitlines()[2:] == [
        "  1      100.0    1.00x    50%    10%  ok",
        "  2       62.5    1.60x      -    20%  ok",
        "  4       10.0        -    90%    30%  failed (exit 2)"]
