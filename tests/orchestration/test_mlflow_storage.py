"""What reaches MLflow's artifact store: only the registry candidate's final model, in the dtype it is scored in;
never a checkpoint that only feeds the next stage, nor optimizer, scheduler or RNG state."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from orchestration.config import default_tracking_uri
from orchestration.tracking import WEIGHTS_DTYPE_TAG, export_weights

REPO = Path(__file__).resolve().parents[2]
ARITH = REPO / "tests" / "train" / "fixtures" / "arith.jsonl"
RESUME_STATE = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "sftkey.json")


def stored_dtypes(file: Path) -> set[str]:
    with safe_open(str(file), "pt") as stored:
        return {str(stored.get_tensor(k).dtype) for k in stored.keys()}


def run_artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    """Every file under a run's artifacts, through the tracking API (what a server would hand out)."""
    files = []
    for item in client.list_artifacts(run_id, path):
        files += run_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return files


def test_the_pipeline_uploads_only_the_candidates_final_model(smoke_run):
    from mlflow import MlflowClient

    config = smoke_run.config
    client = MlflowClient(default_tracking_uri(config))
    experiment = client.get_experiment_by_name(config.sections.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert len(runs) > 5  # the parent and the assets' runs
    uploaded = [f for run in runs for f in run_artifacts(client, run.info.run_id)]
    assert not [f for f in uploaded if f.endswith(".safetensors") or os.path.basename(f) in RESUME_STATE
                or os.path.basename(f).startswith("rng_state_")]
    logged = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert [m.name for m in logged] == [f"{config.candidate_arm}-seed{config.candidate_seed}"]

    assert logged[0].tags[WEIGHTS_DTYPE_TAG] == "float32"  # benchmark.dtype's default: served as scored
    # every byte of the artifact store on disk: the one set of weights is the logged model's, in fp32 (as scored)
    root = Path(experiment.artifact_location.removeprefix("file://"))
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    weights = [f for f in on_disk if f.endswith(".safetensors")]
    assert weights == [f"models/{logged[0].model_id}/artifacts/artifacts/weights/model.safetensors"]
    assert not [f for f in on_disk if os.path.basename(f) in RESUME_STATE or "rng_state_" in f or "/step-" in f]
    assert stored_dtypes(root / weights[0]) == {"torch.float32"}


@pytest.mark.slow  # ~20 s: a process of its own (accelerate's precision is fixed once per process)
def test_a_bf16_trained_checkpoint_is_served_in_the_dtype_it_is_scored_in(tiny_model_dir, tmp_path):
    """Trained under bf16 autocast on CPU (fp32 master weights): exported as the fp32 masters by default (what the
    benchmark scores), as bf16 when the benchmark scores in bf16. test_tracking's logged-model test covers the bf16
    export fast, on a checkpoint whose sftkey.json says bf16."""
    config = tmp_path / "bf16.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "runs"), "seeds": [0],
        "data": {"dataset": "gsm8k", "path": str(ARITH), "max_length": 256},
        "train": {"batch_size": 4, "lr": 1.0e-3, "pack_length": 512, "precision": "bf16"},
        "arms": {"sft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 1}]}}}))
    subprocess.run([sys.executable, "-m", "sftkey.cli", "train", "--config", str(config)], cwd=REPO, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}, capture_output=True)
    checkpoint = tmp_path / "runs" / "sft_tag" / "seed0" / "checkpoints" / "stage1-final"
    assert json.loads((checkpoint / "sftkey.json").read_text())["precision"] == "bf16"
    assert stored_dtypes(checkpoint / "model.safetensors") == {"torch.float32"}  # fp32 master weights
    served = export_weights(checkpoint, tmp_path / "served")
    assert stored_dtypes(served / "model.safetensors") == {"torch.float32"}
    halved = export_weights(checkpoint, tmp_path / "halved", "bfloat16")
    assert stored_dtypes(halved / "model.safetensors") == {"torch.bfloat16"}
    assert not [p.name for p in served.iterdir() if p.name in RESUME_STATE or p.name.startswith("rng_state_")]


def test_a_model_stored_in_bf16_is_exported_in_the_dtype_asked_for(tiny_model_dir, tmp_path):
    """The export follows the dtype the benchmark scores in, not the dtype on disk (the benchmark loads the model in
    its own dtype too), with the same values: bf16 -> fp32 is exact."""
    from safetensors.torch import load_file

    from sftkey.models import load_model

    stored_bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_model_dir, stored_bf16)  # the tokenizer with it
    load_model(tiny_model_dir, dtype="bfloat16").save_pretrained(stored_bf16)
    assert stored_dtypes(stored_bf16 / "model.safetensors") == {"torch.bfloat16"}
    served = export_weights(stored_bf16, tmp_path / "served")
    assert stored_dtypes(served / "model.safetensors") == {"torch.float32"}
    before, after = load_file(stored_bf16 / "model.safetensors"), load_file(served / "model.safetensors")
    assert before.keys() == after.keys() and all(after[k].equal(before[k].float()) for k in before)
