"""The run layout: where a checkpoint's run, its trainer log and another arm's finished stage are found."""

import time
from pathlib import Path

from sftkey.train import checkpoint as ckpt
from sftkey.train.layout import finished_stage, metrics_path, run_folder, run_root, stage_metrics
from sftkey.train.tracking import JsonlTracker


def commit_checkpoint(store: Path, arm: str, seed: int, name: str, stage_key: str) -> Path:
    folder = run_folder(store, arm, seed).checkpoints / name
    tmp = ckpt.begin(folder)
    (tmp / "config.json").write_text("{}")
    return ckpt.commit(tmp, folder, {"arm": arm, "seed": seed, "stage_key": stage_key})


def test_a_checkpoint_names_its_run_folder_and_log(tmp_path):
    checkpoint = tmp_path / "sft_tag" / "seed0" / "checkpoints" / "stage1-final"
    assert run_root(checkpoint) == tmp_path / "sft_tag" / "seed0" == run_folder(tmp_path, "sft_tag", 0).root
    assert metrics_path(checkpoint) == tmp_path / "sft_tag" / "seed0" / "metrics.jsonl"


def test_stage_metrics_are_the_rows_of_that_stage_only(tmp_path):
    checkpoint = commit_checkpoint(tmp_path, "sftkey_tag", 0, "stage2-final", "k2")
    assert stage_metrics(checkpoint, "stage1") == []  # no log yet
    log = JsonlTracker(metrics_path(checkpoint))
    log.log_params({"train.lr": 0.001})
    log.set_tags({"stage": "stage1"})
    log.log_metrics({"loss": 2.5}, step=1)
    log.set_tags({"stage": "stage2"})
    log.log_metrics({"loss": 1.5, "loss_answer": 0.5}, step=2)
    log.log_artifact(checkpoint)
    rows = stage_metrics(checkpoint, "stage2")
    assert time.time() - 60 < rows[0].pop("time") < time.time() + 0.001  # when it was logged (unix s, rounded to ms)
    assert rows == [{"type": "metrics", "step": 2, "stage": "stage2", "loss": 1.5, "loss_answer": 0.5}]
    assert [row["step"] for row in stage_metrics(checkpoint, "stage1")] == [1]
    assert stage_metrics(checkpoint, "stage3") == []


def test_finished_stage_is_found_in_any_arm_by_key_and_seed(tmp_path):
    shared = commit_checkpoint(tmp_path, "sft_tag", 0, "stage1-final", "key-a")
    commit_checkpoint(tmp_path, "sft_tag", 1, "stage1-final", "key-b")
    commit_checkpoint(tmp_path, "sftkey_tag", 0, "step-00000002", "key-c")  # periodic: not a finished stage
    assert finished_stage(tmp_path, 0, "key-a") == shared
    assert finished_stage(tmp_path, 1, "key-a") is None  # another seed
    assert finished_stage(tmp_path, 1, "key-b") == tmp_path / "sft_tag" / "seed1" / "checkpoints" / "stage1-final"
    assert finished_stage(tmp_path, 0, "key-c") is None
    assert finished_stage(tmp_path / "absent", 0, "key-a") is None


def test_a_half_written_final_checkpoint_is_not_a_finished_stage(tmp_path):
    folder = run_folder(tmp_path, "sft_tag", 0).checkpoints / "stage1-final"
    tmp = ckpt.begin(folder)
    ckpt.write_json(tmp / ckpt.META_FILE, {"stage_key": "key-a"})  # never renamed into place: a crash
    assert finished_stage(tmp_path, 0, "key-a") is None
