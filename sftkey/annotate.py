"""Answer-span annotation: one rule per data set splits a worked solution into (reasoning, answer).

A record that a rule cannot split is excluded with its reason, never guessed; the exclusion report is part
of every prepared data set.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from sftkey.data.records import DataError, Record
from sftkey.score.extract import last_boxed

CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's inline calculator calls: `<<48/2=24>>`


class Unannotatable(Exception):
    """The reason a record is excluded."""


@dataclass(frozen=True)
class Annotated:
    uid: str
    question: str
    reasoning: str
    answer: str


@dataclass(frozen=True)
class Exclusion:
    uid: str
    origin: str
    reason: str


@dataclass
class AnnotationConfig:
    """How worked solutions are split."""

    strip_calculator: bool = field(default=True, metadata={"help": "GSM8K: remove `<<...>>` calculator annotations"})
    answer_regex: str = field(
        default=r"####[ \t]*(\S.*?)[ \t]*$",
        metadata={"help": "jsonl without an answer field: group 1 is the answer; the text before the match is the reasoning"},
    )

    def __post_init__(self):
        problem = regex_problem(self.answer_regex)
        if problem:
            raise DataError(f"answer_regex {self.answer_regex!r}: {problem}")


def regex_problem(pattern: str) -> str | None:
    """Why `pattern` cannot be an answer regex (None: it can): it must compile and have a group 1."""
    try:
        groups = re.compile(pattern).groups
    except re.error as e:
        return f"not a valid regular expression ({e}); fix the pattern, e.g. '####\\s*(\\S+)'"
    if groups < 1:
        return "has no group 1 to capture the answer; put the answer in parentheses, e.g. '####\\s*(\\S+)'"
    return None


def annotation_config(strip_calculator: bool = True, answer_regex: str | None = None) -> AnnotationConfig:
    """The config of the `--answer-regex` flag (None: the default rule); a bad pattern names the flag."""
    if answer_regex is None:
        return AnnotationConfig(strip_calculator=strip_calculator)
    problem = regex_problem(answer_regex)
    if problem:
        raise DataError(f"--answer-regex {answer_regex!r}: {problem}")
    return AnnotationConfig(strip_calculator=strip_calculator, answer_regex=answer_regex)


# Annotation rules, one per data set (named by its entry in sftkey.data.registry): record -> (reasoning, answer).


def split_gsm8k(record: Record, config: AnnotationConfig) -> tuple[str, str]:
    if "####" not in record.solution:
        raise Unannotatable("no '####' answer marker")
    reasoning, answer = record.solution.rsplit("####", 1)
    if config.strip_calculator:
        reasoning = CALCULATOR.sub("", reasoning)
    return reasoning.strip(), answer.strip()


def split_math(record: Record, config: AnnotationConfig) -> tuple[str, str]:
    """The whole solution is the reasoning; the answer is its last `\\boxed{}`."""
    answer = last_boxed(record.solution)
    if answer is None:
        raise Unannotatable("unclosed \\boxed{" if "\\boxed" in record.solution else "no \\boxed{} answer")
    return record.solution.strip(), answer


def split_svamp(record: Record, config: AnnotationConfig) -> tuple[str, str]:
    """The equation is the reasoning, ended by its result: `( 76.0 - 25.0 ) = 51`."""
    return f"{record.solution} = {record.answer}", record.answer


def split_jsonl(record: Record, config: AnnotationConfig) -> tuple[str, str]:
    """The answer field when the file has one, else `config.answer_regex` on the solution."""
    if record.answer is not None:
        return record.solution.strip(), record.answer.strip()
    return split_by_regex(record.solution, config)


def split_by_regex(solution: str, config: AnnotationConfig) -> tuple[str, str]:
    match = None
    for match in re.finditer(config.answer_regex, solution, flags=re.MULTILINE):
        pass  # keep the last match: the final answer
    if match is None:
        raise Unannotatable(f"answer_regex {config.answer_regex!r} does not match")
    return solution[: match.start()].strip(), match.group(1).strip()


def split_solution(dataset: str, record: Record, config: AnnotationConfig) -> tuple[str, str]:
    """(reasoning, answer) by the data set's rule; raises Unannotatable with the reason."""
    from sftkey.data.registry import dataset_spec  # inside: the registry imports the rules above

    return dataset_spec(dataset).annotation_rule(record, config)


def annotate(
    dataset: str, records: list[Record], config: AnnotationConfig | None = None
) -> tuple[list[Annotated], list[Exclusion]]:
    """Annotate every record; the ones that cannot be split come back as exclusions with the reason."""
    config = config or AnnotationConfig()
    kept, excluded = [], []
    for record in records:
        try:
            if not record.question.strip():
                raise Unannotatable("empty question")
            reasoning, answer = split_solution(dataset, record, config)
            if not answer:
                raise Unannotatable("empty answer")
            if not reasoning:
                raise Unannotatable("empty reasoning")
        except Unannotatable as e:
            excluded.append(Exclusion(record.uid, record.origin, str(e)))
            continue
        kept.append(Annotated(record.uid, record.question.strip(), reasoning, answer))
    return kept, excluded


def exclusion_counts(excluded: list[Exclusion]) -> dict[str, int]:
    return dict(Counter(e.reason for e in excluded).most_common())
