"""Cells run at once as the device pool allows, inside ONE Dagster run of `sftkey_pipeline`: two independent cells
with a pool of 2 train at the same time; with a pool of 1 no two pool steps ever overlap (the multiprocess executor
would start them together: the pool is what holds one back)."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pytest

from tests.orchestration.conftest import seed_mlflow_store, smoke_raw

POOL_STEPS = ("stage1_model", "stage2_model", "benchmark_scores")


def parallel_raw(tiny_model_dir: Path, work: Path, concurrency: int) -> dict:
    """The smoke config with two cells that share nothing (SFTKey-Tag's stage 1 differs from SFT-Tag's, so neither
    waits on the other's checkpoint lock), a short benchmark and no lm-eval, `concurrency` cells at once."""
    raw = smoke_raw(tiny_model_dir, work, compute={"device": "cpu", "concurrency": concurrency},
                    benchmark={"dataset": "svamp", "split": "test", "limit": 8, "max_new_tokens": 16, "batch_size": 8})
    raw["training"]["arms"]["sftkey_tag"]["stages"][0]["steps"] = 40
    return raw


def step_intervals(instance, run_id: str) -> dict[str, tuple[float, float]]:
    """(start, end) wall times of each pool step of the run, from Dagster's own event log."""
    starts, ends = {}, {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or not any(event.step_key and event.step_key.endswith(s) for s in POOL_STEPS):
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            starts[event.step_key] = record.timestamp
        elif event.event_type == dg.DagsterEventType.STEP_SUCCESS:
            ends[event.step_key] = record.timestamp
    assert set(starts) == set(ends) and len(starts) == 6, sorted(starts)
    return {key: (starts[key], ends[key]) for key in starts}


def overlapping_pairs(intervals: dict[str, tuple[float, float]]) -> list[tuple[str, str]]:
    keys = sorted(intervals)
    return [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]
            if min(intervals[a][1], intervals[b][1]) > max(intervals[a][0], intervals[b][0])]


def run_with_pool(tiny_model_dir, tmp_path, mlflow_template, concurrency: int):
    from orchestration.config import pipeline_config_from_dict
    from orchestration.pipeline import PIPELINE_RUN_TAG, run_pipeline

    work = tmp_path / "work"
    seed_mlflow_store(mlflow_template, work / "mlflow" / "mlflow.db")
    (work / "dagster").mkdir(parents=True)
    instance = dg.DagsterInstance.local_temp(str(work / "dagster"))
    config = pipeline_config_from_dict(parallel_raw(tiny_model_dir, work, concurrency))
    result = run_pipeline(config, echo=lambda line: None, instance=instance)
    runs = instance.get_runs(dg.RunsFilter(tags={PIPELINE_RUN_TAG: result.pipeline_run}))
    assert [(run.job_name, run.status.value) for run in runs] == [("sftkey_pipeline", "SUCCESS")]
    return step_intervals(instance, runs[0].run_id)


@pytest.mark.slow
def test_a_pool_of_two_trains_two_cells_at_once(tiny_model_dir, tmp_path, mlflow_template, shared_data):
    intervals = run_with_pool(tiny_model_dir, tmp_path, mlflow_template, concurrency=2)
    stage1 = [key for key in intervals if key.endswith("stage1_model")]
    assert len(stage1) == 2 and tuple(sorted(stage1)) in overlapping_pairs(intervals)


@pytest.mark.slow
def test_a_pool_of_one_never_overlaps_two_pool_steps(tiny_model_dir, tmp_path, mlflow_template, shared_data):
    intervals = run_with_pool(tiny_model_dir, tmp_path, mlflow_template, concurrency=1)
    assert overlapping_pairs(intervals) == []


def test_the_pool_limit_follows_the_config_and_the_devices():
    from orchestration.devices import pool_limit, pool_name

    assert pool_name("cuda") == "sftkey_cuda"
    assert pool_limit("cpu", 1, None) == 1  # one CPU "device": cells take turns unless asked
    assert pool_limit("cpu", 1, 2) == 2
    assert pool_limit("cuda", 1, 3) == 3  # an explicit setting wins


@pytest.mark.parametrize("cores,memory_gb,independent,cap,limit", [
    (2, 24, 2, None, 2),  # this project's VM, two cells that start on their own: one 1-thread process per core
    (2, 24, 1, None, 1),  # the demo: SFTKey-Tag waits for SFT-Tag's stage 1, so it stays in process
    (2, 24, 2, "1", 1),  # $SFTKEY_CPU_PROCESSES caps it (the test suite sets 1)
    (16, 128, 15, None, 15), (16, 128, 21, None, 16),  # never more processes than cores
    (8, 8, 4, None, 1), (8, 16, 4, None, 2),  # nor more 135M-model cells than memory holds (6 GB each)
    (1, 64, 4, None, 1),
])
def test_on_cpu_the_default_pool_runs_one_process_per_core(monkeypatch, cores, memory_gb, independent, cap, limit):
    import sftkey.train.parallel_runs as parallel_runs
    from orchestration.devices import pool_limit

    monkeypatch.setattr(parallel_runs, "cpu_cores", lambda: cores)
    monkeypatch.setattr(parallel_runs, "memory_gb", lambda: memory_gb)
    monkeypatch.delenv(parallel_runs.PROCESSES_ENV, raising=False)
    if cap is not None:
        monkeypatch.setenv(parallel_runs.PROCESSES_ENV, cap)
    assert pool_limit("cpu", 1, None, independent) == limit
    assert pool_limit("cpu", 1, 3, independent) == 3  # compute.concurrency wins


def test_a_cell_that_shares_its_first_stage_runs_it_after_the_owner(tiny_model_dir, tmp_path):
    """SFTKey-Tag's stage 1 is SFT-Tag's (same stage view), per seed: it depends on SFT-Tag's stage-1 asset of its
    seed, so Dagster starts it after that one (holding no pool slot while it waits) and it reuses the checkpoint."""
    from orchestration.config import pipeline_config_from_dict
    from orchestration.definitions import build_definitions, first_stage_owners

    raw = smoke_raw(tiny_model_dir, tmp_path / "work")
    raw["training"]["seeds"] = [0, 1]
    raw["training"]["arms"]["key_tag"] = {"format": "tagged", "stages": [{"name": "stage1", "loss": "key", "steps": 5}]}
    config = pipeline_config_from_dict(raw)
    assert first_stage_owners(config) == {("sftkey_tag", 0): ("sft_tag", 0), ("sftkey_tag", 1): ("sft_tag", 1)}
    graph = build_definitions(config).resolve_asset_graph()

    def upstream(arm, seed):
        return {"/".join(k.path) for k in graph.get(dg.AssetKey([arm, f"seed{seed}", "stage1_model"])).parent_keys}

    assert upstream("sftkey_tag", 1) == {"tokenized_dataset", "sft_tag/seed1/stage1_model"}
    assert upstream("sft_tag", 1) == upstream("key_tag", 0) == {"tokenized_dataset"}


def test_a_device_lease_never_hands_one_gpu_to_two_steps(tmp_path, monkeypatch):
    """Two leases of 1 on a 2-GPU host get different devices; a third waits and times out; a 2-device lease takes
    both or none (no half-held pair that could wait on another forever)."""
    import orchestration.devices as devices

    monkeypatch.setattr(devices, "device_count", lambda kind: 2)
    with devices.lease(tmp_path, "cuda", 1) as first, devices.lease(tmp_path, "cuda", 1) as second:
        assert sorted(first + second) == [0, 1]
        with pytest.raises(TimeoutError, match="no 1 free cuda devices"):
            with devices.lease(tmp_path, "cuda", 1, timeout_s=0.2):
                pass
    with devices.lease(tmp_path, "cuda", 1) as one:
        with pytest.raises(TimeoutError, match="no 2 free cuda devices"):
            with devices.lease(tmp_path, "cuda", 2, timeout_s=0.2):
                pass
        assert one == [0]
    with devices.lease(tmp_path, "cuda", 2) as both:  # the failed attempt released what it had taken
        assert both == [0, 1]
        assert devices.visible_devices(both) == {"CUDA_VISIBLE_DEVICES": "0,1"}
    with pytest.raises(RuntimeError, match="needs 3 cuda devices and this host has 2"):
        with devices.lease(tmp_path, "cuda", 3):
            pass
    with devices.lease(tmp_path, "cpu", 1) as none:
        assert none == []


def test_the_cores_share_of_cells_side_by_side_is_set_for_the_run_only(monkeypatch):
    from orchestration.pipeline import scoped_environ
    from sftkey.cpu_threads import THREADS_ENV, cpu_threads

    monkeypatch.setenv("SFTKEY_TEST_KEPT", "before")
    monkeypatch.delenv(THREADS_ENV, raising=False)
    with pytest.raises(RuntimeError, match="a step failed"):
        with scoped_environ({THREADS_ENV: "1", "SFTKEY_TEST_KEPT": "during"}):
            assert cpu_threads() == 1  # each step's work threads: its share of the cores
            raise RuntimeError("a step failed")
    assert THREADS_ENV not in os.environ and os.environ["SFTKEY_TEST_KEPT"] == "before"
