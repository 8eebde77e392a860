"""evals/run.py and the tasks' data: sftkey's records through lm-eval's custom_dataset, flat metric names, offline runs."""

from __future__ import annotations

import re

import pytest

from evals.run import TAGGED_TASKS, TASKS_DIR, BenchConfig, flat_metrics, main, reference_task, run, task_metadata
from sftkey.data import DataConfig
from sftkey.evaluate import gold_records


def load_tasks(config: BenchConfig, names: list[str]) -> dict:
    """The tasks as lm-eval builds them for `run(config)`: our folder, the question choice as metadata."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=task_metadata(config))
    return manager.load(names)["tasks"]


def test_tagged_task_reads_the_records_sftkey_eval_scores(memorised_data):
    config = BenchConfig(tasks=["gsm8k_tagged"], data_path=str(memorised_data))
    [task] = load_tasks(config, ["gsm8k_tagged"]).values()
    rows = list(task.test_docs())
    annotated, _ = gold_records(DataConfig("gsm8k", "test", path=str(memorised_data)))
    assert rows == [{"uid": a.uid, "question": a.question, "answer": a.answer} for a in annotated]
    assert rows[2] == {"uid": "gsm8k-test-00002", "question": "Sara had 50 dollars and spent 18. How much is left?", "answer": "32"}
    assert task.config.generation_kwargs == {"until": [], "do_sample": False, "max_gen_toks": 512}


def test_limit_is_the_seeded_sample_of_sftkey_eval(memorised_data):
    config = BenchConfig(tasks=["gsm8k_tagged"], data_path=str(memorised_data), limit=3, seed=1)
    [task] = load_tasks(config, ["gsm8k_tagged"]).values()
    annotated, _ = gold_records(DataConfig("gsm8k", "test", path=str(memorised_data), limit=3, seed=1))
    assert [row["uid"] for row in task.test_docs()] == [a.uid for a in annotated]
    assert len(annotated) == 3


def test_tag_runs_the_three_tagged_tasks(shared_data):
    tasks = load_tasks(BenchConfig(limit=2), ["sftkey_tagged"])
    assert sorted(tasks) == sorted(TAGGED_TASKS)
    for name, task in tasks.items():
        questions = gold_records(DataConfig(TAGGED_TASKS[name], "test", limit=2))[0]
        assert list(task.test_docs()) == [{"uid": a.uid, "question": a.question, "answer": a.answer} for a in questions]


def test_missing_data_folder_is_named_with_the_fix(tmp_path):
    from sftkey.data import DataError

    absent = tmp_path / "absent"
    with pytest.raises(DataError, match=f"^gsm8k: {re.escape(str(absent))} does not exist; pass an existing file or data folder$"):
        load_tasks(BenchConfig(data_path=str(absent)), ["gsm8k_tagged"])


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
    spec = reference_task()
    assert (spec["task"], spec["num_fewshot"], spec["generation_kwargs"]["max_gen_toks"]) == ("gsm8k", 5, 512)
    assert "dataset_path" not in spec  # nothing from the hub
    results = run(config)
    samples = [s for s in results["samples"]["gsm8k"] if s["filter"] == "strict-match"]
    questions = {r.uid: r.question for r in gold_records(DataConfig("gsm8k", "test", limit=2))[0]}
    assert sorted(s["doc"]["uid"] for s in samples) == sorted(questions)
    for sample in samples:
        prompt = sample["arguments"][0][0]
        assert prompt.count("Question: ") == 6  # five shots as earlier chat turns, then the question
        assert prompt.endswith(f"Question: {questions[sample['doc']['uid']]}\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
        assert sample["arguments"][0][1]["max_gen_toks"] == 4  # the config's cap, through lm-eval's gen_kwargs
    assert set(flat_metrics(results)) == {"gsm8k/exact_match_strict-match", "gsm8k/exact_match_flexible-extract", "gsm8k/sample_len"}
