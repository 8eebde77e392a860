"""The command-line workflow a user follows: train two arms, evaluate each, compare them (in process: `run_cli`)."""

import json
from pathlib import Path

import pytest

ARITH = Path(__file__).parent / "train" / "fixtures" / "arith.jsonl"
ROOT = Path(__file__).resolve().parents[1]


HELD_OUT = [("What is 17 + 25?", "17 + 25 = 42", "42"), ("What is 9 * 8?", "9 * 8 = 72", "72"),
            ("What is 61 - 19?", "61 - 19 = 42", "42"), ("What is 144 / 12?", "144 / 12 = 12", "12")]


@pytest.fixture
def sftkey(run_cli):
    def run(*args, home, expect: int = 0) -> str:
        result = run_cli(*args, env={"SFTKEY_HOME": str(home)}, cwd=ROOT)
        assert result.exit_code == expect, result.stderr[-3000:]
        return result.stdout if expect == 0 else result.stderr

    return run


def test_train_eval_compare(tmp_path, sftkey):
    runs = tmp_path / "runs"
    sftkey("train", "--config", "configs/smoke_cpu.yaml", "--set", f"output_dir={runs}",
           "--set", f"data.path={ARITH}", "--set", "data.split=train", home=tmp_path)
    finals = {arm: json.loads((runs / arm / "seed0" / "run.json").read_text())["final_checkpoint"]
              for arm in ("sft_tag", "sftkey_tag")}
    assert Path(finals["sftkey_tag"]).name == "stage2-final"
    # The training questions themselves are refused: the checkpoint's sftkey.json says it trained on them.
    refused = sftkey("eval", "--checkpoint", finals["sft_tag"], "--dataset", "gsm8k", "--split", "train",
                     "--data-path", str(ARITH), "--limit", "4", "--no-progress", home=tmp_path, expect=2)
    assert "trained on 4 of the 4 questions of gsm8k train" in refused
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"question": q, "answer": f"{r}\n#### {a}"}) + "\n" for q, r, a in HELD_OUT))
    for arm, checkpoint in finals.items():
        sftkey("eval", "--checkpoint", checkpoint, "--dataset", "gsm8k", "--split", "test", "--data-path", str(held_out),
               "--max-new-tokens", "8", "--no-progress", "--out", str(tmp_path / "eval" / arm), home=tmp_path)
    out = tmp_path / "report"
    printed = sftkey("compare", str(tmp_path / "eval"), "--baseline", "sft_tag", "--out", str(out), home=tmp_path)
    assert "- sftkey_tag vs sft_tag:" in printed
    assert "so this verdict is about these trained models only" in printed  # one seed
    report = json.loads((out / "comparison.json").read_text())
    assert [(a["arm"], a["seeds"]) for a in report["arms"]] == [("sft_tag", [0]), ("sftkey_tag", [0])]
    for png in ("accuracy.png", "answer_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
