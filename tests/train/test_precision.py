"""`precision: auto`: the per-machine probe, its cache, the choice it makes, and what bf16 autocast changes.

Loss parity: the same stage trained in fp32 and under bf16 autocast gives per-step losses within 2% of each other
(bf16 keeps 8 bits of mantissa, so ~0.4% per rounding; the tiny model's losses near 6 differ by a few hundredths).
Master weights and optimizer state stay fp32 either way. Evaluation always loads fp32 unless asked otherwise.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from sftkey.precision import BF16_MIN_SPEEDUP, CpuPrecisionProbe, cpu_probe, measure_cpu, probe_path, resolve_precision
from sftkey.train.checkpoint import read_meta
from sftkey.train.tracking import read_metrics

from test_train_crash import start_train, write_config

SLOW_BF16 = CpuPrecisionProbe(46.4, 1.3, "AMD EPYC", ("avx2",), 1, "2.13.0")  # this project's VM: emulated bf16
FAST_BF16 = CpuPrecisionProbe(80.0, 560.0, "Intel Xeon", ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"), 1,
                              "2.13.0")


def test_explicit_precision_is_taken_as_written_on_any_device():
    assert resolve_precision("fp32", cuda=True, cuda_bf16=True, probe=FAST_BF16) == ("fp32", "train.precision fp32")
    assert resolve_precision("bf16", cuda=False, probe=SLOW_BF16) == ("bf16", "train.precision bf16")


def test_auto_on_a_gpu_follows_its_bf16_support():
    assert resolve_precision("auto", cuda=True, cuda_bf16=True) == ("bf16", "auto: the GPU supports bf16")
    assert resolve_precision("auto", cuda=True, cuda_bf16=False) == ("fp32", "auto: the GPU has no bf16")


def test_auto_on_a_cpu_picks_bf16_only_where_the_probe_measured_it_faster():
    assert resolve_precision("auto", cuda=False, probe=FAST_BF16) == (
        "bf16", "auto: bf16 autocast is faster here (CPU Intel Xeon, avx512_bf16/amx_bf16/amx_tile: bf16 matmul "
                "560.0 GFLOP/s vs fp32 80.0 (7.00x) on 1 thread(s))")
    assert resolve_precision("auto", cuda=False, probe=SLOW_BF16) == (
        "fp32", f"auto: bf16 autocast is not {BF16_MIN_SPEEDUP}x faster here (CPU AMD EPYC, no native bf16 (flags: "
                "avx2): bf16 matmul 1.3 GFLOP/s vs fp32 46.4 (0.03x) on 1 thread(s))")
    just_below = dataclasses.replace(FAST_BF16, bf16_gflops=80.0 * BF16_MIN_SPEEDUP - 0.01)
    assert resolve_precision("auto", cuda=False, probe=just_below)[0] == "fp32"


def test_the_probe_is_measured_once_per_machine_and_then_read_back(tmp_path):
    first = cpu_probe(tmp_path)
    path = probe_path(tmp_path)
    assert json.loads(path.read_text()) == dataclasses.asdict(first) | {"flags": list(first.flags)}
    assert first.fp32_gflops > 0 and first.bf16_gflops > 0 and first.threads == torch.get_num_threads()
    doctored = dataclasses.replace(first, fp32_gflops=1.0, bf16_gflops=9.0)  # what a cached file says wins
    path.write_text(json.dumps(dataclasses.asdict(doctored)))
    assert cpu_probe(tmp_path) == doctored


@pytest.mark.parametrize("content", ['{"fp32_gflops": 46.4, "bf16', "", '{"fp32_gflops": 0, "bf16_gflops": 1.0}'],
                         ids=["cut", "empty", "zero-rate"])
def test_a_damaged_probe_file_is_measured_again_and_replaced(tmp_path, content):
    path = probe_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    probe = cpu_probe(tmp_path)
    assert probe.fp32_gflops > 0 and probe.bf16_gflops > 0
    assert json.loads(path.read_text())["fp32_gflops"] == probe.fp32_gflops


def test_measure_names_this_cpu():
    probe = measure_cpu(repeats=1)
    assert probe.cpu and probe.torch == torch.__version__ and set(probe.flags) <= {
        "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.mark.slow  # two real `sftkey train` processes: ~20-60 s of imports
def test_bf16_autocast_keeps_fp32_losses_within_two_percent_and_fp32_master_weights(tiny_model_dir, tmp_path):
    # one process per precision: accelerate fixes a process's mixed precision at its first Accelerator
    arms = {"sft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 6}]}}
    procs = {}
    for precision in ("fp32", "bf16"):
        config = write_config(tmp_path, tiny_model_dir, tmp_path / precision, arms, {"precision": precision})
        procs[precision] = start_train(config)
    losses, finals = {}, {}
    for precision, proc in procs.items():
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        run = tmp_path / precision / "sft_tag" / "seed0"
        losses[precision] = [row["loss"] for row in read_metrics(run / "metrics.jsonl")]
        finals[precision] = run / "checkpoints" / "stage1-final"
        assert f"precision {precision} (train.precision {precision})" in err
    assert len(losses["fp32"]) == len(losses["bf16"]) == 6
    assert losses["fp32"] != losses["bf16"]  # autocast really ran in bf16
    assert [abs(b - f) / f for f, b in zip(losses["fp32"], losses["bf16"])] == pytest.approx([0.0] * 6, abs=0.02)
    assert [read_meta(finals[p])["precision"] for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    assert {t.dtype for t in load_file(str(finals["bf16"] / "model.safetensors")).values()} == {torch.float32}
