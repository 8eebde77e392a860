"""The regression run's data set: synthetic one-step questions whose answer is a number stated in the question.

    python benchmarks/regress_data/make.py      # rewrites gsm8k/train.jsonl and gsm8k/test.jsonl (deterministic)

The tiny random model cannot do SVAMP's arithmetic, so a regression gate on SVAMP could never see strict accuracy
fall (it is near 0 already). Here the answer must be copied from the question through the Thinking block into the
Answer block: the tiny model learns that within the regression config's steps (strict accuracy near 1), a damaged
trainer, loss, data path or scorer does not. The files use GSM8K's format ("reasoning #### answer") and native
train/test split, so the pipeline reads them with `dataset: gsm8k, path: benchmarks/regress_data`; no question
appears twice, so none of the test questions is in train (`sftkey eval`'s overlap check would refuse it).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 0
SIZES = {"train": 300, "test": 100}
NUMBERS = range(2, 21)
NAMES = ["Sam", "Ann", "Tom", "Mia", "Leo", "Eva", "Max", "Zoe"]
OBJECTS = ["apples", "books", "coins", "pens", "cards", "shells"]
TEMPLATES = [  # (statement, question); the statement is the worked solution
    ("{name} has {n} {obj}.", "How many {obj} does {name} have?"),
    ("There are {n} {obj} in the box.", "How many {obj} are in the box?"),
    ("{name} found {n} {obj}.", "How many {obj} did {name} find?"),
]


def records(rng: random.Random, count: int, seen: set[str]) -> list[dict]:
    rows = []
    while len(rows) < count:
        statement, question = rng.choice(TEMPLATES)
        values = {"name": rng.choice(NAMES), "n": rng.choice(NUMBERS), "obj": rng.choice(OBJECTS)}
        text = f"{statement} {question}".format(**values)
        if text not in seen:  # every question once, in one split only
            seen.add(text)
            rows.append({"question": text, "answer": f"{statement.format(**values)} #### {values['n']}"})
    return rows


def main() -> None:
    rng, seen = random.Random(SEED), set()
    folder = Path(__file__).resolve().parent / "gsm8k"
    folder.mkdir(exist_ok=True)
    for split, count in SIZES.items():
        lines = "".join(json.dumps(row) + "\n" for row in records(rng, count, seen))
        (folder / f"{split}.jsonl").write_text(lines, encoding="utf-8")


if __name__ == "__main__":
    main()
