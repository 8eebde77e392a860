"""`sftkey train`: the smoke config end to end through the real entry point, and its error exits."""

import json
from pathlib import Path

from sftkey.cli import main

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke_cpu.yaml"


def test_smoke_config_runs_every_arm_and_resume_keeps_finished_runs(tiny_model_dir, arith, tmp_path, capsys):
    args = ["train", "--config", str(SMOKE), "--set", f"model={tiny_model_dir}", "--set", f"output_dir={tmp_path}",
            "--set", f"data.path={arith}"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["sft_tag seed 0", "sftkey_tag seed 0"]
    assert out[1].split(": ")[1].startswith(str(tmp_path / "sftkey_tag" / "seed0" / "checkpoints" / "stage2-final"))
    for arm, stages in (("sft_tag", ["stage1"]), ("sftkey_tag", ["stage1", "stage2"])):
        run = json.loads((tmp_path / arm / "seed0" / "run.json").read_text())
        assert run["status"] == "done" and [s["name"] for s in run["stages"]] == stages
    # 24 examples / batch 8 = 3 steps per epoch; save_every 2 keeps one periodic checkpoint per arm
    assert sorted(p.name for p in (tmp_path / "sftkey_tag" / "seed0" / "checkpoints").iterdir()) == [
        "stage1-final", "stage2-final", "step-00000005"]

    assert main(args) == 2
    assert "already holds checkpoints (newest stage1-final): pass --resume" in capsys.readouterr().err
    assert main(args + ["--resume", "--arm", "sftkey_tag"]) == 0
    assert capsys.readouterr().out.startswith("sftkey_tag seed 0: ")


def test_bad_input_exits_2_with_the_place_named(tmp_path, capsys):
    assert main(["train", "--config", str(SMOKE), "--set", "train.lr=0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "sftkey train: error: --set train.lr: train.lr: learning rate must be a finite number > 0, got 0.0")
    assert main(["train", "--config", str(SMOKE), "--arm", "dft"]) == 2
    assert "--arm dft: no such arm" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such config file" in capsys.readouterr().err


def test_prepared_folder_is_trained_on_instead_of_the_configs_data(tiny_model_dir, arith, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    assert main(["prepare", "--model", str(tiny_model_dir), "--data-path", str(arith), "--max-length", "256",
                 "--out", str(prepared)]) == 0
    meta = json.loads((prepared / "meta.json").read_text())
    args = ["train", "--config", str(SMOKE), "--set", f"model={tiny_model_dir}", "--set", f"output_dir={tmp_path / 'runs'}",
            "--set", f"data.path={tmp_path / 'not-read.jsonl'}", "--arm", "sft_tag"]  # the data section is not read
    assert main(args + ["--prepared", str(prepared)]) == 0
    run = json.loads((tmp_path / "runs" / "sft_tag" / "seed0" / "run.json").read_text())
    assert (run["status"], run["data_version"]) == ("done", meta["data_version"])

    capsys.readouterr()
    assert main(args + ["--prepared", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sftkey train: error: {tmp_path / 'missing'} is not a prepared data set (no examples.jsonl, records.jsonl, "
        f"exclusions.jsonl, meta.json); write one with `sftkey prepare --out {tmp_path / 'missing'}`")
    plain = tmp_path / "plain"
    assert main(["prepare", "--model", str(tiny_model_dir), "--data-path", str(arith), "--format", "plain",
                 "--out", str(plain)]) == 0
    capsys.readouterr()
    assert main(args + ["--set", f"output_dir={tmp_path / 'runs2'}", "--prepared", str(plain)]) == 2
    assert "arm 'sft_tag' trains on the tagged format but the prepared data is not" in capsys.readouterr().err
