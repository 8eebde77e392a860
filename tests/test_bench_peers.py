"""The benchmarks' peer rows and ratios: benchmarks/peers.py's arithmetic and table, the TRL row's labels and
its skipping when trl is missing, the llama.cpp row's loop and its skipping (the benchmarks themselves time
real models: never in the test suite; the end-to-end runs here use the tiny model)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARITH = REPO / "tests" / "train" / "fixtures" / "arith.jsonl"  # 24 GSM8K-form records


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peers():
    yield _load("peers")
    del sys.modules["peers"]


@pytest.fixture(scope="module")
def train_bench():
    yield _load("train_throughput")
    del sys.modules["train_throughput"]


@pytest.fixture(scope="module")
def gen_bench():
    yield _load("generate_speed")
    del sys.modules["generate_speed"]


LSCPU = """Architecture:            x86_64
Model name:              Intel(R) Xeon(R) Platinum 8480+
Flags:                   fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_int8
"""


def test_cpu_summary_names_the_model_and_the_speed_flags(peers):
    assert peers.cpu_summary(LSCPU) == "Intel(R) Xeon(R) Platinum 8480+; avx2 avx512f avx512_bf16 amx_tile; no amx_bf16"
    assert peers.cpu_summary("Model name: AMD EPYC\nFlags: fpu avx2 fma\n") == \
        "AMD EPYC; avx2; no avx512f avx512_bf16 amx_bf16 amx_tile"
    assert peers.cpu_summary("") == "unknown CPU; none of avx2 avx512f avx512_bf16 amx_bf16 amx_tile"


def test_ratio_mfu_and_bandwidth_arithmetic(peers):
    assert peers.ratio(150.0, 100.0) == "1.50x"
    assert peers.ratio(100.0, 300.0) == "0.33x"
    assert [peers.ratio(None, 100.0), peers.ratio(100.0, None), peers.ratio(100.0, 0.0)] == ["n/a"] * 3
    assert peers.mfu(1000, 2.0, 48000.0) == 0.25  # 6 x 1000 parameters x 2 tokens/s = 12,000 FLOP/s
    assert peers.bandwidth_share(100_000_000, 20.0, 8e9) == 0.25  # 2 GB/s of weights read over 8 GB/s


def test_table_prints_a_skipped_peer_and_ratios_to_the_rows_that_ran(peers):
    rows = [peers.Row("plain", 100.0, cells={"MFU": "10.0%"}), peers.skipped_row("TRL", "pip install trl"),
            peers.Row("sftkey", 150.0, cells={"MFU": "15.0%"})]
    assert peers.table(rows, {"TRL": "TRL", "plain": "plain"}, ["MFU"]) == "\n".join([
        "| row | tokens/s | MFU | vs TRL | vs plain |",
        "|---|---|---|---|---|",
        "| plain | 100.0 | 10.0% | n/a | 1.00x |",
        "| TRL | skipped: pip install trl |  | n/a | n/a |",
        "| sftkey | 150.0 | 15.0% | n/a | 1.50x |",
    ])


def test_machine_reads_lscpu_on_cpu(peers):
    assert peers.machine("cpu").split(";")[0].strip()  # a model name (or "unknown CPU" where lscpu is missing)


def test_trl_labels_are_sftkeys_targets_one_position_later(train_bench):
    # sftkey: position t holds the target of t (token t+1); HF/TRL: position t holds token t, the model shifts
    assert train_bench.unshifted_labels([-100, 7, 8, -100]) == [-100, -100, 7, 8]


def test_training_benchmark_skips_trl_when_missing_and_compares_to_the_plain_loop(train_bench, tiny_model_dir,
                                                                               monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError
    assert train_bench.trl_missing() == "pip install trl"
    argv = ["--model", str(tiny_model_dir), "--data", str(ARITH), "--batch-size", "4", "--steps", "1",
            "--warmup", "0", "--arms", "sft_tag", "--precision", "fp32"]
    assert train_bench.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    header = json.loads(out[0])
    assert (header["precision"], header["examples"], header["batch_size"], list(header["peak_flops"])) == \
        ("fp32", 4, 4, ["fp32 mm"])
    assert out[-6].startswith("machine: ") and " peaks: fp32 mm " in out[-6]
    assert out[-5] == "| row | tokens/s | padding | MFU (fp32 mm) | vs TRL | vs plain |"
    cells = [line.split(" | ") for line in out[-3:]]
    assert [c[0] for c in cells] == ["| plain HF loop (padded, all positions)", "| TRL SFTTrainer (padding-free)",
                                     "| sftkey sft_tag"]
    assert cells[0][-2:] == ["n/a", "1.00x |"]
    assert cells[1][1:] == ["skipped: pip install trl", "", "", "n/a", "n/a |"]
    assert cells[2][-2] == "n/a" and cells[2][-1].endswith("x |")


@pytest.mark.slow
def test_trl_row_trains_the_same_loss_on_the_same_batch(train_bench, tiny_model_dir):
    """TRL's padding-free loss on a batch equals sftkey's SFT loss on it: the two rows do the same work."""
    pytest.importorskip("trl")
    import tempfile

    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from sftkey.data import DataConfig
    from sftkey.loss import LossParts, loss_spec, normalize
    from sftkey.prepare import PrepareConfig, prepare
    from sftkey.train.batching import micro_batch, stage_samples
    from sftkey.train.objective import LossModel

    model, tokenizer = train_bench.load(str(tiny_model_dir), False, "cpu", "sdpa")
    prepared = prepare(PrepareConfig(DataConfig("gsm8k", path=str(ARITH), limit=4), tagged=True, max_length=512),
                       tokenizer)
    samples, _ = stage_samples(prepared.examples, loss_spec("sft"))
    batch = micro_batch(samples, [0, 1, 2, 3], pad_id=0, packing=True, pack_length=1024)
    with torch.no_grad():
        total = LossModel(model, sparse_logits=True)(**batch.tensors, dft=False, all_roles=False)["total"]
    denominator = torch.tensor(sum(s.weight_sum for s in samples))
    ours = normalize(LossParts(total, denominator, denominator)).item()
    data = Dataset.from_dict({"input_ids": [s.input_ids for s in samples],
                              "labels": [train_bench.unshifted_labels(s.labels) for s in samples]})
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, per_device_train_batch_size=4, max_steps=1, learning_rate=0.0,
                           padding_free=True, max_length=None, train_sampling_strategy="sequential", use_cpu=True,
                           report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
        trainer.train()
    theirs = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    assert theirs == pytest.approx(ours, rel=1e-5)


def test_llama_cpp_row_is_skipped_with_the_reason(gen_bench, tiny_model_dir, monkeypatch):
    assert gen_bench.llama_cpp_missing("none", str(tiny_model_dir)) == (None, "--gguf none")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert gen_bench.llama_cpp_missing("auto", str(tiny_model_dir)) == (None, "pip install llama-cpp-python")
    assert gen_bench.default_gguf(str(tiny_model_dir)) == \
        (None, f"{tiny_model_dir} was not converted from a GGUF we know: pass --gguf FILE")


class FakeLlama:
    """Yields a fixed continuation per prompt length, as `llama_cpp.Llama.generate` yields greedy tokens."""

    def __init__(self, continuations):
        self.continuations, self.seen = continuations, []

    def generate(self, ids, **kwargs):
        self.seen.append((list(ids), kwargs["temp"], kwargs["top_k"]))
        yield from self.continuations[len(self.seen) - 1]


def test_llama_cpp_loop_stops_at_eos_or_the_cap_and_counts_forward_passes(gen_bench, tiny_tokenizer):
    prompts = [("q0", "ab"), ("q1", "cd")]
    eos = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    llm = FakeLlama([[5, 6, eos, 9], [7, 8, 9, 10, 11]])
    results, steps = gen_bench.run_llama_cpp(llm, tiny_tokenizer, prompts, 4, {eos})
    assert [n for _, n in results] == [3, 4]  # eos counted as a new token (as in the torch rows), cap 4
    assert results[0][0] == tiny_tokenizer.decode([5, 6])
    assert steps == (1 + 3) + (1 + 4)  # one prefill per prompt + one pass per new token
    assert [seen[0] for seen in llm.seen] == [tiny_tokenizer("ab", add_special_tokens=False)["input_ids"],
                                             tiny_tokenizer("cd", add_special_tokens=False)["input_ids"]]
    assert {(temp, top_k) for _, temp, top_k in llm.seen} == {(0.0, 1)}  # greedy


def test_forward_counter_counts_model_calls(gen_bench, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    counter = gen_bench.ForwardCounter(model)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
        model(torch.tensor([[4]]))
    assert counter.take() == 2
    assert counter.take() == 0


def test_eager_undoes_in_place_compile_for_the_peer_rows(train_bench):
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].compile()  # nothing is compiled until a call
    assert model[0]._compiled_call_impl is not None
    train_bench.eager(model)
    assert [m._compiled_call_impl for m in model.modules()] == [None, None, None]
    x = torch.ones(1, 2)
    assert torch.equal(model(x), model[1](model[0].forward(x)))
