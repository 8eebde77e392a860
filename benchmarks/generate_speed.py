"""Generation speed: sftkey's batched loop (`sftkey.generate`) against HF `model.generate` in padded batches.

Needs only torch, transformers and this repository (no datasets, no network), so it runs on a bare GPU box:

    python benchmarks/generate_speed.py --model ~/.cache/sftkey/models/SmolLM2-135M-Instruct \
        --data ../shared/data/gsm8k/test.jsonl --batch-size 448 --dtype bfloat16

--random-weights builds the model from the folder's config.json with random weights (same speed per token, and
only config + tokenizer files need to travel); greedy decoding of a random model rarely emits eos, so every
answer runs to the cap: a worst case. Prints one JSON line per implementation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when it is not installed

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


def run_sftkey(model, tokenizer, prompts, batch_size, max_new_tokens) -> list[tuple[str, int]]:
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    return [(g.output, g.n_tokens) for g in generate(model, tokenizer, prompts, config)]


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


IMPLEMENTATIONS = {"sftkey": run_sftkey, "hf": run_hf}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder (config.json, tokenizer; weights unless --random-weights)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="JSONL with a `question` field (default: GSM8K test)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--impl", choices=[*IMPLEMENTATIONS, "both"], default="both")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--random-weights", action="store_true", help="random init from config.json (a worst case: no eos)")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model, tokenizer = load(args.model, dtype, device, args.random_weights)
    questions = load_questions(Path(args.data), args.limit)
    prompts = [(f"q{i}", format_prompt(tokenizer, q)) for i, q in enumerate(questions)]
    IMPLEMENTATIONS["sftkey"](model, tokenizer, prompts[:4], 4, 8)  # warm-up: kernels, allocator, caches
    outputs = {}
    names = list(IMPLEMENTATIONS) if args.impl == "both" else [args.impl]
    for name in names:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        outputs[name] = IMPLEMENTATIONS[name](model, tokenizer, prompts, args.batch_size, args.max_new_tokens)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tokens = sum(n for _, n in outputs[name])
        print(json.dumps({
            "impl": name, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "dtype": dtype, "random_weights": args.random_weights, "questions": len(prompts),
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "seconds": round(seconds, 2),
            "new_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "capped_share": round(sum(n == args.max_new_tokens for _, n in outputs[name]) / len(prompts), 3),
        }), flush=True)
    if len(outputs) == 2:
        same = sum(a == b for a, b in zip(outputs["sftkey"], outputs["hf"]))
        print(json.dumps({"identical_outputs": f"{same}/{len(prompts)}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
