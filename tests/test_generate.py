"""Batched generation: the same tokens as one-prompt-at-a-time `model.generate`, a stop per row, batches by length."""

from __future__ import annotations

import pytest

from sftkey.generate import STOP_EOS, STOP_LENGTH, GenerationConfig, generate, generate_batches, stop_token_ids
from sftkey.tokenize import format_prompt

QUESTIONS = [
    "What is 2+2?",
    "Natalia sold clips to 48 of her friends in April. How many?",
    "x",
    "Weng earns $12 an hour for babysitting.",
    "abc def",
    "12 * 3 = 36",
]
MAX_NEW = 30


def prompts(tokenizer) -> list[tuple[str, str]]:
    return [(f"q{i}", format_prompt(tokenizer, q)) for i, q in enumerate(QUESTIONS)]


def reference(model, tokenizer, prompt: str) -> list[int]:
    """HF generate on the prompt alone (no padding), greedy, stopping at the same eos ids."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    stops = stop_token_ids(model, tokenizer)
    return new[: next((i + 1 for i, t in enumerate(new) if t in stops), len(new))]


def test_stop_ids_join_the_tokenizer_eos_and_the_generation_config(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert stop_token_ids(model, tokenizer) == {2, 141, 150}


@pytest.mark.parametrize("batch_size", [1, 4, 6])
def test_batched_greedy_equals_generate_one_prompt_at_a_time(model_and_tokenizer, batch_size):
    model, tokenizer = model_and_tokenizer
    pairs = prompts(tokenizer)
    config = GenerationConfig(max_new_tokens=MAX_NEW, batch_size=batch_size, progress=False)
    results = generate(model, tokenizer, pairs, config)
    assert [g.uid for g in results] == [uid for uid, _ in pairs]
    reasons = []
    for (uid, prompt), result in zip(pairs, results):
        expected = reference(model, tokenizer, prompt)
        ended = expected[-1] in stop_token_ids(model, tokenizer)
        assert result.prompt == prompt
        assert result.n_tokens == len(expected)
        assert result.stop_reason == (STOP_EOS if ended else STOP_LENGTH)
        assert result.output == tokenizer.decode(expected[:-1] if ended else expected)
        reasons.append(result.stop_reason)
    assert STOP_EOS in reasons and STOP_LENGTH in reasons  # both ways of stopping were exercised
    assert len({g.n_tokens for g in results}) >= 3  # rows left their batches at different steps


def test_batches_hold_prompts_of_similar_length_longest_first(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    pairs = prompts(tokenizer)
    lengths = {uid: len(tokenizer(p, add_special_tokens=False)["input_ids"]) for uid, p in pairs}
    config = GenerationConfig(max_new_tokens=2, batch_size=4, progress=False)
    batches = [[g.uid for g in batch] for batch in generate_batches(model, tokenizer, pairs, config)]
    by_length = sorted(lengths, key=lambda uid: -lengths[uid])
    assert [len(b) for b in batches] == [4, 2]
    assert set(batches[0]) == set(by_length[:4]) and set(batches[1]) == set(by_length[4:])


def test_sampling_is_reproducible_by_seed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    pairs = prompts(tokenizer)

    def sample(seed):
        config = GenerationConfig(max_new_tokens=12, batch_size=3, temperature=1.0, seed=seed, progress=False)
        return [g.output for g in generate(model, tokenizer, pairs, config)]

    greedy = [g.output for g in generate(model, tokenizer, pairs, GenerationConfig(max_new_tokens=12, progress=False))]
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1) != greedy


def test_bad_requests_are_refused_with_the_reason(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="prompt uids must be unique"):
        generate(model, tokenizer, [("a", "x"), ("a", "y")])
    too_long = GenerationConfig(max_new_tokens=model.config.max_position_embeddings, progress=False)
    with pytest.raises(ValueError, match=r"prompt 'a' has 1 tokens; with max_new_tokens 2048 it exceeds the model's 2048 positions"):
        generate(model, tokenizer, [("a", "x")], too_long)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match=r"temperature must be >= 0 \(0 is greedy\), got -1"):
        GenerationConfig(temperature=-1)
    assert generate(model, tokenizer, []) == []


def test_speed_benchmark_runs_and_both_ways_agree(tiny_model_dir, tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "generate_speed.py"
    spec = importlib.util.spec_from_file_location("generate_speed", script)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    argv = ["--model", str(tiny_model_dir), "--data", str(data), "--batch-size", "4", "--max-new-tokens", "6", "--device", "cpu"]
    assert benchmark.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r.get("impl"), r.get("questions"), r.get("new_tokens")) for r in lines[:2]] == [("sftkey", 6, 36), ("hf", 6, 36)]
    assert lines[2] == {"identical_outputs": "6/6"}
