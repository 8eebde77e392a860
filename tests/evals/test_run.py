"""evals/run.py: task data written from sftkey's records, configs pointed at them, flat metric names, offline runs."""

from __future__ import annotations

import json

import pytest

from evals.run import BenchConfig, flat_metrics, main, run, task_config
from sftkey.data import DataConfig
from sftkey.evaluate import gold_records


def test_tagged_task_reads_the_records_sftkey_eval_scores(memorised_data, tmp_path):
    config = BenchConfig(tasks=["gsm8k_tagged"], data_path=str(memorised_data))
    spec = task_config("gsm8k_tagged", config, tmp_path)
    test_file = spec["dataset_kwargs"]["data_files"]["test"]
    assert test_file == str(tmp_path / "gsm8k-test.jsonl")
    assert (spec["task"], spec["dataset_path"], spec["dataset_name"], spec["test_split"]) == ("gsm8k_tagged", "json", None, "test")
    rows = [json.loads(line) for line in open(test_file, encoding="utf-8")]
    annotated, _ = gold_records(DataConfig("gsm8k", "test", path=str(memorised_data)))
    assert rows == [{"uid": a.uid, "question": a.question, "answer": a.answer} for a in annotated]
    assert rows[2] == {"uid": "gsm8k-test-00002", "question": "Sara had 50 dollars and spent 18. How much is left?", "answer": "32"}


def test_flat_metrics_drop_commas_and_non_numbers():
    results = {"results": {
        "gsm8k_tagged": {"alias": "gsm8k_tagged", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A",
                         "exact_match,flexible-extract": 0.5, "sample_len": 4},
        "gsm8k": {"exact_match,strict-match": 0.0},
    }}
    assert flat_metrics(results) == {
        "gsm8k_tagged/exact_match_strict-match": 0.25,
        "gsm8k_tagged/exact_match_flexible-extract": 0.5,
        "gsm8k_tagged/sample_len": 4,
        "gsm8k/exact_match_strict-match": 0.0,
    }


def test_unknown_task_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['gsm8k_cot'\]: choose from \['gsm8k_tagged', 'svamp_tagged', 'math500_tagged', 'gsm8k'\]"):
        BenchConfig(tasks=["gsm8k_cot"])


def test_cli_reports_a_bad_checkpoint_and_exits_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["--checkpoint", str(tmp_path), "--limit", "2"]) == 2
    assert "has no *.safetensors weights" in capsys.readouterr().err


def test_builtin_gsm8k_5shot_runs_offline_on_local_files(tiny_model_dir, shared_data, tmp_path):
    config = BenchConfig(checkpoint=str(tiny_model_dir), tasks=["gsm8k"], limit=2, batch_size=2, max_new_tokens=4,
                         device="cpu", log_samples=True)
    spec = task_config("gsm8k", config, tmp_path)
    assert spec["num_fewshot"] == 5 and spec["dataset_path"] == "json"
    assert sorted(spec["dataset_kwargs"]["data_files"]) == ["test", "train"]
    results = run(config)
    samples = [s for s in results["samples"]["gsm8k"] if s["filter"] == "strict-match"]
    questions = {r.uid: r.question for r in gold_records(DataConfig("gsm8k", "test", limit=2))[0]}
    assert sorted(s["doc"]["uid"] for s in samples) == sorted(questions)
    for sample in samples:
        prompt = sample["arguments"][0][0]
        assert prompt.count("Question: ") == 6  # five shots as earlier chat turns, then the question
        assert prompt.endswith(f"Question: {questions[sample['doc']['uid']]}\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    assert set(flat_metrics(results)) == {"gsm8k/exact_match_strict-match", "gsm8k/exact_match_flexible-extract", "gsm8k/sample_len"}
