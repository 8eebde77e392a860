"""The command-line workflow a user follows: train two arms, evaluate each, compare them."""

import json
import os
import subprocess
import sys
from pathlib import Path

ARITH = Path(__file__).parent / "train" / "fixtures" / "arith.jsonl"
ROOT = Path(__file__).resolve().parents[1]


def sftkey(*args, home):
    result = subprocess.run([sys.executable, "-m", "sftkey.cli", *args], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "SFTKEY_HOME": str(home)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_eval_compare(tmp_path):
    runs = tmp_path / "runs"
    sftkey("train", "--config", "configs/smoke_cpu.yaml", "--set", f"output_dir={runs}",
           "--set", f"data.path={ARITH}", "--set", "data.split=train", home=tmp_path)
    finals = {arm: json.loads((runs / arm / "seed0" / "run.json").read_text())["final_checkpoint"]
              for arm in ("sft_tag", "sftkey_tag")}
    assert Path(finals["sftkey_tag"]).name == "stage2-final"
    for arm, checkpoint in finals.items():
        sftkey("eval", "--checkpoint", checkpoint, "--dataset", "gsm8k", "--split", "train", "--data-path", str(ARITH),
               "--limit", "4", "--max-new-tokens", "8", "--no-progress", "--out", str(tmp_path / "eval" / arm),
               home=tmp_path)
    out = tmp_path / "report"
    printed = sftkey("compare", str(tmp_path / "eval"), "--baseline", "sft_tag", "--out", str(out),
                     "--resamples", "200", home=tmp_path)
    assert "sftkey_tag vs sft_tag:" in printed
    report = json.loads((out / "compare.json").read_text())
    assert [(a["arm"], a["seeds"]) for a in report["arms"]] == [("sft_tag", [0]), ("sftkey_tag", [0])]
    for png in ("accuracy.png", "answer_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
