"""Batched generation of responses: length-sorted batches, a KV cache, and a stop per sequence.

Each batch is left-padded and prefilled once; then one token per live row per step. A row stops at the
turn-closing token (eos) or at the new-token cap. Finished rows are dropped from the batch (and from the
KV cache) once enough of them have finished, so a batch costs what its live rows cost, and the loop ends
as soon as the last row stops.

That loop is the default backend; `GenerationConfig.backend` picks another engine (sftkey.generate_backends:
a static cache + CUDA graphs, transformers' continuous batching, vLLM) that yields the same records.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

STOP_EOS = "eos"  # the model closed its turn
STOP_LENGTH = "length"  # the new-token cap was reached first

# Drop finished rows once this share of the live rows has finished: dropping copies the KV cache, so
# doing it for every single finished row would cost more than it saves on a large batch.
DROP_FINISHED_SHARE = 0.125
GENERIC_MAX_NEW_TOKENS = 256  # when nothing says otherwise; `sftkey eval` sets one per data set


@dataclass
class GenerationConfig:
    """How responses are generated."""

    max_new_tokens: int | None = field(default=None, metadata={
        "help": f"cap on new tokens per response; None: {GENERIC_MAX_NEW_TOKENS} (sftkey eval: the data set's cap)"})
    batch_size: int = field(default=16, metadata={"help": "prompts per batch (batches hold prompts of similar length)"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; > 0: sample from softmax(logits / temperature)"})
    seed: int = field(default=0, metadata={"help": "seed of the sampler (unused when greedy)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    threads: int | None = field(default=None, metadata={
        "help": "greedy on a CPU with backend sftkey: batches run on this many threads at once (one torch thread "
                "each); the outputs do not depend on it (each batch is computed alone). None: one per core "
                "($SFTKEY_CPU_THREADS caps it)"})
    backend: str = field(default="sftkey", metadata={
        "help": "sftkey (this loop; fastest on CPU), static (static KV cache, CUDA graphs on GPU), continuous "
                "(transformers' continuous batching, paged attention) or vllm (when installed); greedy outputs "
                "equal HF generate's on the same dtype"})

    def __post_init__(self):
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (None: one per core), got {self.threads}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        from sftkey.generate_backends import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


@dataclass
class Generation:
    uid: str
    prompt: str
    output: str  # the decoded new tokens, without the closing eos
    n_tokens: int  # new tokens generated, the closing eos included
    stop_reason: str  # STOP_EOS or STOP_LENGTH


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokenizer's eos and any eos ids of the model's generation config: each closes the turn."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no eos token: set tokenizer.eos_token to the turn-closing token")
    return ids


def generate(model, tokenizer, prompts: list[tuple[str, str]], config: GenerationConfig | None = None) -> list[Generation]:
    """Responses to (uid, prompt text) pairs, in the order given."""
    by_uid = {g.uid: g for batch in generate_batches(model, tokenizer, prompts, config) for g in batch}
    return [by_uid[uid] for uid, _ in prompts]


def generate_batches(
    model, tokenizer, prompts: list[tuple[str, str]], config: GenerationConfig | None = None
) -> Iterator[list[Generation]]:
    """Yield the responses one batch at a time (longest prompts first), so the caller can save as it goes.

    Prompts are tokenized without added special tokens: the prompt text already is the full chat prompt.
    """
    import torch
    from tqdm import tqdm

    config = config or GenerationConfig()
    if config.max_new_tokens is None:
        config = dataclasses.replace(config, max_new_tokens=GENERIC_MAX_NEW_TOKENS)
    if len({uid for uid, _ in prompts}) != len(prompts):
        raise ValueError("prompt uids must be unique")
    if not prompts:
        return
    ids = tokenizer([text for _, text in prompts], add_special_tokens=False)["input_ids"]
    max_positions = getattr(model.config, "max_position_embeddings", None)
    for (uid, _), prompt_ids in zip(prompts, ids):
        if max_positions and len(prompt_ids) + config.max_new_tokens > max_positions:
            raise ValueError(
                f"prompt {uid!r} has {len(prompt_ids)} tokens; with max_new_tokens {config.max_new_tokens} it "
                f"exceeds the model's {max_positions} positions: lower max_new_tokens or drop the example"
            )
    from sftkey.generate_backends import check_backend, run_backend

    check_backend(config.backend, config.temperature, _device(model))
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    generator = None
    if config.temperature > 0:
        generator = torch.Generator(device=_device(model)).manual_seed(config.seed)
    bar = tqdm(total=len(prompts), desc="generating", unit="q", disable=not config.progress)
    started, produced = time.perf_counter(), 0
    try:
        for batch, new_tokens, reasons in run_backend(config.backend, model, ids, order, stops, pad_id, config,
                                                      generator):
            out = []
            for i, tokens, reason in zip(batch, new_tokens, reasons):
                uid, prompt = prompts[i]
                text_ids = tokens[:-1] if reason == STOP_EOS else tokens
                out.append(Generation(uid, prompt, tokenizer.decode(text_ids), len(tokens), reason))
                produced += len(tokens)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{produced / (time.perf_counter() - started):.0f}")
            yield out
    finally:
        bar.close()


def _device(model) -> "torch.device":
    return next(model.parameters()).device


def generate_ids(
    model, prompts: list[list[int]], stops: set[int], pad_id: int, config: GenerationConfig, generator=None
) -> tuple[list[list[int]], list[str]]:
    """New token ids of one batch (the closing eos included) and each row's stop reason."""
    import torch
    from transformers import DynamicCache

    device = _device(model)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every row's next token goes in the last column
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, width]: pads share position 0, masked anyway
    stop_tensor = torch.tensor(sorted(stops), device=device)

    tokens: list[list[int]] = [[] for _ in prompts]
    reasons = [STOP_LENGTH] * len(prompts)
    rows = list(range(len(prompts)))  # original row of each live row
    finished = [False] * len(prompts)  # by live row
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        ).logits[:, -1, :]  # [B, V]
        next_positions = positions[:, -1:] + 1  # [B, 1]
        for step in range(config.max_new_tokens):
            chosen = _pick(logits, config.temperature, generator)  # [b]
            is_stop = torch.isin(chosen, stop_tensor)
            for live, (token, stop) in enumerate(zip(chosen.tolist(), is_stop.tolist())):
                if finished[live]:
                    continue
                tokens[rows[live]].append(token)
                if stop:
                    finished[live] = True
                    reasons[rows[live]] = STOP_EOS
            if all(finished) or step == config.max_new_tokens - 1:
                break
            if sum(finished) >= max(1, DROP_FINISHED_SHARE * len(rows)):
                keep = [live for live, done in enumerate(finished) if not done]
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                chosen, mask, next_positions = chosen[index], mask[index], next_positions[index]
                rows = [rows[live] for live in keep]
                finished = [False] * len(rows)
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            logits = model(
                input_ids=chosen[:, None], attention_mask=mask, position_ids=next_positions,
                past_key_values=cache, use_cache=True,
            ).logits[:, -1, :]
            next_positions = next_positions + 1
    return tokens, reasons


def _pick(logits: "torch.Tensor", temperature: float, generator) -> "torch.Tensor":
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
