"""The stock `lm_eval` CLI runs our tasks as a user would: from another folder, on ../shared/data, no helper script.

It runs in process: `cli_evaluate` is what the `lm_eval` console script calls (a subprocess adds ~20 s of imports)."""

from __future__ import annotations

import json

from evals.run import TASKS_DIR
from sftkey.data import DataConfig
from sftkey.evaluate import gold_records

def test_stock_lm_eval_cli_runs_gsm8k_tagged_on_the_test_questions(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    from lm_eval.__main__ import cli_evaluate

    out = tmp_path / "results"
    command = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_model_dir},dtype=float32",
               "--include_path", str(TASKS_DIR), "--tasks", "gsm8k_tagged", "--limit", "3", "--device", "cpu",
               "--apply_chat_template", "--gen_kwargs", "max_gen_toks=4",  # a random model: short junk is enough
               "--output_path", str(out), "--log_samples"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", command)
    assert cli_evaluate() is None  # a failure raises

    [results_file] = out.glob("*/results_*.json")
    results = json.loads(results_file.read_text())
    assert results["results"]["gsm8k_tagged"]["sample_len"] == 3
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(results["results"]["gsm8k_tagged"])

    [samples_file] = out.glob("*/samples_gsm8k_tagged_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    strict = [s for s in samples if s["filter"] == "strict-match"]
    # lm-eval's --limit keeps the first 3 of the questions `sftkey eval` scores
    expected = gold_records(DataConfig("gsm8k", "test"))[0][:3]
    assert [s["doc"] for s in strict] == [{"uid": a.uid, "question": a.question, "answer": a.answer} for a in expected]
    assert [(s["doc"]["uid"], s["target"]) for s in strict] == [
        ("gsm8k-test-00000", "18"), ("gsm8k-test-00001", "3"), ("gsm8k-test-00002", "70000")]
    for sample, question in zip(strict, expected):
        prompt, gen_kwargs = sample["arguments"]["gen_args_0"]["arg_0"], sample["arguments"]["gen_args_0"]["arg_1"]
        assert prompt == f"<|im_start|>user\n{question.question}<|im_end|>\n<|im_start|>assistant\n"
        assert gen_kwargs == {"until": [], "do_sample": False, "max_gen_toks": 4}
