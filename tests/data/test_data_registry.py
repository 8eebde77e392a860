"""The data set registry: one entry holds everything, and a new data set is one entry."""

import json

import pytest

from sftkey.annotate import Unannotatable, annotate
from sftkey.data import DataConfig, DataError, Record, load_records
from sftkey.data.registry import DATASETS, MATH, NUMBER, DatasetSpec, dataset_spec, scoring_spec
from sftkey.data.sources import Source
from sftkey.evaluate import default_max_new_tokens
from sftkey.score import answers_match, extract_lenient_answer, match_math, match_number_or_text, score_output


def test_each_built_in_entry():
    facts = {name: (spec.answer_kind, spec.scorer, spec.max_new_tokens) for name, spec in DATASETS.items()}
    assert facts == {
        "gsm8k": (NUMBER, match_number_or_text, 512),
        "svamp": (NUMBER, match_number_or_text, 256),
        "math500": (MATH, match_math, 1024),
        "jsonl": (NUMBER, match_number_or_text, 512),
    }
    assert {name: default_max_new_tokens(name) for name in DATASETS} == {n: f[2] for n, f in facts.items()}


def test_unknown_names():
    with pytest.raises(DataError, match=r"unknown dataset 'gsm9k': choose one of \['gsm8k', 'jsonl', 'math500', 'svamp'\]"):
        dataset_spec("gsm9k")
    with pytest.raises(DataError, match="unknown dataset 'gsm9k'"):
        DataConfig("gsm9k")
    # Scoring never raises: spellings of a known name find it, anything else is judged as generic numbers/text.
    assert scoring_spec("MATH-500") is scoring_spec("math_500") is DATASETS["math500"]
    assert scoring_spec("lm-eval-task") is DATASETS["jsonl"]


def split_arrow(record: Record, config) -> tuple[str, str]:
    """The toy rule: `reasoning => answer`."""
    if "=>" not in record.solution:
        raise Unannotatable("no '=>' answer marker")
    reasoning, answer = record.solution.rsplit("=>", 1)
    return reasoning.strip(), answer.strip()


def same_word(pred: str, gold: str, timeout_s: float) -> tuple[bool, str]:
    return (True, "same word") if pred.strip().lower() == gold.strip().lower() else (False, "other word")


def toy_row(row: dict, uid: str, origin: str, config: DataConfig) -> Record:
    return Record(uid, row["q"], row["s"], None, origin)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A data set registered by one entry: its own file layout, rule, scorer and cap."""
    folder = tmp_path / "data"
    (folder / "toy").mkdir(parents=True)
    rows = [{"q": "Colour of the sky?", "s": "Look up => Blue"}, {"q": "Colour of grass?", "s": "no marker"}]
    (folder / "toy" / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = DatasetSpec(Source(toy_row, {"all": "toy/toy.jsonl"}), split_arrow, MATH, same_word, max_new_tokens=64)
    monkeypatch.setitem(DATASETS, "toy", spec)
    return folder


def test_a_new_data_set_is_one_entry(toy):
    records, source = load_records(DataConfig("toy", "all", path=str(toy)))
    assert source == str(toy / "toy" / "toy.jsonl")
    kept, excluded = annotate("toy", records)
    assert [(k.uid, k.question, k.reasoning, k.answer) for k in kept] == [
        ("toy-all-00000", "Colour of the sky?", "Look up", "Blue")]
    assert [(e.uid, e.reason) for e in excluded] == [("toy-all-00001", "no '=>' answer marker")]
    assert answers_match("BLUE", "Blue", "toy") == (True, "same word")
    assert extract_lenient_answer("it is \\boxed{blue} not 3", "toy") == "blue"  # answer kind MATH: the box first
    assert score_output("<Thinking> up </Thinking> <Answer> red </Answer>", kept[0].answer, "toy") == dict(
        format_ok=True, strict_correct=False, lenient_correct=False, pred_strict="red", pred_lenient=None,
        reasoning_chars=2, reason="other word")
    assert default_max_new_tokens("toy") == 64
