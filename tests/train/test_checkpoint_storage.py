"""Storage of checkpoints: `train.keep_final_only` leaves one folder per finished stage (a killed run still resumes),
every checkpoint records the precision it trained in, and the trainer hands trackers checkpoint paths, never files."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftkey.config_file import ConfigError
from sftkey.train.config import stage_key
from sftkey.train.trainer import train_arm

TWO_STAGES = {"sftkey_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 3},
                                                            {"name": "stage2", "loss": "key", "steps": 3}]}}


def changes(keep_final_only: bool, keep_last: int = 1) -> dict:
    return {"arms": TWO_STAGES, "train": {"save_every": 1, "keep_last": keep_last, "keep_final_only": keep_final_only}}


def folders(output_dir: Path) -> list[str]:
    return sorted(p.name for p in (output_dir / "sftkey_tag" / "seed0" / "checkpoints").iterdir())


class Recorder:
    """A tracker that keeps what it is told; raises at `crash_step` (a kill after that step's update)."""

    def __init__(self, crash_step: int | None = None):
        self.crash_step, self.params, self.artifacts = crash_step, {}, []

    def log_params(self, params):
        self.params |= params

    def set_tags(self, tags):
        pass

    def log_artifact(self, path):
        self.artifacts.append(path)

    def log_metrics(self, metrics, step):
        if step == self.crash_step:
            raise KeyboardInterrupt(f"simulated kill at step {step}")


@pytest.fixture(scope="module")
def final_only(config_at, tmp_path_factory):
    """An uninterrupted two-stage run with keep_final_only, checkpointing every step (trained once per module)."""
    out = tmp_path_factory.mktemp("final_only")
    tracker = Recorder()
    final = train_arm(config_at(changes(True), out), "sftkey_tag", 0, tracker=tracker)
    return out, final, tracker


def test_keep_final_only_leaves_only_each_stages_final_checkpoint(final_only):
    out, final, _tracker = final_only
    assert folders(out) == ["stage1-final", "stage2-final"]
    assert final == out / "sftkey_tag" / "seed0" / "checkpoints" / "stage2-final"


def test_without_it_keep_last_periodic_checkpoints_stay(make_config, tmp_path):
    train_arm(make_config(changes(False, keep_last=2)), "sftkey_tag", 0)
    # periodic at global steps 1, 2 (stage 1) and 4, 5 (stage 2); the newest two stay
    assert folders(tmp_path / "runs") == ["stage1-final", "stage2-final", "step-00000004", "step-00000005"]


def test_a_run_killed_mid_stage_resumes_to_the_same_weights_with_keep_final_only(make_config, tmp_path, final_only):
    config = make_config(changes(True))
    with pytest.raises(KeyboardInterrupt):
        train_arm(config, "sftkey_tag", 0, tracker=Recorder(crash_step=5))  # stage 2's second step
    # stage 1 finished: only its final checkpoint; stage 2 runs: its periodic one is there to resume from
    assert folders(tmp_path / "runs") == ["stage1-final", "step-00000004"]
    resumed = train_arm(config, "sftkey_tag", 0, resume=True)
    assert folders(tmp_path / "runs") == ["stage1-final", "stage2-final"]
    expected, got = load_file(str(final_only[1] / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_checkpoints_record_their_precision_and_trackers_get_paths_not_folders(final_only):
    out, final, tracker = final_only
    stage1 = out / "sftkey_tag" / "seed0" / "checkpoints" / "stage1-final"
    assert [json.loads((f / "sftkey.json").read_text())["precision"] for f in (stage1, final)] == ["fp32", "fp32"]
    assert tracker.artifacts == []  # an uploading tracker (MLflow) would copy each stage's weights
    assert (tracker.params["stage1.checkpoint"], tracker.params["stage2.checkpoint"]) == (str(stage1), str(final))


def test_keep_final_only_is_bookkeeping_and_must_be_a_boolean(make_config, tmp_path):
    on, off = make_config(changes(True)), make_config(changes(False))
    # bookkeeping: not in the stage key, so a resume may flip it
    assert stage_key(on, "sftkey_tag", 0, 1, "v", "w") == stage_key(off, "sftkey_tag", 0, 1, "v", "w")
    with pytest.raises(ConfigError, match="keep_final_only"):
        make_config({"train": {"keep_final_only": "sometimes"}})
