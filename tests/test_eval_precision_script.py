"""benchmarks/eval_precision.py: fp32 against bf16 evaluation of one checkpoint, question by question. The
arithmetic on hand-made rows (a flip in each direction, an untagged model, questions that do not match), then one
end-to-end run on the tiny model (its bf16 outputs depend on the CPU's summation order: only the shape is pinned)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARITH = REPO / "tests" / "train" / "fixtures" / "arith.jsonl"  # 24 GSM8K-form records


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("eval_precision", REPO / "benchmarks" / "eval_precision.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_precision"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["eval_precision"]


def row(uid: str, output: str, strict: bool, format_ok: bool = True, tagged: bool = True) -> dict:
    return {"uid": uid, "output": output, "strict_correct": strict, "format_ok": format_ok, "tagged": tagged}


def test_a_verdict_that_flips_either_way_is_counted_and_named(bench):
    fp32 = [row("a", "x 1", True), row("b", "x 2", False), row("c", "x 3", True), row("d", "x 4", True, False)]
    bf16 = [row("a", "x 1", True), row("b", "y 2", True), row("c", "y 3", False), row("d", "y 4", True, True)]
    found = bench.agreement(fp32, bf16)
    assert found.questions == 4 and found.same_output == 1
    assert found.strict == {"float32": 3, "bfloat16": 3, "flipped": 2, "reference_only": 1, "candidate_only": 1,
                            "p": 1.0}
    assert found.format_ok == {"float32": 3, "bfloat16": 4, "flipped": 1, "reference_only": 0, "candidate_only": 1,
                               "p": 1.0}


def test_different_outputs_with_the_same_verdicts_are_no_flip(bench):
    fp32 = [row("a", "<Answer> 4 </Answer>", True), row("b", "<Answer> 5 </Answer>", False)]
    bf16 = [row("a", "so <Answer> 4 </Answer>", True), row("b", "<Answer> 6 </Answer>", False)]
    found = bench.agreement(fp32, bf16)
    assert (found.same_output, found.strict["flipped"], found.format_ok["flipped"]) == (0, 0, 0)
    assert bench.verdict(found) == "bf16 gave the same verdicts on all 2 questions"


def test_one_format_flip_alone_keeps_evaluation_in_fp32(bench):
    fp32 = [row("a", "x", True), row("b", "y", False)]
    bf16 = [row("a", "x", True), row("b", "z", False, format_ok=False)]
    assert bench.verdict(bench.agreement(fp32, bf16)) == "bf16 changed 1 verdicts: keep evaluation in fp32"


def test_an_untagged_model_has_no_format_verdict(bench):
    rows = [row("a", "4", True, False, tagged=False)]
    assert bench.agreement(rows, rows).format_ok is None


def test_evaluations_of_different_questions_are_refused(bench):
    with pytest.raises(ValueError, match="different questions: 2 differ"):
        bench.agreement([row("a", "", True)], [row("b", "", True)])


def test_the_script_evaluates_both_dtypes_and_a_rerun_resumes(bench, tiny_model_dir, tmp_path, capsys):
    argv = ["--checkpoint", str(tiny_model_dir), "--dataset", "gsm8k", "--data-path", str(ARITH),
            "--limit", "4", "--max-new-tokens", "4", "--batch-size", "2", "--work", str(tmp_path)]
    assert bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["questions"] == 4 and 0 <= result["same_output"] <= 4
    assert result["strict"]["flipped"] == result["strict"]["reference_only"] + result["strict"]["candidate_only"]
    outputs = sorted(tmp_path.glob("*/outputs.jsonl"))
    assert [p.parent.name.rsplit("-", 1)[1] for p in outputs] == ["bfloat16", "float32"]
    summaries = [json.loads((p.parent / "summary.json").read_text()) for p in outputs]
    assert [s["dtype"] for s in summaries] == ["bfloat16", "float32"]
    written = [p.read_text() for p in outputs]
    assert bench.main(argv) == 0  # the outputs are there: nothing is generated again
    assert [p.read_text() for p in outputs] == written
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["questions"] == 4
