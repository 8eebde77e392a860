"""Generation backends: each one that runs on CPU gives HF `generate`'s greedy tokens on the same left-padded batch,
and the same Generation records as the default loop; the ones that cannot run here say why and what to use."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from sftkey.config_file import ConfigError
from sftkey.generate import STOP_EOS, STOP_LENGTH, GenerationConfig, generate, stop_token_ids
from sftkey.generate_backends import BACKENDS, cpu_num_blocks, split_at_stop
from sftkey.tokenize import format_prompt

from test_generate import MAX_NEW
from test_generate import QUESTIONS as LOOP_QUESTIONS

QUESTIONS = [*LOOP_QUESTIONS, "( 76.0 - 25.0 ) = 51"]  # one more: a last batch of one row with batch 3
CPU_BACKENDS = ("sftkey", "static", "continuous")


def prompts(tokenizer) -> list[tuple[str, str]]:
    return [(f"q{i}", format_prompt(tokenizer, q)) for i, q in enumerate(QUESTIONS)]


def hf_greedy(model, tokenizer, pairs, batch_size: int) -> dict[str, list[int]]:
    """HF generate, greedy, on the same left-padded batches (longest prompts first), cut after the first stop id."""
    stops = stop_token_ids(model, tokenizer)
    lengths = {uid: len(tokenizer(p, add_special_tokens=False)["input_ids"]) for uid, p in pairs}
    ordered = sorted(pairs, key=lambda pair: -lengths[pair[0]])
    tokenizer.padding_side = "left"
    result = {}
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        encoded = tokenizer([p for _, p in batch], add_special_tokens=False, padding=True, return_tensors="pt")
        out = model.generate(**encoded, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=sorted(stops),
                             pad_token_id=tokenizer.pad_token_id)
        for (uid, _), row in zip(batch, out[:, encoded["input_ids"].shape[1] :].tolist()):
            result[uid] = split_at_stop(row, stops, MAX_NEW)[0]
    return result


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_greedy_equals_hf_generate_on_the_same_batches(model_and_tokenizer, backend):
    model, tokenizer = model_and_tokenizer
    pairs = prompts(tokenizer)
    stops = stop_token_ids(model, tokenizer)
    expected = hf_greedy(model, tokenizer, pairs, batch_size=4)
    config = GenerationConfig(max_new_tokens=MAX_NEW, batch_size=4, progress=False, backend=backend)
    results = generate(model, tokenizer, pairs, config)
    assert [g.uid for g in results] == [uid for uid, _ in pairs]
    for g in results:
        tokens = expected[g.uid]
        ended = tokens[-1] in stops
        assert (g.n_tokens, g.stop_reason) == (len(tokens), STOP_EOS if ended else STOP_LENGTH), g.uid
        assert g.output == tokenizer.decode(tokens[:-1] if ended else tokens), g.uid
    reasons = [g.stop_reason for g in results]
    assert STOP_EOS in reasons and STOP_LENGTH in reasons  # both ways of stopping were exercised
    assert len({g.n_tokens for g in results}) >= 3  # rows stopped at different steps


def test_every_cpu_backend_gives_the_default_loops_records(model_and_tokenizer):
    """Same uids, prompts, outputs, token counts and stop reasons, including a last batch smaller than the rest
    (static fills it with dummy rows) and a batch size that does not divide the prompts."""
    model, tokenizer = model_and_tokenizer
    pairs = prompts(tokenizer)
    base = GenerationConfig(max_new_tokens=MAX_NEW, batch_size=3, progress=False)
    default = [dataclasses.astuple(g) for g in generate(model, tokenizer, pairs, base)]
    for backend in CPU_BACKENDS[1:]:
        config = dataclasses.replace(base, backend=backend)
        assert [dataclasses.astuple(g) for g in generate(model, tokenizer, pairs, config)] == default, backend


def test_static_sampling_is_reproducible_by_seed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    pairs = prompts(tokenizer)

    def sample(seed):
        config = GenerationConfig(max_new_tokens=12, batch_size=3, temperature=1.0, seed=seed, progress=False,
                                  backend="static")
        return [g.output for g in generate(model, tokenizer, pairs, config)]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_split_at_stop_keeps_the_first_stop_and_cuts_at_the_cap():
    assert split_at_stop([5, 7, 2, 9], {2}, 10) == ([5, 7, 2], STOP_EOS)
    assert split_at_stop([5, 7, 8, 9], {2}, 3) == ([5, 7, 8], STOP_LENGTH)
    assert split_at_stop([5, 2], {2, 5}, 3) == ([5], STOP_EOS)


def test_cpu_paged_cache_holds_the_longest_requests_of_one_batch():
    # longest two of (10+30, 50+30, 3+30) tokens in blocks of 32: 80 -> 3 + 1 spare, 40 -> 2 + 1 spare
    assert cpu_num_blocks([[0] * 10, [0] * 50, [0] * 3], 30, 2) == 7


def test_unknown_backends_and_missing_engines_are_refused_with_the_fix(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match=r"backend must be one of sftkey, static, continuous, vllm, got 'fast'"):
        GenerationConfig(backend="fast")
    assert BACKENDS == ("sftkey", "static", "continuous", "vllm")
    pairs = prompts(tokenizer)[:1]
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(ConfigError, match=r"backend 'vllm' needs vLLM: `pip install vllm`"):
        generate(model, tokenizer, pairs, GenerationConfig(max_new_tokens=2, progress=False, backend="vllm"))
    with pytest.raises(ConfigError, match=r"backend 'continuous' is greedy only \(temperature 0.7\)"):
        generate(model, tokenizer, pairs, GenerationConfig(max_new_tokens=2, temperature=0.7, progress=False,
                                                           backend="continuous"))


def test_vllm_is_refused_off_cuda_even_when_installed(model_and_tokenizer, monkeypatch):
    import types

    model, tokenizer = model_and_tokenizer
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    with pytest.raises(ConfigError, match=r"backend 'vllm' runs on a CUDA GPU, not cpu: use backend 'sftkey' on CPU"):
        generate(model, tokenizer, prompts(tokenizer)[:1], GenerationConfig(max_new_tokens=2, progress=False,
                                                                             backend="vllm"))


# ---- `sftkey eval --backend` ----


def test_eval_command_with_another_backend_writes_the_same_rows(tiny_model_dir, tmp_path, capsys):
    import json
    import shutil

    from sftkey.cli import main
    from sftkey.evaluate import OUTPUTS, SUMMARY

    checkpoint = shutil.copytree(tiny_model_dir, tmp_path / "run-a")
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"{i} + 0 = {i}\n#### {i}"}) + "\n" for i, q in enumerate(QUESTIONS)))
    argv = ["eval", "--checkpoint", str(checkpoint), "--data-path", str(data), "--max-new-tokens", "4",
            "--batch-size", "3", "--no-progress"]
    rows = {}
    for backend in ("sftkey", "static"):
        assert main([*argv, "--backend", backend, "--out", str(tmp_path / backend)]) == 0
        rows[backend] = sorted((tmp_path / backend / OUTPUTS).read_text().splitlines())
        assert json.loads((tmp_path / backend / SUMMARY).read_text())["backend"] == backend
    assert len(rows["static"]) == len(QUESTIONS) and rows["static"] == rows["sftkey"]
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert main([*argv, "--backend", "continuous", "--temperature", "0.5", "--out", str(refused)]) == 2
    assert "backend 'continuous' is greedy only (temperature 0.5)" in capsys.readouterr().err
    assert not refused.exists()  # refused before the model loads: no output folder


def test_speed_benchmark_runs_every_backend_and_skips_the_missing_one(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "generate_speed.py"
    spec = importlib.util.spec_from_file_location("generate_speed_backends", script)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed, whatever this machine has
    argv = ["--model", str(tiny_model_dir), "--data", str(data), "--batch-size", "3", "--max-new-tokens", "5",
            "--device", "cpu", "--gguf", "none", "--impl", "static,continuous,vllm,hf"]
    assert benchmark.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    timed = [(r["impl"], r["new_tokens"], r["warmup_s"] is not None) for r in lines if "new_tokens" in r]
    assert timed == [("static", 35, True), ("continuous", 35, True), ("hf", 35, False)]
    assert {"impl": "vllm", "skipped": "generation backend 'vllm' needs vLLM: `pip install vllm` (a CUDA machine), "
            "or use backend 'static' or 'continuous'"} in lines
    assert {"identical_outputs": "7/7"} in lines
