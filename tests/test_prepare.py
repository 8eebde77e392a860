from dataclasses import astuple
from pathlib import Path

import pytest

from sftkey.data import DataConfig
from sftkey.prepare import PrepareConfig, prepare, read_prepared, summary_lines, tokenize_records, write_prepared

FIXTURES = Path(__file__).parent / "fixtures"


def test_prepare_fixture_counts_roles_and_exclusions(tiny_tokenizer):
    config = PrepareConfig(DataConfig("jsonl", "all", path=str(FIXTURES / "bad_records.jsonl")))
    prepared = prepare(config, tiny_tokenizer)
    meta = prepared.meta
    assert meta["counts"] == {"records": 6, "kept": 2, "excluded": 4}
    assert [e.uid for e in prepared.examples] == ["jsonl-all-00000", "jsonl-all-00005"]
    assert meta["tokens_by_role"]["eos"] == 2
    assert meta["tokens_by_role"]["answer"] == sum(ex.roles.count(2) for ex in prepared.examples)
    answer, response = meta["tokens_by_role"]["answer"], sum(meta["tokens_by_role"].values()) - meta["tokens_by_role"]["prompt"]
    assert meta["answer_token_share"] == answer / response


def test_tokenize_records_of_annotated_records_is_what_prepare_does(tiny_tokenizer):
    """The pipeline annotates once (annotated_dataset) and tokenizes those records (tokenized_dataset)."""
    from sftkey.annotate import annotate
    from sftkey.data import content_version, load_records

    config = PrepareConfig(DataConfig("jsonl", "all", path=str(FIXTURES / "bad_records.jsonl")), max_length=40)
    records, source = load_records(config.data)
    annotated, exclusions = annotate("jsonl", records, config.annotation)
    tokenized = tokenize_records(annotated, exclusions, config, tiny_tokenizer, content_version(records), source)
    prepared = prepare(config, tiny_tokenizer)
    assert tokenized.meta == prepared.meta and tokenized.examples == prepared.examples
    assert len(exclusions) == 4 and len(tokenized.exclusions) == 6  # the too-long two join a copy
    too_long = [e for e in tokenized.exclusions if e.reason == "longer than max_length 40 tokens"]
    assert [e.origin for e in too_long] == [source, source]  # without origins: the source
    assert [e.origin for e in prepared.exclusions if e.reason.startswith("longer")] == [
        f"{source} line 1", f"{source} line 6"]


def test_the_chat_template_gap_is_recorded_and_shown_only_when_there_is_one(tiny_tokenizer):
    from sftkey.tiny import CHAT_TEMPLATE, train_tiny_tokenizer

    config = PrepareConfig(DataConfig("jsonl", "all", path=str(FIXTURES / "bad_records.jsonl")))
    plain = prepare(config, tiny_tokenizer).meta
    assert plain["template_gap"] == ""
    assert not any("chat template" in line for line in summary_lines(plain))
    thinking = train_tiny_tokenizer()  # an empty think block opens each assistant turn, as in Qwen3's template
    block = "('<think>\\n\\n</think>\\n\\n' if message['role'] == 'assistant' else '')"
    thinking.chat_template = CHAT_TEMPLATE.replace("message['content']", block + " + message['content']")
    meta = prepare(config, thinking).meta
    assert meta["template_gap"] == "<think>\n\n</think>\n\n"
    assert summary_lines(meta)[-1] == ("chat template inserts '<think>\\n\\n</think>\\n\\n' before each response: "
                                       "it is part of the prompt in training and evaluation")


def test_too_long_examples_are_excluded_not_truncated(tiny_tokenizer):
    config = PrepareConfig(DataConfig("jsonl", "all", path=str(FIXTURES / "bad_records.jsonl")), max_length=40)
    prepared = prepare(config, tiny_tokenizer)
    assert prepared.meta["exclusions_by_reason"]["longer than max_length 40 tokens"] == 2
    assert prepared.examples == []


def test_write_is_atomic_and_round_trips(tiny_tokenizer, tmp_path):
    config = PrepareConfig(DataConfig("jsonl", "all", path=str(FIXTURES / "bad_records.jsonl")))
    prepared = prepare(config, tiny_tokenizer)
    out = write_prepared(prepared, tmp_path / "prep")
    again = read_prepared(out)
    assert again.examples == prepared.examples and again.meta == prepared.meta
    assert sorted(p.name for p in out.iterdir()) == ["examples.jsonl", "exclusions.jsonl", "meta.json", "records.jsonl"]
    # A failure while rewriting leaves the previous folder intact and no temp folder behind.
    prepared.examples.append(object())  # not serialisable: the write fails midway
    with pytest.raises(TypeError):
        write_prepared(prepared, out)
    assert read_prepared(out).meta == again.meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prep"]


def test_prepare_cli_on_a_user_jsonl(tmp_path, run_cli, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("SFTKEY_HOME", str(tmp_path / "home"))
    out = tmp_path / "prepared"
    code, stdout, stderr = astuple(run_cli("prepare", "--dataset", "jsonl", "--split", "all", "--data-path",
                                  str(FIXTURES / "bad_records.jsonl"), "--model", str(tiny_model_dir),
                                  "--out", str(out)))
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[1] == "records 6, kept 2, excluded 4"
    assert "  excluded: 1 x empty question" in lines
    assert lines[-3].startswith("answer-token share of response tokens: ")
    code, stdout, stderr = astuple(run_cli("show-example", str(out), "--index", "1", "--no-color"))
    assert code == 0, stderr
    assert stdout.startswith("jsonl-all-00005: ")
    assert stdout.endswith(
        "[thinking|<Thinking> 9 + 1 = 10 </Thinking>][answer| <Answer> 10 </Answer>][eos|<|im_end|>][prompt|\n]\n"
    )


def test_prepare_cli_reports_bad_input_with_file_and_line(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("SFTKEY_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "solution": "1\\n#### 1"}\n{"question": "b"\n')
    code, _, stderr = astuple(run_cli("prepare", "--dataset", "jsonl", "--split", "all", "--data-path", str(bad),
                             "--model", "tiny", "--out", str(tmp_path / "out")))
    assert code == 2
    assert f"error: {bad} line 2: invalid JSON" in stderr
    assert not (tmp_path / "out").exists()


def test_prepare_gsm8k_train_with_the_default_tokenizer(shared_data, smollm2_tokenizer, tmp_path):
    prepared = prepare(PrepareConfig(DataConfig("gsm8k", "train")), smollm2_tokenizer)
    meta = prepared.meta
    assert meta["counts"] == {"records": 7473, "kept": 7473, "excluded": 0}
    assert meta["tokens_by_role"] == {"prompt": 682081, "thinking": 699748, "answer": 69636, "eos": 7473}
    assert round(meta["answer_token_share"], 4) == 0.0896  # ` <Answer> 72 </Answer>` is ~9 of ~104 response tokens
    assert summary_lines(meta)[0] == f"gsm8k [train] from {shared_data / 'gsm8k/train.jsonl'}"
