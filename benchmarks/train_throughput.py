"""Training throughput: sftkey's step (packed rows, output layer on weighted tokens only) for each arm's loss,
side by side with a plain loop on the same model and data (HF forward with labels, padded batches, loss on all
positions). Prints tokens/s, padding share and MFU per row.

Needs only torch, transformers and this repository (no accelerate, datasets or network), so it runs on a bare GPU box:

    python benchmarks/train_throughput.py --model ~/.cache/sftkey/models/SmolLM2-135M-Instruct \
        --data ../shared/data/gsm8k/train.jsonl --batch-size 32 --steps 10

--random-weights builds the model from the folder's config.json (same speed; only config and tokenizer files need
to travel). tokens/s counts real (non-pad) tokens. MFU = 6 x parameters x tokens/s / peak: the model FLOPs of a
full forward+backward per real token (attention's sequence-length term left out), over the chip's dense bf16 peak
on a known GPU, or on CPU over the fp32 matmul rate measured here (so CPU MFU is "of what torch.mm reaches").
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when it is not installed

from sftkey.data import DataConfig  # noqa: E402
from sftkey.loss import IGNORE_INDEX, LossParts, loss_spec, normalize  # noqa: E402
from sftkey.prepare import PrepareConfig, prepare  # noqa: E402
from sftkey.train.batching import StagePlan, micro_batch, stage_samples  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
DEFAULT_MODEL = Path.home() / ".cache" / "sftkey" / "models" / "SmolLM2-135M-Instruct"
ARMS = {  # row name -> (loss preset, preset arguments); SFT and SFT-Tag train the same loss
    "sft_tag": ("sft", {}),
    "key_tag": ("key", {}),
    "weighted": ("weighted", {"w_thinking": 1.0, "w_answer": 5.0}),
    "dft": ("dft", {}),
}
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, no sparsity


def load(model_dir: str, random_weights: bool, device: str, attn: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    if random_weights:
        config = AutoConfig.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn,
                                                     use_safetensors=True)
    return model.to(device).train(), tokenizer


def peak_flops(device: str) -> tuple[float, str]:
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return flops, f"{name} dense bf16 peak"
        return float("nan"), f"{name}: peak unknown"
    n, reps = 1024, 10
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):  # best of five: a shared CPU is slowed by whatever else runs
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best, "best measured fp32 torch.mm rate"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step, batches, warmup: int, device: str) -> tuple[float, int, int]:
    """Seconds for the timed steps, their real tokens and computed slots (rows x width)."""
    for batch in batches[:warmup]:
        step(batch)
    sync(device)
    start = time.perf_counter()
    tokens = slots = 0
    for batch in batches[warmup:]:
        tokens_b, slots_b = step(batch)
        tokens, slots = tokens + tokens_b, slots + slots_b
    sync(device)
    return time.perf_counter() - start, tokens, slots


def sftkey_rows(model, samples, plan, steps, args, spec, device, dtype):
    """sftkey's step: the library's micro-batches and LossModel, one optimizer step per global batch."""
    import torch

    from sftkey.train.objective import LossModel

    loss_model = LossModel(model, sparse_logits=not args.dense_logits)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)

    def step(indices):
        batch = micro_batch(samples, indices, pad_id=0, packing=not args.no_packing, pack_length=args.pack_length)
        inputs = {k: v.to(device) for k, v in batch.tensors.items()}
        denominator = torch.tensor(sum(samples[i].weight_sum for i in indices), device=device)
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            out = loss_model(**inputs, dft=spec.dft, all_roles=False)
            loss = normalize(LossParts(out["total"], denominator, denominator))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch.tokens, batch.slots

    return time_steps(step, [plan.batch(s) for s in range(steps)], args.warmup, device)


def plain_rows(model, samples, plan, steps, args, device, dtype):
    """The usual loop: right-padded batch, attention mask, HF's own loss on every non-pad position."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)

    def step(indices):
        rows = [samples[i].input_ids for i in indices]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(map(len, rows)), len(rows) * width

    return time_steps(step, [plan.batch(s) for s in range(steps)], args.warmup, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (config.json, tokenizer; weights unless --random-weights)")
    parser.add_argument("--random-weights", action="store_true", help="random weights from the folder's config.json")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="GSM8K-format JSONL (question, answer with ####)")
    parser.add_argument("--limit", type=int, default=None, help="examples to load (default: batch-size x (steps + warmup))")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row")
    parser.add_argument("--max-length", type=int, default=1024, help="longest example kept (tokens)")
    parser.add_argument("--pack-length", type=int, default=1024, help="most tokens per packed row")
    parser.add_argument("--no-packing", action="store_true", help="sftkey rows use one padded row per example")
    parser.add_argument("--dense-logits", action="store_true", help="sftkey rows run the output layer on every position")
    parser.add_argument("--attn", default="sdpa", help="attention implementation")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    args = parser.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    steps = args.steps + args.warmup
    model, tokenizer = load(args.model, args.random_weights, device, args.attn)
    n_params = sum(p.numel() for p in model.parameters())
    data = DataConfig("gsm8k", path=args.data, limit=args.limit or args.batch_size * steps)
    prepared = prepare(PrepareConfig(data, tagged=True, max_length=args.max_length), tokenizer)
    peak, peak_source = peak_flops(device)
    host = f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, " \
           f"threads {torch.get_num_threads()}"
    print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "host": host,
                      "dtype": str(dtype), "parameters": n_params, "examples": len(prepared.examples),
                      "batch_size": args.batch_size, "timed_steps": args.steps, "peak_flops": peak,
                      "peak_source": peak_source}))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    samples, _ = stage_samples(prepared.examples, loss_spec("sft"))
    plan = StagePlan([len(s) for s in samples], args.batch_size, seed=0, stage_index=0, bucket=False)
    rows = [("plain HF loop (padded, all positions)",) + plain_rows(model, samples, plan, steps, args, device, dtype)]
    for name in args.arms.split(","):
        preset, preset_args = ARMS[name]
        spec = loss_spec(preset, **preset_args)
        samples, _ = stage_samples(prepared.examples, spec)
        plan = StagePlan([len(s) for s in samples], args.batch_size, seed=0, stage_index=0, bucket=args.no_packing)
        model.load_state_dict(initial)
        seconds, tokens, slots = sftkey_rows(model, samples, plan, steps, args, spec, device, dtype)
        rows.append((f"sftkey {name}", seconds, tokens, slots))

    print("| loop | tokens/s | padding | MFU |\n|---|---|---|---|")
    for name, seconds, tokens, slots in rows:
        rate = tokens / seconds
        mfu = 6 * n_params * rate / peak
        print(f"| {name} | {rate:,.0f} | {1 - tokens / slots:.1%} | {mfu:.1%} |")
        print(json.dumps({"loop": name, "tokens_per_s": rate, "padding_share": 1 - tokens / slots, "mfu": mfu,
                          "seconds": seconds, "tokens": tokens}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
