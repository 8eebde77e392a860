"""The Dagster definitions: the asset graph of a config, its checks, resources and jobs.

The graph depends on the config: every arm x seed is a cell of three assets (sft_tag/seed0/stage1_model ->
stage2_model -> benchmark_scores) between the shared data assets and the report. `sftkey pipeline` launches ONE run of
the job `sftkey_pipeline`; its cells are independent steps, run as many at once as the device pool allows
(orchestration/devices.py). `sftkey ui` (dagster dev) loads `defs` for the YAML named by $SFTKEY_PIPELINE_CONFIG
(default configs/pipeline_demo.yaml); the `settings` resource carries every section, so a run launched from the UI
needs no run config and does what `sftkey pipeline` does with that file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg

from orchestration.assets import (
    annotated_dataset,
    arm_comparison_asset,
    cell_assets,
    cell_key,
    champion_model,
    raw_dataset,
    registered_model,
    tokenized_dataset,
)
from orchestration.checks import pipeline_checks
from orchestration.devices import device_kind, pool_name
from orchestration.telemetry import progress_console

CONFIG_ENV = "SFTKEY_PIPELINE_CONFIG"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipeline_demo.yaml"
PIPELINE_JOB = "sftkey_pipeline"

DATA_ASSETS = [raw_dataset, annotated_dataset, tokenized_dataset]


def pipeline_graph(config) -> tuple[list, list]:
    """(assets, checks) of a config: the data assets, one cell per arm x seed, the report."""
    pool = pool_name(device_kind(config.sections.compute.device))
    owners = first_stage_owners(config)
    cells = [asset for arm in config.arms for seed in config.seeds
             for asset in cell_assets(arm, seed, pool, after=_stage1_of(owners.get((arm, seed))))]
    scores = [cell_key(arm, seed, "benchmark_scores") for arm in config.arms for seed in config.seeds]
    report = [arm_comparison_asset(scores), registered_model, champion_model]
    return DATA_ASSETS + cells + report, pipeline_checks(config.arms, config.seeds)


def first_stage_owners(config) -> dict[tuple[str, int], tuple[str, int]]:
    """(arm, seed) -> the earlier cell whose first stage trains the same weights (SFTKey-Tag's and compute-matched
    SFT-Tag's stage 1 are SFT-Tag's): that cell's stage 1 runs after the owner's and reuses its checkpoint, instead of
    training the same stage beside it."""
    from sftkey.train.parallel_runs import first_stage_owners as owners

    return owners(config.training, config.arms, config.seeds)


def _stage1_of(cell: tuple[str, int] | None) -> dg.AssetKey | None:
    return None if cell is None else cell_key(cell[0], cell[1], "stage1_model")


def build_definitions(config, resources: dict | None = None) -> dg.Definitions:
    """The graph, its jobs and resources (default: the config's own; `sftkey pipeline` passes its run's). The
    executor is chosen per run: multiprocess (the default, what UI launches get; the pool bounds the cells) or
    in-process (`sftkey pipeline` with one cell at a time: no process start per step)."""
    from orchestration.config import resources as config_resources

    assets, checks = pipeline_graph(config)
    jobs = [
        dg.define_asset_job(PIPELINE_JOB, selection=dg.AssetSelection.all(),
                            description="data -> every arm x seed cell (in parallel, bounded by the device pool) -> "
                                        "comparison -> registry"),
        dg.define_asset_job("prepare_data_job", selection=dg.AssetSelection.assets(*DATA_ASSETS)),
    ]
    return dg.Definitions(assets=assets, asset_checks=checks, jobs=jobs,
                          resources=resources if resources is not None else config_resources(config),
                          executor=dg.multi_or_in_process_executor,
                          loggers={"console": progress_console})  # Dagster's events plus each stage's progress


def run_spec(config, pipeline_run: str, parent_run_id: str, tracking_uri: str) -> str:
    """What `pipeline_job` rebuilds one pipeline run's job from, in this process and in every step process."""
    return json.dumps({"raw": config.raw, "path": str(config.path or ""), "pipeline_run": pipeline_run,
                       "parent_run_id": parent_run_id, "tracking_uri": tracking_uri}, sort_keys=True)


def pipeline_job(spec: str) -> dg.JobDefinition:
    """The `sftkey_pipeline` job of one pipeline run (the target of dg.build_reconstructable_job: the spec is its
    argument, so each pipeline run, even a second one in the same process, gets its own resources)."""
    from orchestration.config import _parsed, resources

    from orchestration.pipeline import quiet_libraries

    quiet_libraries()  # in every step process too: no progress bars of the libraries the steps call
    run = json.loads(spec)
    config = _parsed(json.dumps(run["raw"], sort_keys=True), run["path"])
    res = resources(config, run["pipeline_run"], run["parent_run_id"], tracking_uri=run["tracking_uri"])
    return build_definitions(config, res).resolve_job_def(PIPELINE_JOB)


@dg.definitions
def defs() -> dg.Definitions:
    """Loaded by `dagster dev -m orchestration.definitions`; importing this module reads no config."""
    from orchestration.config import load_pipeline_config

    return build_definitions(load_pipeline_config(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG))
