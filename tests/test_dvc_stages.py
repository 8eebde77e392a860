"""The project's dvc.yaml and params.yaml, driven by the real `dvc` CLI in a temp git + DVC repo on the tiny model
and 24 tiny arithmetic records: `dvc repro`, `dvc metrics show`, `dvc plots show` and `dvc exp run -S train.lr=...`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
ARITH = PROJECT / "tests" / "train" / "fixtures" / "arith.jsonl"  # 24 records: 16 to train on, 8 to test on
BIN = Path(sys.executable).parent  # dvc and sftkey of this venv


def run(repo: Path, *args: str) -> str:
    result = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=600, env=repo_env(repo))
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def repo_env(repo: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "SFTKEY_DATA_DIR": str(repo.parent / "data"), "SFTKEY_HOME": str(repo.parent / "home"),
            "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t"}


def tiny_params(model: Path) -> dict:
    """The project's params.yaml, pointed at the tiny model, the smoke config and a few short answers."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params.update(model=str(model), train_config="configs/smoke_cpu.yaml", run_dir="runs/smoke")
    params["prepare"].update(limit=16, max_length=256)
    params["train"].update(lr=1.0e-3, batch_size=8)
    params["benchmark"].update(limit=4, max_new_tokens=4)
    return params


@pytest.fixture
def repo(tmp_path, tiny_model_dir) -> Path:
    records = ARITH.read_text().splitlines(keepends=True)
    (tmp_path / "data" / "gsm8k").mkdir(parents=True)
    (tmp_path / "data" / "gsm8k" / "train.jsonl").write_text("".join(records[:16]))
    (tmp_path / "data" / "gsm8k" / "test.jsonl").write_text("".join(records[16:]))
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(PROJECT / "dvc.yaml", repo)
    shutil.copytree(PROJECT / "configs", repo / "configs")
    shutil.copytree(PROJECT / "sftkey", repo / "sftkey", ignore=shutil.ignore_patterns("__pycache__"))  # code deps
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model_dir), sort_keys=False))
    run(repo, "git", "init", "-q")
    run(repo, "dvc", "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "project")
    return repo


def test_train_reads_prepares_output_and_the_training_params(tmp_path):
    """Resolved by DVC itself (no stage runs): `dvc exp run -S train.lr=...` edits params.yaml, which reaches here."""
    from dvc.repo import Repo

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(PROJECT / "dvc.yaml", repo)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["train"]["lr"] = 0.0002
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    Repo.init(repo, no_scm=True)
    with Repo(repo) as dvc:
        stages = {stage.name: stage for stage in dvc.index.stages}
    prepared = [str(out) for out in stages["prepare"].outs]
    assert prepared == ["data/prepared/gsm8k-tagged"]
    for arm in ("sft_tag", "sftkey_tag"):
        train = stages[f"train@{arm}"]
        assert f"--arm {arm} --seed 0 --prepared {prepared[0]} " in train.cmd
        assert "--set train.lr=0.0002 " in train.cmd and "--set output_dir=runs/demo " in train.cmd
        assert prepared[0] in [str(dep) for dep in train.deps]
        assert [str(out) for out in stages[f"benchmark@{arm}"].metrics] == [f"eval/{arm}/seed0/summary.json"]
    assert [str(out) for out in stages["compare"].metrics] == ["compare/metrics.json"]
    assert [str(out) for out in stages["compare"].outs if out.plot] == [
        "compare/accuracy.csv", "compare/answer_loss", "compare/accuracy.png", "compare/answer_loss.png"]


@pytest.mark.slow
def test_repro_then_metrics_plots_and_an_experiment(repo):
    run(repo, "dvc", "repro")
    metrics = json.loads(run(repo, "dvc", "metrics", "show", "--json"))
    files = metrics[""]["data"]  # the workspace
    compared = files["compare/metrics.json"]["data"]
    assert sorted(compared) == ["sft_tag", "sftkey_tag"]
    assert sorted(compared["sftkey_tag"]) == ["accuracy", "ci_high", "ci_low", "difference_points", "format_accuracy",
                                              "p_value"]
    for arm in ("sft_tag", "sftkey_tag"):
        summary = files[f"eval/{arm}/seed0/summary.json"]["data"]
        assert (summary["arm"], summary["n"]) == (arm, 4)
        assert compared[arm]["accuracy"] == summary["metrics"]["strict_accuracy"]
    table = run(repo, "dvc", "metrics", "show")
    assert "compare/metrics.json" in table and "sftkey_tag.difference_points" in table

    plots = json.loads(run(repo, "dvc", "plots", "show", "--json"))
    assert not plots.get("errors"), plots["errors"]
    rendered = plots["data"] if "data" in plots else plots
    assert {"compare/accuracy.csv", "compare/answer_loss/sft_tag.csv", "compare/answer_loss/sftkey_tag.csv",
            "compare/accuracy.png", "compare/answer_loss.png"} <= set(rendered)
    losses = (repo / "compare" / "answer_loss" / "sftkey_tag.csv").read_text().splitlines()
    shared = (repo / "compare" / "answer_loss" / "sft_tag.csv").read_text().splitlines()
    assert losses[0] == "step,answer_loss" and losses[:len(shared)] == shared  # stage 1 is SFT-Tag's, reused
    assert len(losses) > len(shared)
    run(repo, "dvc", "plots", "show", "-o", "plots")
    assert (repo / "plots" / "index.html").is_file()

    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline run")
    run(repo, "dvc", "exp", "run", "-S", "train.lr=0.002")
    diff = json.loads(run(repo, "dvc", "params", "diff", "--json"))
    assert {k: diff["params.yaml"]["train.lr"][k] for k in ("old", "new")} == {"old": 0.001, "new": 0.002}
    config = yaml.safe_load((repo / "runs" / "smoke" / "sftkey_tag" / "seed0" / "config.yaml").read_text())
    assert config["train"]["lr"] == 0.002  # the stage retrained with the new value
