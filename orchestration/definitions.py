"""The Dagster definitions that `sftkey ui` (dagster dev) loads: assets, checks, resources and jobs.

Resources come from the pipeline YAML named by $SFTKEY_PIPELINE_CONFIG (default configs/pipeline_demo.yaml); the
`settings` resource carries every section, so a run launched from the UI needs no run config and does what
`sftkey pipeline` does with that file.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from orchestration.assets import (
    annotated_dataset,
    arm_comparison,
    benchmark_scores,
    champion_model,
    raw_dataset,
    registered_model,
    stage1_model,
    stage2_model,
    tokenized_dataset,
)
from orchestration.checks import ALL_CHECKS

CONFIG_ENV = "SFTKEY_PIPELINE_CONFIG"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipeline_demo.yaml"

DATA_ASSETS = [raw_dataset, annotated_dataset, tokenized_dataset]
PARTITIONED_ASSETS = [stage1_model, stage2_model, benchmark_scores]  # one run per arm x seed
REPORT_ASSETS = [arm_comparison, registered_model, champion_model]
ALL_ASSETS = DATA_ASSETS + PARTITIONED_ASSETS + REPORT_ASSETS


def build_definitions(config_path: str | Path) -> dg.Definitions:
    """The graph, its jobs and the resources of the config file (its sections reach the assets through the
    `settings` resource: a job needs no run config)."""
    from orchestration.config import load_pipeline_config, resources

    config = load_pipeline_config(config_path)
    jobs = [
        dg.define_asset_job("prepare_data_job", selection=DATA_ASSETS),
        dg.define_asset_job("train_and_benchmark_job", selection=PARTITIONED_ASSETS),
        dg.define_asset_job("compare_and_register_job", selection=REPORT_ASSETS),
    ]
    return dg.Definitions(assets=ALL_ASSETS, asset_checks=ALL_CHECKS, jobs=jobs, resources=resources(config),
                          executor=dg.in_process_executor)


@dg.definitions
def defs() -> dg.Definitions:
    """Loaded by `dagster dev -m orchestration.definitions`; importing this module reads no config."""
    return build_definitions(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
