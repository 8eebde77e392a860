"""Data parallel: two CPU processes (torchrun, gloo) reproduce the single-process run for the same global batch."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftkey.train.config import load_config
from sftkey.train.tracking import read_metrics
from sftkey.train.trainer import train_arm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun processes: ~20 s of start-up on 2 cores
def test_two_processes_reproduce_the_single_process_loss_curve(tiny_model_dir, arith, tmp_path):
    config_file = tmp_path / "dp.yaml"
    config_file.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "dp"), "seeds": [0],
        "data": {"dataset": "gsm8k", "path": str(arith), "max_length": 256},
        "train": {"batch_size": 4, "lr": 1.0e-3, "pack_length": 512, "save_every": 2},
        "arms": {"sftkey_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 3},
                                                              {"name": "stage2", "loss": "key", "steps": 2}]}},
    }))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "sftkey.cli", "train", "--config", str(config_file),
               "--set", "train.grad_accum=2"]  # 2 processes x 2 accumulation steps x 1 example = the same 4
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    single = load_config(config_file, [f"output_dir={tmp_path / 'single'}"])
    single_final = train_arm(single, "sftkey_tag", 0)

    dp_rows = read_metrics(tmp_path / "dp" / "sftkey_tag" / "seed0" / "metrics.jsonl")
    single_rows = read_metrics(tmp_path / "single" / "sftkey_tag" / "seed0" / "metrics.jsonl")
    assert [r["step"] for r in dp_rows] == [r["step"] for r in single_rows] == [1, 2, 3, 4, 5]
    for key in ("loss", "loss_thinking", "loss_answer", "loss_eos", "grad_norm", "tokens"):
        assert [r[key] for r in dp_rows] == pytest.approx([r[key] for r in single_rows], rel=1e-5), key
    dp_weights = load_file(str(tmp_path / "dp" / "sftkey_tag" / "seed0" / "checkpoints" / "stage2-final" / "model.safetensors"))
    single_weights = load_file(str(single_final / "model.safetensors"))
    # float rounding only (Adam's 1/sqrt(v) magnifies ~1e-9 gradient differences); 5 steps of lr 1e-3 move weights ~5e-3
    assert max((dp_weights[n] - single_weights[n]).abs().max().item() for n in single_weights) < 1e-4
    rng_files = sorted(p.name for p in (tmp_path / "dp" / "sftkey_tag" / "seed0" / "checkpoints" / "step-00000002").glob("rng_state_*"))
    assert rng_files == ["rng_state_0.pt", "rng_state_1.pt"]
    assert torch.load(tmp_path / "dp" / "sftkey_tag" / "seed0" / "checkpoints" / "step-00000002" / "optimizer.pt",
                      weights_only=True)["state"]
