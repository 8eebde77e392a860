from pathlib import Path

import pytest

from sftkey.annotate import AnnotationConfig, annotate, exclusion_counts
from sftkey.data import DataConfig, DataError, Record, load_records
from sftkey.score import last_boxed

FIXTURES = Path(__file__).parent / "fixtures"


def one(dataset, record, config=None):
    kept, excluded = annotate(dataset, [record], config)
    assert not excluded, excluded
    return kept[0].reasoning, kept[0].answer


def test_gsm8k_splits_at_the_marker_and_drops_calculator_calls():
    record = Record("g", "q", "She sold 48/2 = <<48/2=24>>24 clips.\nTotal 48+24 = <<48+24=72>>72\n#### 72")
    assert one("gsm8k", record) == ("She sold 48/2 = 24 clips.\nTotal 48+24 = 72", "72")
    kept = one("gsm8k", record, AnnotationConfig(strip_calculator=False))
    assert kept == ("She sold 48/2 = <<48/2=24>>24 clips.\nTotal 48+24 = <<48+24=72>>72", "72")


def test_math_takes_the_last_boxed_with_nested_braces():
    solution = "First \\boxed{1}. So the answer is $\\boxed{\\frac{\\sqrt{3}}{2}}$."
    assert one("math500", Record("m", "q", solution)) == (solution, "\\frac{\\sqrt{3}}{2}")
    assert last_boxed("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert last_boxed("so \\boxed{\\frac{1}{2}") is None


def test_math_without_a_closed_box_is_excluded_with_the_reason():
    records = [Record("m1", "q", "so \\boxed{\\frac{1}{2}"), Record("m2", "q", "the answer is 5")]
    kept, excluded = annotate("math500", records)
    assert kept == []
    assert [(e.uid, e.reason) for e in excluded] == [("m1", "unclosed \\boxed{"), ("m2", "no \\boxed{} answer")]


def test_an_unknown_dataset_has_no_rule():
    with pytest.raises(DataError, match="unknown dataset 'nope': choose one of \\['gsm8k', 'jsonl', 'math500', 'svamp'\\]"):
        annotate("nope", [Record("x", "q", "s")])


def test_svamp_reasoning_is_the_equation_and_its_result():
    assert one("svamp", Record("chal-1", "q", "( 76.0 - 25.0 )", "51")) == ("( 76.0 - 25.0 ) = 51", "51")


def test_jsonl_answer_field_or_regex():
    assert one("jsonl", Record("j", "q", "because 2+2", " 4 ")) == ("because 2+2", "4")
    assert one("jsonl", Record("j", "q", "2+2=4\n#### 4\n")) == ("2+2=4", "4")
    config = AnnotationConfig(answer_regex=r"The answer is (\S+?)\.?$")
    assert one("jsonl", Record("j", "q", "2+2=4. The answer is 4."), config) == ("2+2=4.", "4")


def test_bad_records_are_excluded_with_reasons_and_counted(tmp_path):
    records, _ = load_records(DataConfig("jsonl", "all", path=str(FIXTURES / "bad_records.jsonl")))
    kept, excluded = annotate("jsonl", records)
    assert [(k.uid, k.answer) for k in kept] == [("jsonl-all-00000", "5"), ("jsonl-all-00005", "10")]
    regex = AnnotationConfig().answer_regex
    assert [(e.origin.rsplit(" ", 2)[-1], e.reason) for e in excluded] == [
        ("2", "empty question"),
        ("3", f"answer_regex {regex!r} does not match"),
        ("4", "empty reasoning"),
        ("5", f"answer_regex {regex!r} does not match"),
    ]
    assert exclusion_counts(excluded) == {f"answer_regex {regex!r} does not match": 2, "empty question": 1,
                                          "empty reasoning": 1}
    assert excluded[0].origin == f"{FIXTURES / 'bad_records.jsonl'} line 2"


def test_real_data_annotates_fully(shared_data):
    for dataset, split in [("gsm8k", "train"), ("svamp", "all"), ("math500", "test")]:
        records, _ = load_records(DataConfig(dataset, split))
        kept, excluded = annotate(dataset, records)
        assert (len(kept), len(excluded)) == (len(records), 0)
    math = dict((r.uid, r) for r in annotate("math500", load_records(DataConfig("math500", "test"))[0])[0])
    original = {r.uid: r.answer for r in load_records(DataConfig("math500", "test"))[0]}
    # The boxed rule reproduces MATH-500's own answer field on (almost) every problem.
    agree = sum(math[uid].answer == original[uid] for uid in math)
    assert agree == 500
