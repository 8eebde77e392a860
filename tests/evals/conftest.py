"""A tiny model trained to memorise a handful of answers, so that scoring has right and wrong answers to agree on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# (question, reasoning, trained answer, trained format, gold answer). The model learns to answer each question
# with render(reasoning, trained answer, tagged); the gold answer is what the evaluation file holds.
MEMORISED = [
    ("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7", "7", "tagged", "8"),  # wrong
    ("A box holds 12 pens. How many pens in 3 boxes?", "12 * 3 = 36", "36", "tagged", "36"),
    ("Sara had 50 dollars and spent 18. How much is left?", "50 - 18 = 32", "$32", "tagged", "32"),
    ("A farm has 1000 hens and buys 250 more. How many hens?", "1000 + 250 = 1250", "1,250", "tagged", "1250"),
    ("Ben reads 5 pages a day for 9 days. How many pages?", "5 * 9 = 45", "45", "plain", "45"),  # no Answer block
    ("Ann cuts a 20 cm ribbon into 4 equal parts. How long is each?", "20 / 4 = 5", "5.0", "tagged", "5"),
]
UNSEEN = ("What is the colour of the sky on Mars at noon?", "999")  # never trained: junk up to the cap
TRAIN_STEPS = 150


def gsm8k_rows() -> list[dict]:
    """The evaluation questions in GSM8K's row format (`#### gold` closes the worked solution)."""
    rows = [{"question": q, "answer": f"{r}\n#### {gold}"} for q, r, _, _, gold in MEMORISED]
    return rows + [{"question": UNSEEN[0], "answer": f"It is butterscotch.\n#### {UNSEEN[1]}"}]


def train_memorised(folder: Path, out: Path) -> Path:
    """Train the tiny model in `folder` on MEMORISED (all response tokens, full batch) and save it to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkey.format import render
    from sftkey.loss import IGNORE_INDEX, loss_spec, shifted_targets, weighted_loss
    from sftkey.tokenize import tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    items = [(str(i), q, render(r, a, fmt == "tagged")) for i, (q, r, a, fmt, _) in enumerate(MEMORISED)]
    examples = tokenize_examples(tokenizer, items)
    spec = loss_spec("sft")
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), tokenizer.pad_token_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    weights = torch.zeros((len(examples), width))
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        row_labels, row_weights = shifted_targets(example.input_ids, spec.token_weights(example.roles))
        ids[row, :n], labels[row, :n] = torch.tensor(example.input_ids), torch.tensor(row_labels)
        weights[row, :n], mask[row, :n] = torch.tensor(row_weights), 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(TRAIN_STEPS):
        loss = weighted_loss(model(input_ids=ids, attention_mask=mask).logits, labels, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.01, f"the tiny model did not memorise its answers (loss {loss.item():.3f})"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "sftkey.json").write_text(json.dumps({"arm": "memorised", "seed": 3, "stage": "sft", "step": TRAIN_STEPS}))
    return out


@pytest.fixture(scope="session")
def memorised_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    return train_memorised(tiny_model_dir, tmp_path_factory.mktemp("memorised") / "checkpoint")


@pytest.fixture(scope="session")
def memorised_data(tmp_path_factory) -> Path:
    """A data folder laid out as ../shared/data, holding gsm8k/test.jsonl with the evaluation questions."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "gsm8k").mkdir()
    with open(folder / "gsm8k" / "test.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in gsm8k_rows())
    return folder
