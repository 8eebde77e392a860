"""Every bad input is one line on stderr naming the input and the fix, a non-zero exit, and nothing written.

Each test runs the real `sftkey` entry point in process on real files and checks the exit code, that stderr is
exactly one `sftkey <command>: error: ...` line (no traceback), and that no output folder or summary appeared.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from sftkey.cli import main

QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7", "7"),
    ("A box holds 12 pens. How many pens in 3 boxes?", "12 * 3 = 36", "36"),
    ("Sara had 50 dollars and spent 18. How much is left?", "50 - 18 = 32", "32"),
]

TRAIN_CONFIG = """\
model: {model}
output_dir: {out}
data: {{dataset: gsm8k, split: train, path: {data}, max_length: 64}}
train: {{batch_size: 1, pack_length: 64}}
arms:
  sft:
    stages:
      - {{name: stage1, loss: sft, {length}}}
"""

PIPELINE_CONFIG = """\
name: {name}
work_dir: {work}
benchmark:
  dataset: svamp
  limit: {limit}
training:
  model: tiny
  data: {{dataset: gsm8k, split: train, limit: {training_limit}}}
  arms:
    sft: {{stages: [{{name: stage1, loss: sft, epochs: 1}}]}}
"""


def fails(capsys, argv: list[str], fragment: str) -> str:
    """Run `sftkey argv`; assert exit 2 and exactly one error line holding `fragment`; return that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sftkey {argv[0]}: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert code == 2
    return lines[0]


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": f"{r}\n#### {a}"}) + "\n" for q, r, a in QUESTIONS))
    return path


@pytest.fixture
def checkpoint(tiny_model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def prepare_argv(data: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["prepare", "--dataset", "gsm8k", "--data-path", str(data), "--model", str(model), "--out", str(out), *extra]


def eval_argv(checkpoint: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--checkpoint", str(checkpoint), "--data-path", str(data), "--out", str(out),
            "--max-new-tokens", "2", "--no-progress", *extra]


# ---- configs ----


def test_train_config_with_a_non_utf8_byte_names_line_and_byte(tmp_path, capsys, data_file):
    text = TRAIN_CONFIG.format(model="tiny", out=tmp_path / "runs", data=data_file, length="epochs: 1")
    config = tmp_path / "bad.yaml"
    config.write_bytes(text.encode().replace(b"output_dir", b"output_d\xe9r"))
    offset = text.index("output_dir") + len("output_d")
    fails(capsys, ["train", "--config", str(config)],
          f"{config} line 2: byte 9 (0xe9, offset {offset}) is not UTF-8; re-save the file as UTF-8")
    assert not (tmp_path / "runs").exists()


def test_pipeline_config_with_a_non_utf8_byte_names_line_and_byte(tmp_path, capsys):
    config = tmp_path / "pipeline.yaml"
    text = PIPELINE_CONFIG.format(name="demo", work=tmp_path / "work", limit=5, training_limit=8)
    config.write_bytes(text.encode().replace(b"svamp", b"sv\xffamp"))
    offset = text.index("svamp") + 2
    fails(capsys, ["pipeline", "--config", str(config)],
          f"{config} line 4: byte 14 (0xff, offset {offset}) is not UTF-8; re-save the file as UTF-8")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("length, message", [
    ("epochs: 1e30", "arms.sft.stages[0].epochs: 1e+30 passes would run practically forever; give at most 1000 epochs"),
    ("epochs: 1001", "arms.sft.stages[0].epochs: 1001.0 passes would run practically forever; give at most 1000"),
    ("steps: 100000000000", "arms.sft.stages[0].steps: 100000000000 steps would run practically forever; give at "
                            "most 10,000,000"),
])
def test_endless_stage_length_is_refused_at_load(tmp_path, capsys, data_file, length, message):
    config = tmp_path / "train.yaml"
    config.write_text(TRAIN_CONFIG.format(model="tiny", out=tmp_path / "runs", data=data_file, length=length))
    line = fails(capsys, ["train", "--config", str(config)], message)
    assert f"{config} line 8" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["../../etc", "/etc/sftkey", "a/b", ".hidden", ""])
def test_pipeline_name_cannot_leave_the_work_dir(tmp_path, capsys, name):
    config = tmp_path / "pipeline.yaml"
    config.write_text(PIPELINE_CONFIG.format(name=json.dumps(name), work=tmp_path / "work", limit=5, training_limit=8))
    fails(capsys, ["pipeline", "--config", str(config)],
          f"{config} line 1: name: {name!r} names the run folders under work_dir/runs/: use letters, digits")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("limit, training_limit, extra, message", [
    (-3, 8, "", "line 5: benchmark.limit: must be a positive count, got -3"),
    (0, 8, "", "line 5: benchmark.limit: must be a positive count, got 0"),
    (5, 8, "  batch_size: 0\n", "line 4: benchmark.batch_size: must be a positive count, got 0"),
    (5, 8, "  max_new_tokens: -1\n", "line 4: benchmark.max_new_tokens: must be a positive count, got -1"),
    (5, 8, "  lm_eval_limit: 0\n", "line 4: benchmark.lm_eval_limit: must be a positive count, got 0"),
    (5, -2, "", "line 8: data: limit must be a positive number of records, got -2"),
])
def test_pipeline_counts_are_checked_before_anything_runs(tmp_path, capsys, limit, training_limit, extra, message):
    config = tmp_path / "pipeline.yaml"
    text = PIPELINE_CONFIG.format(name="demo", work=tmp_path / "work", limit=limit, training_limit=training_limit)
    config.write_text(text.replace("benchmark:\n", "benchmark:\n" + extra))
    started = time.perf_counter()
    fails(capsys, ["pipeline", "--config", str(config)], message)
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "work").exists()


# ---- answer regex ----


@pytest.mark.parametrize("regex, problem", [
    ("####(", "not a valid regular expression (missing ), unterminated subpattern at position 4)"),
    (r"####\s*\S+", "has no group 1 to capture the answer; put the answer in parentheses"),
])
def test_bad_answer_regex_is_named_in_prepare_and_eval(tmp_path, capsys, data_file, checkpoint, regex, problem):
    out = tmp_path / "out"
    fails(capsys, prepare_argv(data_file, out, checkpoint, "--answer-regex", regex), f"--answer-regex {regex!r}: {problem}")
    assert not out.exists()
    fails(capsys, eval_argv(checkpoint, data_file, out, "--answer-regex", regex), f"--answer-regex {regex!r}: {problem}")
    assert not out.exists() and not (checkpoint / "eval").exists()


def test_bad_answer_regex_in_a_train_config_names_file_and_line(tmp_path, capsys, data_file):
    config = tmp_path / "train.yaml"
    text = TRAIN_CONFIG.format(model="tiny", out=tmp_path / "runs", data=data_file, length="epochs: 1")
    config.write_text(text.replace("max_length: 64}", "max_length: 64, annotation: {answer_regex: 'x+'}}"))
    fails(capsys, ["train", "--config", str(config)],
          f"{config} line 3: data.annotation: answer_regex 'x+': has no group 1 to capture the answer")
    assert not (tmp_path / "runs").exists()


# ---- flags ----


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "--temperature nan: give a finite number >= 0 (0: greedy)"),
    (["--temperature", "-1"], "--temperature -1.0: give a finite number >= 0 (0: greedy)"),
    (["--batch-size", "0"], "--batch-size 0: give at least 1 question per batch"),
    (["--threads", "0"], "--threads 0: give at least 1 (or leave it out: one per core)"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: give at least 1 (or leave it out: the data set's cap)"),
    (["--limit", "-3"], "limit must be a positive number of records, got -3"),
])
def test_bad_eval_flags_are_named(tmp_path, capsys, data_file, checkpoint, flags, message):
    out = tmp_path / "out"
    fails(capsys, eval_argv(checkpoint, data_file, out, *flags), message)
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--max-length", "0"], "--max-length 0: give a positive number of tokens, e.g. 1024"),
    (["--limit", "0"], "limit must be a positive number of records, got 0"),
])
def test_bad_prepare_flags_are_named(tmp_path, capsys, data_file, checkpoint, flags, message):
    out = tmp_path / "out"
    fails(capsys, prepare_argv(data_file, out, checkpoint, *flags), message)
    assert not out.exists()


# ---- data files ----


@pytest.mark.parametrize("dataset, name, content", [
    ("jsonl", "empty.jsonl", ""),
    ("jsonl", "blank.jsonl", "\n  \n\t\n"),
    ("gsm8k", "blank.jsonl", "\n\n"),
    ("svamp", "SVAMP.json", "[]"),
])
def test_a_data_file_without_records_is_refused(tmp_path, capsys, checkpoint, dataset, name, content):
    data = tmp_path / name
    data.write_text(content)
    out = tmp_path / "prepared"
    split = "all" if dataset == "svamp" else "train"
    argv = ["prepare", "--dataset", dataset, "--split", split, "--data-path", str(data), "--model", str(checkpoint),
            "--out", str(out)]
    fails(capsys, argv, f"{data}: no records (the file is empty or holds only blank lines); pass a file with one")
    assert not out.exists()
    fails(capsys, ["eval", "--checkpoint", str(checkpoint), "--dataset", dataset, "--split", split, "--data-path",
                   str(data), "--out", str(out), "--no-progress"], f"{data}: no records")
    assert not out.exists()


@pytest.mark.parametrize("field, value, kind", [
    ("question", {"text": "What is 2 + 2?"}, "a JSON object"),
    ("question", ["What is", "2 + 2?"], "a JSON list"),
    ("question", 4, "a number"),
    ("solution", {"steps": ["2 + 2 = 4"]}, "a JSON object"),
    ("answer", True, "true/false"),
])
def test_structured_value_where_text_is_expected_names_line_and_field(tmp_path, capsys, checkpoint, field, value, kind):
    rows = [{"question": "What is 1 + 1?", "solution": "1 + 1 = 2", "answer": "2"} for _ in range(3)]
    rows[1][field] = value
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prepared"
    fails(capsys, ["prepare", "--dataset", "jsonl", "--data-path", str(data), "--answer-field", "answer", "--model",
                   str(checkpoint), "--out", str(out)],
          f"{data} line 2: field {field!r} is {kind}, expected text; write it as a JSON string")
    assert not out.exists()


def test_a_number_answer_is_still_text(tmp_path, capsys, checkpoint):
    data = tmp_path / "records.jsonl"
    data.write_text(json.dumps({"question": "What is 1 + 1?", "solution": "1 + 1 = 2", "answer": 2}) + "\n")
    out = tmp_path / "prepared"
    assert main(["prepare", "--dataset", "jsonl", "--data-path", str(data), "--answer-field", "answer", "--model",
                 str(checkpoint), "--out", str(out)]) == 0
    assert json.loads((out / "records.jsonl").read_text())["answer"] == "2"


def test_a_10_mb_record_is_excluded_as_too_long_without_tokenizing(tmp_path, capsys, data_file, checkpoint):
    huge = json.dumps({"question": "x" * 10_000_000, "answer": "1 + 1 = 2\n#### 2"})
    data = tmp_path / "huge.jsonl"
    data.write_text(data_file.read_text() + huge + "\n")
    out = tmp_path / "prepared"
    started = time.perf_counter()
    assert main(prepare_argv(data, out, checkpoint, "--max-length", "256")) == 0
    assert time.perf_counter() - started < 20  # today: 44 s and 3.2 GB
    printed = capsys.readouterr().out
    assert "records 4, kept 3, excluded 1" in printed
    assert "  excluded: 1 x longer than max_length 256 tokens" in printed
    exclusions = [json.loads(line) for line in (out / "exclusions.jsonl").read_text().splitlines()]
    assert exclusions == [{"uid": "gsm8k-train-00003", "origin": f"{data} line 4",
                           "reason": "longer than max_length 256 tokens"}]


def test_a_line_beyond_the_readers_hard_limit_is_an_error(tmp_path, capsys, data_file, checkpoint, monkeypatch):
    from sftkey.data import records

    monkeypatch.setattr(records, "MAX_LINE_BYTES", 2**20)  # the real limit is 64 MiB: same path, smaller file
    data = tmp_path / "huge.jsonl"
    data.write_text(data_file.read_text() + json.dumps({"question": "x" * 2**20, "answer": "#### 2"}) + "\n")
    out = tmp_path / "prepared"
    fails(capsys, prepare_argv(data, out, checkpoint),
          f"{data} line 4: longer than 1 MiB, far beyond any record; remove or split that line")
    assert not out.exists()


# ---- checkpoints ----


def test_truncated_weights_are_refused_before_anything_is_written(tmp_path, capsys, data_file, checkpoint):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    out = tmp_path / "eval"
    for cut in (5, len(data) // 2):  # in the header's length, in the tensors
        weights.write_bytes(data[:cut])
        line = fails(capsys, eval_argv(checkpoint, data_file, out), f"sftkey eval: error: checkpoint: {weights}: ")
        assert "write or copy it again (a checkpoint: rerun the step that wrote it" in line
        assert not out.exists()
    fails(capsys, ["eval", "--checkpoint", str(checkpoint), "--data-path", str(data_file), "--no-progress"],
          f"{weights}: is truncated ({len(data) // 2} bytes; its header describes {len(data)})")
    assert not (checkpoint / "eval").exists()  # the default output folder


def run_with_checkpoints(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A training run's checkpoints/ with one complete checkpoint (sftkey.json) and nothing else yet."""
    checkpoints = tmp_path / "run" / "checkpoints"
    final = Path(shutil.copytree(tiny_model_dir, checkpoints / "stage1-final"))
    (final / "sftkey.json").write_text(json.dumps({"arm": "sft", "seed": 0, "stage": "stage1", "stage_index": 0,
                                                   "step": 4, "final": True}))
    return checkpoints


def test_uncommitted_checkpoint_is_refused_naming_the_last_complete_one(tmp_path, capsys, data_file, tiny_model_dir):
    checkpoints = run_with_checkpoints(tmp_path, tiny_model_dir)
    temp = Path(shutil.copytree(tiny_model_dir, checkpoints / ".step-00000008.tmp"))
    unmarked = Path(shutil.copytree(tiny_model_dir, checkpoints / "step-00000008"))
    out = tmp_path / "eval"
    fails(capsys, eval_argv(temp, data_file, out),
          f"checkpoint {str(temp)!r} is a checkpoint still being written, or left by a crash (its name ends with "
          f".tmp); use the last complete checkpoint beside it, {checkpoints / 'stage1-final'}")
    fails(capsys, eval_argv(unmarked, data_file, out),
          f"checkpoint {str(unmarked)!r} is an unfinished checkpoint (no sftkey.json, which the trainer writes "
          f"last); use the last complete checkpoint beside it, {checkpoints / 'stage1-final'}")
    assert not out.exists() and not (temp / "eval").exists() and not (unmarked / "eval").exists()


def test_uncommitted_checkpoint_alone_says_resume(tmp_path, capsys, data_file, tiny_model_dir):
    temp = Path(shutil.copytree(tiny_model_dir, tmp_path / "run" / "checkpoints" / ".stage1-final.tmp"))
    fails(capsys, eval_argv(temp, data_file, tmp_path / "eval"),
          "no complete checkpoint is beside it: resume the training run (sftkey train --resume)")
    assert not (tmp_path / "eval").exists()


def test_uncommitted_checkpoint_is_refused_as_a_training_init(tmp_path, capsys, data_file, tiny_model_dir):
    checkpoints = run_with_checkpoints(tmp_path, tiny_model_dir)
    temp = Path(shutil.copytree(tiny_model_dir, checkpoints / ".step-00000008.tmp"))
    config = tmp_path / "train.yaml"
    config.write_text(TRAIN_CONFIG.format(model=temp, out=tmp_path / "runs", data=data_file, length="epochs: 1"))
    fails(capsys, ["train", "--config", str(config)],
          f"{config} line 1: model: checkpoint {str(temp)!r} is a checkpoint still being written")
    assert not (tmp_path / "runs").exists()


# ---- prepared sets and comparisons ----


def test_show_example_on_a_folder_that_is_not_a_prepared_set(tmp_path, capsys):
    (tmp_path / "some").mkdir()
    (tmp_path / "some" / "meta.json").write_text("{}")
    fails(capsys, ["show-example", str(tmp_path / "some")],
          f"{tmp_path / 'some'} is not a prepared data set (no examples.jsonl, records.jsonl, exclusions.jsonl); "
          f"write one with `sftkey prepare --out {tmp_path / 'some'}`")
    fails(capsys, ["show-example", str(tmp_path / "missing")], "is not a prepared data set (no examples.jsonl")


def test_show_example_on_a_damaged_prepared_set(tmp_path, capsys, data_file, checkpoint):
    out = tmp_path / "prepared"
    assert main(prepare_argv(data_file, out, checkpoint)) == 0
    capsys.readouterr()
    fails(capsys, ["show-example", str(out), "--index", "3"],
          f"--index 3 out of range: {out} has 3 examples (give 0 to 2)")
    fails(capsys, ["show-example", str(out), "--uid", "nope"], f"--uid 'nope': no example with that uid in {out}")
    (out / "examples.jsonl").write_text('{"uid": "a", "tokens": [1]}\n')
    fails(capsys, ["show-example", str(out)], f"{out / 'examples.jsonl'} line 1: not a TokenizedExample row")
    (out / "examples.jsonl").write_text('{"uid": "a", "input_ids": [1], "ro')
    fails(capsys, ["show-example", str(out)], f"{out}: a file of the prepared set is damaged (Unterminated string")


def test_outcomes_compare_cannot_pair_are_one_line(tmp_path, capsys):
    from sftkey.evaluate import OUTPUTS, SUMMARY

    for arm in ("base", "key"):  # one question each: no interval over questions
        folder = tmp_path / arm
        folder.mkdir()
        row = {"uid": "q0", "strict_correct": True, "lenient_correct": True, "format_ok": True}
        (folder / OUTPUTS).write_text(json.dumps(row) + "\n")
        (folder / SUMMARY).write_text(json.dumps({"arm": arm, "seed": 0, "complete": True, "dataset": "gsm8k",
                                                  "split": "test", "data_version": "v1"}))
    out = tmp_path / "report"
    fails(capsys, ["compare", str(tmp_path / "base"), str(tmp_path / "key"), "--out", str(out)],
          "1 question(s): an interval over questions needs at least 2")
    assert not out.exists()
