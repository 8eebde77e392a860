"""The task YAMLs read responses as sftkey's scorer does: the same Answer block, the same verdict on common answers."""

from __future__ import annotations

import pytest
from lm_eval.api.metrics import exact_match_hf_evaluate
from lm_eval.filters.extraction import RegexFilter
from lm_eval.tasks._yaml_loader import load_yaml

from evals.run import TAGGED_TASKS, TASKS_DIR
from sftkey.evaluate import default_max_new_tokens
from sftkey.score import answers_match, extract_tagged_answer

TASKS = ["gsm8k_tagged", "svamp_tagged", "math500_tagged"]


def task_yaml(task: str) -> dict:
    return load_yaml(TASKS_DIR / task / f"{task}.yaml")


def lm_eval_filter(config: dict, name: str, responses: list[str]) -> list[str]:
    """Run the task's filter `name` (regex then take_first) over single responses."""
    [regex_step] = [f["filter"][0] for f in config["filter_list"] if f["name"] == name]
    regex = RegexFilter(regex_step["regex_pattern"], regex_step.get("group_select", 0))
    return [resps[0] for resps in regex.apply([[r] for r in responses], docs=[])]


def lm_eval_match(config: dict, pred: str, gold: str) -> bool:
    [metric] = config["metric_list"]
    result = exact_match_hf_evaluate(
        [pred], [gold], regexes_to_ignore=metric["regexes_to_ignore"], ignore_case=metric["ignore_case"],
        ignore_punctuation=metric["ignore_punctuation"],
    )
    return bool(result["exact_match"])


@pytest.mark.parametrize("task", TASKS)
def test_task_yaml_is_zero_shot_tagged_generation_with_both_filters(task):
    config = task_yaml(task)
    assert (config["task"], config["tag"], config["dataset_kwargs"]) == (task, "sftkey_tagged", {"dataset": TAGGED_TASKS[task]})
    assert (config["output_type"], config["num_fewshot"], config["test_split"]) == ("generate_until", 0, "test")
    assert "dataset_path" not in config and config["custom_dataset"].__name__ == "tagged_dataset"  # sftkey's loader
    assert (config["doc_to_text"], config["doc_to_target"]) == ("{{question}}", "{{answer}}")
    # the cap of `sftkey eval` on the data set, so both score the same (possibly cut) responses
    cap = default_max_new_tokens(TAGGED_TASKS[task])
    assert config["generation_kwargs"] == {"until": [], "do_sample": False, "max_gen_toks": cap}
    assert [f["name"] for f in config["filter_list"]] == ["strict-match", "flexible-extract"]


RESPONSES = [
    ("<Thinking> 3 + 4 = 7 </Thinking> <Answer> 7 </Answer>", "7"),
    ("<Thinking>\nmany\nlines\n</Thinking>\n<Answer>\n1,250\n</Answer>\n", "1,250"),
    ("no thinking block <Answer>42</Answer> then chatter", "42"),
    ("<Thinking> a </Thinking> <Answer> </Answer>", ""),
    ("<Thinking> a </Thinking> <Answer> 1 </Answer> <Answer> 2 </Answer>", None),  # two Answer blocks
    ("<Thinking> a </Thinking> <Answer> 1 </Answer> </Answer>", None),  # two closing tags
    ("</Answer> 5 <Answer>", None),  # out of order
    ("<Answer> 5 <Thinking> </Answer>", None),  # a Thinking tag inside the block
    ("<Thinking> cut by the length cap <Answer> 5", None),
    ("The answer is 18.", None),
    ("", None),
]


@pytest.mark.parametrize("task", TASKS)
def test_strict_match_extracts_the_answer_block_exactly_as_the_scorer(task):
    responses = [r for r, _ in RESPONSES]
    expected = [answer if answer is not None else "[invalid]" for _, answer in RESPONSES]
    assert lm_eval_filter(task_yaml(task), "strict-match", responses) == expected
    assert [extract_tagged_answer(r) for r in responses] == [a for _, a in RESPONSES]


def test_flexible_extract_takes_the_last_number():
    config = task_yaml("gsm8k_tagged")
    responses = ["<Answer> $32 </Answer>", "so 3 + 4 = 7.", "1,250 hens", "nothing"]
    assert lm_eval_filter(config, "flexible-extract", responses) == ["$32", "7.", "1,250", "[invalid]"]


# (prediction, gold): equal for both scorers on GSM8K and SVAMP answers as models write them.
SAME_NUMBER = [("1,250", "1250"), ("$32", "32"), ("5.0", "5"), ("18.00", "18"), ("32.", "32"), ("-3", "-3"), ("0.5", "0.5")]
OTHER_NUMBER = [("7", "8"), ("3", "-3"), ("1250", "125"), ("5.01", "5"), ("", "5"), ("[invalid]", "5")]
# Where the string match of lm-eval is stricter than sftkey's number match: pinned, so a change on either
# side shows up here (sftkey's figure can only be higher on these).
SFTKEY_ONLY = [("18 dollars", "18"), ("50%", "50"), ("36/2", "18"), ("$ 18", "18")]


@pytest.mark.parametrize("task, dataset", [("gsm8k_tagged", "gsm8k"), ("svamp_tagged", "svamp")])
def test_answer_match_agrees_with_the_scorer_on_numbers(task, dataset):
    config = task_yaml(task)
    for pred, gold in SAME_NUMBER + OTHER_NUMBER:
        expected = (pred, gold) in SAME_NUMBER
        assert lm_eval_match(config, pred, gold) is expected, (pred, gold)
        assert answers_match(pred, gold, dataset)[0] is expected, (pred, gold)
    for pred, gold in SFTKEY_ONLY:
        assert (lm_eval_match(config, pred, gold), answers_match(pred, gold, dataset)[0]) == (False, True), (pred, gold)


def test_math500_match_ignores_latex_spacing_and_sizing():
    config = task_yaml("math500_tagged")
    same = [("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
            ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
            ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("90^\\circ", "90"), ("$5$", "5"), ("10\\%", "10")]
    for pred, gold in same:
        assert lm_eval_match(config, pred, gold), (pred, gold)
        assert answers_match(pred, gold, "math500")[0], (pred, gold)
    assert not lm_eval_match(config, "\\frac{1}{3}", "\\frac{1}{2}")
    assert (lm_eval_match(config, "0.5", "\\frac{1}{2}"), answers_match("0.5", "\\frac{1}{2}", "math500")[0]) == (False, True)
