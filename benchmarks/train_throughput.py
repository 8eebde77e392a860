"""Training throughput: sftkey's step (packed rows, output layer on weighted tokens only) for each arm's loss,
side by side with its peers on the same model, data and batch order: TRL's `SFTTrainer` padding-free (each batch
flattened into one row, loss on the same weighted tokens) and a plain loop (HF forward with labels, padded batches,
loss on all positions). Prints tokens/s, padding share, MFU and each row's ratio to TRL and to the plain loop.

Its own and the plain rows need only torch, transformers and this repository (no accelerate, datasets or network),
so they run on a bare GPU box (the TRL row needs trl, which brings accelerate and datasets):

    python benchmarks/train_throughput.py --model ~/.cache/sftkey/models/SmolLM2-135M-Instruct \
        --data ../shared/data/gsm8k/train.jsonl --batch-size 32 --steps 10

--random-weights builds the model from the folder's config.json (same speed; only config and tokenizer files need
to travel); --shape llama-1b builds Llama-3.2-1B's body (random weights) on the folder's tokenizer, a 1B-class shape. tokens/s counts real (non-pad) tokens. MFU = 6 x parameters x tokens/s / peak: the model FLOPs of a
full forward+backward per real token (attention's sequence-length term left out), over the matmul rate measured
here in fp32 (and in bf16 when --precision bf16; the higher of a measurement before and after the rows, so that a
burst of load on a shared machine does not set the peak), and on a known GPU also over its dense bf16 datasheet peak.
--precision runs every row in that precision (autocast; weights and optimizer state stay fp32). Without trl
installed (`pip install -e .[bench]`) the TRL row prints why it was skipped and the ratios use the plain loop.
--rounds N runs all rows N times in turn (interleaved, so load on a shared machine hits them alike): medians.
--threads N gives every row N CPU cores: sftkey's step its work threads (pieces of the step, one per example, as
the trainer runs them on a CPU), the peers N torch threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when it is not installed

from benchmarks.peers import Row, machine, matmul_peak, mfu, skipped_row, table  # noqa: E402
from sftkey.data import DataConfig  # noqa: E402
from sftkey.loss import IGNORE_INDEX, LossParts, loss_spec, normalize  # noqa: E402
from sftkey.prepare import PrepareConfig, prepare  # noqa: E402
from sftkey.cpu_threads import add_gradients, ordered_map  # noqa: E402
from sftkey.train.batching import StagePlan, example_pieces, micro_batch, stage_samples  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
DEFAULT_MODEL = Path.home() / ".cache" / "sftkey" / "models" / "SmolLM2-135M-Instruct"
ARMS = {  # row name -> (loss preset, preset arguments); SFT and SFT-Tag train the same loss
    "sft_tag": ("sft", {}),
    "key_tag": ("key", {}),
    "weighted": ("weighted", {"w_thinking": 1.0, "w_answer": 5.0}),
    "dft": ("dft", {}),
}
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, no sparsity
PLAIN, TRL = "plain HF loop (padded, all positions)", "TRL SFTTrainer (padding-free)"
# --shape: the body of another model on the folder's tokenizer and vocabulary (random weights; speed needs no more)
SHAPES = {
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,  # Llama-3.2-1B's body:
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},    # ~1.07B with SmolLM2's vocab
}


def load(model_dir: str, random_weights: bool, device: str, attn: str, shape: str | None = None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    if random_weights or shape:
        config = AutoConfig.from_pretrained(model_dir, **SHAPES[shape] if shape else {})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn,
                                                     use_safetensors=True)
    return model.to(device).train(), tokenizer


def peak_flops(device: str, precision: str) -> dict[str, float]:
    """Peaks MFU is held against, by label: the measured fp32 matmul rate, the bf16 one when running bf16, and on a
    known GPU its dense bf16 datasheet figure."""
    import torch

    peaks = {"fp32 mm": matmul_peak(device, torch.float32)}
    if precision == "bf16":
        peaks["bf16 mm"] = matmul_peak(device, torch.bfloat16)
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        peaks.update({"datasheet bf16": flops for key, flops in GPU_PEAK_BF16.items() if key in name})
    return peaks


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

    from sftkey.train.attention import is_flash
    from sftkey.train.compile import compile_loss_model
    from sftkey.train.objective import LossModel

    loss_model = LossModel(model, sparse_logits=not args.dense_logits,
                           varlen=not args.no_packing and is_flash(args.attn))
    compile_loss_model(loss_model, args.compile)
    # as the trainer: fused AdamW; on a CPU one piece per example, on --threads work threads (sftkey.cpu_threads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step_seconds = []  # every step's wall time: the first one carries the compile warm-up

    def step(indices):
        began = time.perf_counter()
        pieces = example_pieces(samples, indices, pad_id=0) if device == "cpu" else [
            micro_batch(samples, indices, pad_id=0, packing=not args.no_packing, pack_length=args.pack_length,
                        attn_implementation=args.attn)]
        denominator = torch.tensor(sum(samples[i].weight_sum for i in indices), device=device)

        def gradient(piece):
            inputs = {k: v.to(device) for k, v in piece.tensors.items()}
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                out = loss_model(**inputs, dft=spec.dft, all_roles=False)
                loss = normalize(LossParts(out["total"], denominator, denominator))
            return torch.autograd.grad(loss, trainable, allow_unused=True)

        for grads in ordered_map(gradient, pieces, args.threads if args.compile == "none" else 1):
            add_gradients(trainable, grads)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.compile != "none":  # a sync per step only where the warm-up is timed
            sync(device)
            step_seconds.append(time.perf_counter() - began)
        return sum(p.tokens for p in pieces), sum(p.slots for p in pieces)

    timed = time_steps(step, [plan.batch(s) for s in range(steps)], args.warmup, device)
    if args.compile != "none":  # reported apart: the rows' tokens/s are the steady steps only
        later = sorted(step_seconds[1:])
        warmup = step_seconds[0] - (later[len(later) // 2] if later else 0.0)
        print(json.dumps({"compile": args.compile, "compile_warmup_s": round(warmup, 2),
                          "first_step_s": round(step_seconds[0], 2)}), file=sys.stderr)
    return timed


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


def unshifted_labels(labels: list[int]) -> list[int]:
    """sftkey's labels (position t holds the target of t, token t+1) as HF labels (position t holds token t; the
    model shifts): the same weighted tokens, one position later."""
    return [IGNORE_INDEX] + labels[:-1]


def eager(model) -> None:
    """Undo `nn.Module.compile` (in place, as --compile does) on every module: calls go to forward again."""
    for module in model.modules():
        module._compiled_call_impl = None


def trl_missing() -> str:
    """Why the TRL row cannot run, or "" when it can."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return "pip install trl"
    return ""


def trl_rows(model, tokenizer, samples, plan, steps, args, device, dtype):
    """TRL's SFTTrainer, padding-free: each batch of `plan` flattened into one row, loss on sftkey's weighted
    tokens (labels given, prompt positions -100), same optimizer settings; timed from the end of the warm-up steps
    to the end of the last step by a callback (so its data collation is inside the timing, as for the other rows)."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    order = [i for s in range(steps) for i in plan.batch(s)]  # sequential sampling reads them in this order
    data = Dataset.from_dict({"input_ids": [samples[i].input_ids for i in order],
                              "labels": [unshifted_labels(samples[i].labels) for i in order]})
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            sync(device)
            marks.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            sync(device)
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=steps, learning_rate=1e-5,
            weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
            padding_free=True, packing=False, max_length=None,  # max_length: examples are already cut to --max-length
            train_sampling_strategy="sequential", bf16=dtype == torch.bfloat16, fp16=False, use_cpu=device == "cpu",
            gradient_checkpointing=False, dataloader_num_workers=0, report_to="none", save_strategy="no",
            logging_strategy="no", disable_tqdm=True, seed=0,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line would land inside the table
        trainer.train()
    tokens = sum(len(samples[i]) for s in range(args.warmup, steps) for i in plan.batch(s))
    return marks[-1] - marks[args.warmup], tokens, tokens  # one row, no padding


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (config.json, tokenizer; weights unless --random-weights)")
    parser.add_argument("--random-weights", action="store_true", help="random weights from the folder's config.json")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="random weights in this model body on the folder's tokenizer (e.g. llama-1b: 1B class)")
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
    parser.add_argument("--compile", choices=["none", "regional", "model"], default="none",
                        help="sftkey rows: torch.compile each decoder layer or the whole loss model (train.compile); "
                             "the warm-up is printed apart, keep --warmup >= 1 so tokens/s are steady steps")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="every row under this autocast precision (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--rounds", type=int, default=1, help="run every row this many times, interleaved (medians)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU cores each row may use: sftkey's work threads (one torch thread each), the peers' "
                             "torch threads; the matmul peak is measured on as many")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    steps = args.steps + args.warmup
    model, tokenizer = load(args.model, args.random_weights, device, args.attn, args.shape)
    n_params = sum(p.numel() for p in model.parameters())
    data = DataConfig("gsm8k", path=args.data, limit=args.limit or args.batch_size * steps)
    prepared = prepare(PrepareConfig(data, tagged=True, max_length=args.max_length), tokenizer)
    peaks = peak_flops(device, precision)
    host = f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, " \
           f"threads {torch.get_num_threads()}"
    print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "host": host,
                      "machine": machine(device), "precision": precision, "shape": args.shape, "parameters": n_params,
                      "examples": len(prepared.examples), "batch_size": args.batch_size, "timed_steps": args.steps,
                      "warmup_steps": args.warmup, "rounds": args.rounds, "peak_flops": peaks}), flush=True)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sft_samples, _ = stage_samples(prepared.examples, loss_spec("sft"))
    sft_plan = StagePlan([len(s) for s in sft_samples], args.batch_size, seed=0, stage_index=0, bucket=False)
    no_trl = trl_missing()
    runs: dict[str, list[tuple[float, int, int]]] = {}  # row name -> (seconds, tokens, slots) per round
    for _ in range(args.rounds):
        model.load_state_dict(initial)
        eager(model)  # the peers never run the layers a previous round's --compile compiled in place
        runs.setdefault(PLAIN, []).append(plain_rows(model, sft_samples, sft_plan, steps, args, device, dtype))
        if not no_trl:  # the SFT loss: the tokens sft_tag weights, the same batches
            model.load_state_dict(initial)
            runs.setdefault(TRL, []).append(trl_rows(model, tokenizer, sft_samples, sft_plan, steps, args, device, dtype))
        for name in args.arms.split(","):
            preset, preset_args = ARMS[name]
            spec = loss_spec(preset, **preset_args)
            samples, _ = stage_samples(prepared.examples, spec)
            plan = StagePlan([len(s) for s in samples], args.batch_size, seed=0, stage_index=0, bucket=args.no_packing)
            model.load_state_dict(initial)
            runs.setdefault(f"sftkey {name}", []).append(sftkey_rows(model, samples, plan, steps, args, spec, device, dtype))

    for label, peak in peak_flops(device, precision).items():  # again: a load at the start must not set the peak
        peaks[label] = max(peaks[label], peak)
    rows = [skipped_row(TRL, no_trl)] if no_trl else []
    for name, results in runs.items():
        rates = sorted(tokens / seconds for seconds, tokens, _ in results)
        rate = rates[len(rates) // 2]  # median (upper, for an even count)
        tokens, slots = sum(r[1] for r in results), sum(r[2] for r in results)
        cells = {"padding": f"{1 - tokens / slots:.1%}"}
        cells.update({f"MFU ({label})": f"{mfu(n_params, rate, peak):.1%}" for label, peak in peaks.items()})
        rows.append(Row(name, rate, cells=cells))
        print(json.dumps({"loop": name, "tokens_per_s": rate, "rounds": rates, "padding_share": 1 - tokens / slots,
                          "mfu": {label: mfu(n_params, rate, peak) for label, peak in peaks.items()}}), file=sys.stderr)
    rows.sort(key=lambda row: (row.name != PLAIN, row.name != TRL))  # peers first
    print(f"machine: {machine(device)}; {precision}; threads {torch.get_num_threads()}; peaks: "
          + ", ".join(f"{label} {peak / 1e9:,.1f} GFLOP/s" for label, peak in peaks.items()))
    print(table(rows, {"TRL": TRL, "plain": PLAIN}, ["padding", *(f"MFU ({label})" for label in peaks)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
