"""Generation backends: the same greedy tokens as `sftkey.generate`'s loop, produced by engines that keep a GPU busy.

Every backend takes token-id prompts and yields `(prompt indices, new token ids, stop reasons)` chunks; the new
ids end with the closing eos when the stop reason is STOP_EOS. `sftkey.generate.generate_batches` turns them
into the same Generation records whichever backend ran, so scoring, resume and outputs.jsonl do not change.

- sftkey: the eager loop of sftkey.generate (drops finished rows; the default, fastest on CPU, where greedy
  batches run on one thread per core: sftkey.cpu_threads).
- static: a StaticCache of fixed shape per run; finished rows keep their slot, masked. On CUDA the decode step
  is compiled with CUDA graphs (torch.compile mode="reduce-overhead"); on CPU it runs eagerly.
- continuous: transformers' continuous batching (paged attention): requests join and leave the running batch
  one by one, so the GPU never waits for a batch's longest answer.
- vllm: vLLM's engine on the checkpoint folder, when `vllm` is installed.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Iterator

from sftkey.cpu_threads import cpu_threads, ordered_map
from sftkey.generate import STOP_EOS, STOP_LENGTH

if TYPE_CHECKING:
    import torch

    from sftkey.generate import GenerationConfig

BACKENDS = ("sftkey", "static", "continuous", "vllm")
DEFAULT_BACKEND = "sftkey"
SAMPLING_BACKENDS = ("sftkey", "static", "vllm")  # continuous: greedy only (its sampler is not seeded like ours)

Chunk = tuple[list[int], list[list[int]], list[str]]  # prompt indices, their new token ids, their stop reasons

STATIC_WIDTH_MULTIPLE = 64  # the static cache's prompt part is rounded up to this: one compiled shape per run
STATIC_CHECK_EVERY = 16  # decode steps between "has every row stopped?" checks (each check syncs with the host)
# On CPU transformers sizes the paged cache from the machine's RAM (tens of GB of blocks and masks: minutes of
# zero-filling); there we size it for the work instead, in blocks of this many tokens.
CPU_BLOCK_SIZE = 32
CPU_MAX_BATCH_TOKENS = 512


def check_backend(name: str, temperature: float, device: "torch.device | str") -> None:
    """Refuse a backend that cannot run here, naming the setting and the alternative."""
    from sftkey.config_file import ConfigError

    if name not in BACKENDS:
        raise ConfigError(f"generation backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if temperature > 0 and name not in SAMPLING_BACKENDS:
        raise ConfigError(f"generation backend {name!r} is greedy only (temperature {temperature}): use "
                          f"temperature 0, or backend {' or '.join(SAMPLING_BACKENDS)} to sample")
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ConfigError("generation backend 'vllm' needs vLLM: `pip install vllm` (a CUDA machine), or use "
                              "backend 'static' or 'continuous'") from None
        if str(device).split(":")[0] != "cuda":
            raise ConfigError(f"generation backend 'vllm' runs on a CUDA GPU, not {device}: use backend 'sftkey' on CPU")


def run_backend(name: str, model, ids: list[list[int]], order: list[int], stops: set[int], pad_id: int,
                config: "GenerationConfig", generator=None) -> Iterator[Chunk]:
    """Chunks of new tokens for prompts `ids`, visited in `order` (longest first), `config.batch_size` at a time."""
    from sftkey.generate import generate_ids

    if name == "sftkey":
        batches = list(_chunks(order, config.batch_size))

        def answer(batch: list[int]) -> Chunk:
            return (batch, *generate_ids(model, [ids[i] for i in batch], stops, pad_id, config, generator))

        yield from ordered_map(answer, batches, batch_threads(config, model, len(batches)))
    elif name == "static":
        yield from static_batches(model, ids, order, stops, pad_id, config, generator)
    elif name == "continuous":
        yield from continuous_batches(model, ids, order, stops, config)
    elif name == "vllm":
        yield from vllm_batches(model, ids, order, stops, config)
    else:
        raise ValueError(f"unknown generation backend {name!r}")


def batch_threads(config: "GenerationConfig", model, batches: int) -> int:
    """Threads for the sftkey loop's batches: config.threads (None: one per core) when greedy on a CPU, at most
    one per batch; 1 when sampling (one seeded generator, drawn from in batch order) or on a GPU (one stream)."""
    if config.temperature > 0 or next(model.parameters()).device.type != "cpu":
        return 1
    return min(cpu_threads(config.threads), batches)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def split_at_stop(row: list[int], stops: set[int], cap: int) -> tuple[list[int], str]:
    """A row's new tokens up to and including the first stop token (STOP_EOS), else its first `cap` (STOP_LENGTH)."""
    for k, token in enumerate(row[:cap]):
        if token in stops:
            return row[: k + 1], STOP_EOS
    return row[:cap], STOP_LENGTH


# ------------------------------------------------------------------------------------------------- static


def static_batches(model, ids: list[list[int]], order: list[int], stops: set[int], pad_id: int,
                   config: "GenerationConfig", generator=None) -> Iterator[Chunk]:
    """Batches decoded against one StaticCache of shape [batch_size, width + cap] reused for the whole run.

    Every decode step has the same shapes (the last batch is filled up with one-token dummy rows), so on CUDA the
    step is compiled once and replayed as a CUDA graph; rows that stop keep their slot and are fed the pad token.
    """
    import torch
    from transformers import StaticCache

    device = next(model.parameters()).device
    cap = config.max_new_tokens
    batch_size = min(config.batch_size, len(order))
    width = math.ceil(max(len(p) for p in ids) / STATIC_WIDTH_MULTIPLE) * STATIC_WIDTH_MULTIPLE
    cache = StaticCache(config=model.config, max_cache_len=width + cap)
    decode = _compiled_forward(model) if device.type == "cuda" else model  # eager: hooks see every step
    stop_tensor = torch.tensor(sorted(stops), device=device)
    with torch.inference_mode():
        for batch in _chunks(order, batch_size):
            prompts = [ids[i] for i in batch] + [[pad_id]] * (batch_size - len(batch))  # dummy rows: fixed shape
            cache.reset()
            rows = _static_generate(model, decode, cache, prompts, width, cap, stop_tensor, pad_id, config, generator)
            new_tokens, reasons = [], []
            for row in rows[: len(batch)]:
                tokens, reason = split_at_stop(row, stops, cap)
                new_tokens.append(tokens)
                reasons.append(reason)
            yield batch, new_tokens, reasons


def _compiled_forward(model):
    """The model's forward compiled for replay as CUDA graphs (one per shape; the static cache keeps shapes fixed)."""
    import torch

    return torch.compile(model.forward, mode="reduce-overhead", fullgraph=False, dynamic=False)


def _static_generate(model, decode, cache, prompts: list[list[int]], width: int, cap: int,
                     stop_tensor: "torch.Tensor", pad_id: int, config: "GenerationConfig", generator) -> list[list[int]]:
    """Up to `cap` new tokens per row (possibly past its stop: cut by the caller)."""
    import torch

    from sftkey.generate import _pick

    device = stop_tensor.device
    rows = len(prompts)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.ones((rows, width + cap), dtype=torch.long)  # generated slots are open: causality hides the future
    for row, prompt in enumerate(prompts):  # left padding: every row's next token goes in column `width`
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, : width - len(prompt)] = 0
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)  # [B, width]: pads share position 0, masked anyway
    logits = model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
        cache_position=torch.arange(width, device=device), logits_to_keep=1,
    ).logits[:, -1, :]  # [B, V]
    next_positions = positions[:, -1:] + 1  # [B, 1]
    out = torch.full((rows, cap), pad_id, dtype=torch.long, device=device)  # [B, cap]
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    for step in range(cap):
        chosen = torch.where(done, pad_id, _pick(logits, config.temperature, generator))  # [B]: stopped rows get pad
        out[:, step] = chosen
        done = done | torch.isin(chosen, stop_tensor)
        if step == cap - 1 or ((step + 1) % STATIC_CHECK_EVERY == 0 and bool(done.all())):
            break
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed: reuse its buffers
        logits = decode(
            input_ids=chosen[:, None], attention_mask=mask, position_ids=next_positions, past_key_values=cache,
            use_cache=True, cache_position=torch.tensor([width + step], device=device),
        ).logits[:, -1, :]
        next_positions = next_positions + 1
    return out.tolist()


# --------------------------------------------------------------------------------------------- continuous


def continuous_batches(model, ids: list[list[int]], order: list[int], stops: set[int],
                       config: "GenerationConfig") -> Iterator[Chunk]:
    """All prompts submitted at once to transformers' continuous batching; chunks of `batch_size` answers are
    yielded in the order they finish, so the caller saves as it goes while the GPU stays busy. On CPU the paged
    cache is sized for `batch_size` requests at a time; on CUDA transformers sizes it from free GPU memory."""
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    cap = config.max_new_tokens
    device = next(model.parameters()).device
    hf_config = HFGenerationConfig(max_new_tokens=cap, do_sample=False, eos_token_id=sorted(stops),
                                   pad_token_id=min(stops))
    cb_config = ContinuousBatchingConfig()
    if device.type != "cuda":
        cb_config = ContinuousBatchingConfig(block_size=CPU_BLOCK_SIZE, max_batch_tokens=CPU_MAX_BATCH_TOKENS,
                                             num_blocks=cpu_num_blocks(ids, cap, config.batch_size))
    hints = WorkloadHints(max_prompt_length=max(len(p) for p in ids), max_generated_length=cap, num_requests=len(ids))
    # Requests are submitted longest first, as the other backends batch them; ids map results back to prompts.
    request_index = {f"q{i}": i for i in order}
    pending: list[int] = []
    tokens: dict[int, list[int]] = {}
    # no inference_mode: the manager's thread fills tensors made here in place, which inference tensors forbid
    with model.continuous_batching_context_manager(
        generation_config=hf_config, continuous_batching_config=cb_config, block=True, timeout=5,
        workload_hints=hints,
    ) as manager:
        for request_id, i in request_index.items():
            manager.add_request(ids[i], request_id=request_id, max_new_tokens=cap)
        while len(tokens) < len(ids):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError(f"continuous batching stopped with {len(ids) - len(tokens)} answers missing")
                continue
            if not result.is_finished():
                continue
            if result.error is not None:
                raise RuntimeError(f"continuous batching failed on prompt {result.request_id}: {result.error}")
            i = request_index[result.request_id]
            tokens[i] = list(result.generated_tokens)
            pending.append(i)
            if len(pending) == config.batch_size or len(tokens) == len(ids):
                yield _chunk_of(pending, tokens, stops, cap)
                pending = []


def cpu_num_blocks(ids: list[list[int]], cap: int, batch_size: int) -> int:
    """Cache blocks for `batch_size` of the longest requests at once (plus one spare block each)."""
    longest = sorted((len(p) + cap for p in ids), reverse=True)[:batch_size]
    return sum(math.ceil(n / CPU_BLOCK_SIZE) + 1 for n in longest)


def _chunk_of(indices: list[int], tokens: dict[int, list[int]], stops: set[int], cap: int) -> Chunk:
    split = [split_at_stop(tokens[i], stops, cap) for i in indices]
    return list(indices), [t for t, _ in split], [r for _, r in split]


# --------------------------------------------------------------------------------------------------- vllm


_VLLM_ENGINES: dict[tuple, object] = {}


def vllm_batches(model, ids: list[list[int]], order: list[int], stops: set[int],
                 config: "GenerationConfig") -> Iterator[Chunk]:
    """vLLM on the model's folder and dtype, the same prompt token ids, stopping at the same turn-closing ids.

    vLLM schedules within each call, so a large batch_size (hundreds) keeps it busy; each call's answers are
    yielded as one chunk.
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    folder = getattr(model, "name_or_path", None)
    if not folder or not os.path.isdir(folder):
        raise ValueError(f"generation backend 'vllm' loads the model from its folder; the model has none ({folder!r})")
    cap = config.max_new_tokens
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    key = (os.path.realpath(folder), dtype, config.seed, config.batch_size)
    if key not in _VLLM_ENGINES:  # an engine starts in tens of seconds: one per process and model
        _VLLM_ENGINES.clear()  # and never two at once: each takes most of the GPU's free memory
        _VLLM_ENGINES[key] = LLM(model=folder, tokenizer=folder, dtype=dtype, seed=config.seed,
                                 max_num_seqs=max(1, min(config.batch_size, 1024)), gpu_memory_utilization=0.5)
    llm = _VLLM_ENGINES[key]
    sampling = {"temperature": config.temperature, "seed": config.seed} if config.temperature > 0 else {"temperature": 0.0}
    params = SamplingParams(n=1, max_tokens=cap, stop_token_ids=sorted(stops), ignore_eos=False,
                            skip_special_tokens=False, detokenize=False, **sampling)
    for batch in _chunks(order, config.batch_size):
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i in batch], params, use_tqdm=False)
        new_tokens, reasons = [], []
        for out in outputs:
            completion = out.outputs[0]
            row = list(completion.token_ids)
            if completion.finish_reason == "stop" and (not row or row[-1] not in stops):
                # the stop id was left out of token_ids: put it back, as every backend counts it (stop_reason is
                # None for the tokenizer's own eos; which stop id it was does not change the decoded text)
                stop_id = completion.stop_reason if isinstance(completion.stop_reason, int) else min(stops)
                row.append(stop_id)
            tokens, reason = split_at_stop(row, stops, cap)
            new_tokens.append(tokens)
            reasons.append(reason)
        yield batch, new_tokens, reasons
