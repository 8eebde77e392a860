"""Slow pipeline checks: two pipeline runs at once on one work folder, and a stage launched with two processes
through `accelerate launch` and Dagster Pipes (the multi-GPU path, here with gloo on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

RUN = """
import sys
from orchestration.config import load_pipeline_config
from orchestration.pipeline import run_pipeline
result = run_pipeline(load_pipeline_config(sys.argv[1]), echo=lambda line: None)
print(result.run_dir)
"""


@pytest.mark.slow
def test_two_pipeline_runs_at_once_keep_their_own_outputs(smoke_run, tmp_path):
    raw = json.loads(json.dumps(smoke_run.raw))
    raw["work_dir"] = str(tmp_path / "work")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "work" / "dagster"), "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", RUN, str(path)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    run_dirs = [Path(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert run_dirs[0] != run_dirs[1]
    for run_dir in run_dirs:
        assert (run_dir / "comparison" / "comparison.md").read_text().startswith("| arm | accuracy |")
    # Each stage was trained once: one final checkpoint per stage key, whoever waited reused it.
    finals = sorted(p.parent.name for p in (tmp_path / "work" / "store" / "models").rglob("*-final/sftkey.json"))
    assert finals == ["stage1-final", "stage2-final"]


@pytest.mark.slow
def test_a_stage_under_accelerate_launch_reports_through_pipes(smoke_run, tmp_path):
    from orchestration.assets import cell_key
    from orchestration.config import pipeline_config_from_dict, resources
    from orchestration.definitions import DATA_ASSETS, pipeline_graph

    raw = json.loads(json.dumps(smoke_run.raw))
    raw["training"]["arms"]["sft_tag"]["stages"][0]["steps"] = 4  # a new stage key: it must train
    raw["compute"] = {"device": "cpu", "num_processes": 2}
    config = pipeline_config_from_dict(raw)
    res = resources(config, "pipes-test")
    assets, checks = pipeline_graph(config)
    graph = assets + checks
    stage1 = [a for a in assets if a.key == cell_key("sft_tag", 0, "stage1_model")]
    assert dg.materialize(graph, selection=DATA_ASSETS, instance=smoke_run.instance, resources=res).success
    result = dg.materialize(graph, selection=stage1, instance=smoke_run.instance, resources=res)
    output = result.output_for_node(stage1[0].op.name)
    meta = json.loads(Path(output["checkpoint"], "sftkey.json").read_text())
    assert (meta["world_size"], meta["step"], meta["final"]) == (2, 4, True)
    assert [step for step, _ in output["losses"]] == [1, 2, 3, 4]
