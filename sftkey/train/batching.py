"""From prepared examples to a micro-batch's tensors: per-stage weights, the order of batches, packing.

The batch order depends only on (seed, stage index, epoch), never on the process count or on a resume, so a
resumed run and a data-parallel run see the same global batches as an uninterrupted single-process run.
Packed rows keep each example's own position ids (restarting at 0); transformers turns those restarts into a
block-diagonal causal mask when no attention mask is passed, so attention stays inside each example. It does so
in every row only for the attention implementations of `SEPARATES_EVERY_ROW`; under the others (flash attention)
a micro-batch is packed into one row, whatever `pack_length`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from sftkey.errors import UserError
from sftkey.loss import IGNORE_INDEX, LossSpec, shifted_targets
from sftkey.roles import PROMPT

if TYPE_CHECKING:
    import torch

    from sftkey.tokenize import TokenizedExample

BUCKET_WINDOW = 64  # unpacked batches: lengths are sorted within windows of this many batches
# transformers 5.17 builds their mask from each row's position-id restarts (masking_utils.create_causal_mask);
# flash attention finds packed examples only in a batch of one row (modeling_flash_attention_utils._is_packed_sequence)
SEPARATES_EVERY_ROW = ("sdpa", "eager", "flex_attention")


@dataclass
class Sample:
    """One example ready for batching under one stage's loss. Position t predicts token t+1.

    input_ids and roles are the prepared example's own lists (shared, not copied: GSM8K x stages adds up).
    """

    uid: str
    input_ids: list[int]
    roles: list[int]  # role of each token
    labels: list[int]  # next token at each position, IGNORE_INDEX where its weight is 0 and at the last
    weights: list[float]  # weight of each position's target

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def targets(self) -> list[int]:
        """Next token at each position whatever its weight (zero-weight roles are still reported)."""
        return self.input_ids[1:] + [IGNORE_INDEX]

    @property
    def target_roles(self) -> list[int]:
        """Role of each position's target; PROMPT at the last position, which predicts nothing."""
        return self.roles[1:] + [PROMPT]

    @property
    def weight_sum(self) -> float:
        return sum(self.weights)

    @property
    def token_count(self) -> int:
        return sum(1 for w in self.weights if w > 0)


class StageDataError(UserError, ValueError):
    """The stage's loss selects no token of the data."""


def stage_samples(examples: Sequence["TokenizedExample"], spec: LossSpec) -> tuple[list[Sample], int]:
    """Weights folded into labels once; examples with no weighted target are dropped and counted."""
    samples, dropped = [], 0
    for example in examples:
        labels, weights = shifted_targets(example.input_ids, spec.token_weights(example.roles))
        if not any(w > 0 for w in weights):
            dropped += 1
            continue
        samples.append(Sample(example.uid, example.input_ids, example.roles, labels, weights))
    if not samples:
        raise StageDataError(
            f"loss weights {spec.weights} select no token in any of the {len(examples)} examples: "
            "give weight to a role the data has (thinking, answer, eos)"
        )
    return samples, dropped


# --------------------------------------------------------------------------- which examples, in which step


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, stage_index: int, epoch: int,
                  bucket: bool) -> list[list[int]]:
    """The global batches of one epoch (the last partial batch is dropped; each epoch drops different ones).

    bucket: sort by length within windows of BUCKET_WINDOW batches, then shuffle the batches (less padding).
    """
    rng = random.Random(f"sftkey:{seed}:{stage_index}:{epoch}")  # str seeds hash the same on every machine
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order = order[: len(order) // batch_size * batch_size]
    if not bucket:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches = []
    window = BUCKET_WINDOW * batch_size
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: (lengths[i], i))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class StagePlan:
    """Global batch of every optimizer step of a stage; `batch(step)` is the data position a resume restores."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, stage_index: int, bucket: bool):
        self.lengths, self.batch_size = list(lengths), batch_size
        self.seed, self.stage_index, self.bucket = seed, stage_index, bucket
        self.steps_per_epoch = len(self.lengths) // batch_size
        self._epoch, self._batches = None, []

    def batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = epoch_batches(self.lengths, self.batch_size, self.seed, self.stage_index, epoch, self.bucket)
        return self._batches[index]


def stage_steps(epochs: float | None, steps: int | None, steps_per_epoch: int) -> int:
    return steps if steps is not None else int(round(epochs * steps_per_epoch))


def warmup_steps(epochs: float, steps: int | None, steps_per_epoch: int, total: int) -> int:
    wanted = steps if steps is not None else int(round(epochs * steps_per_epoch))
    return min(wanted, total)


def rank_micro_batches(batch: list[int], world: int, accum: int, rank: int) -> list[list[int]]:
    """This process's micro-batches of a global batch: micro-batch j = a * world + rank for accumulation step a."""
    parts = world * accum
    if len(batch) % parts:
        raise ValueError(f"a batch of {len(batch)} examples does not split into {world} processes x {accum} accumulation steps")
    size = len(batch) // parts
    return [batch[(a * world + rank) * size : (a * world + rank + 1) * size] for a in range(accum)]


# --------------------------------------------------------------------------- rows and tensors


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices into as few rows of at most `capacity` tokens as the total allows, about equally long.

    Longest first, each example goes to the least-filled row it fits (a new row only when none fits), so rows are
    padded to a similar length: 1,500 tokens at capacity 1,024 make two rows of ~750, not 1,000 + 500.
    """
    for length in lengths:
        if length > capacity:
            raise ValueError(f"an example of {length} tokens does not fit a row of {capacity} (train.pack_length)")
    rows: list[list[int]] = [[] for _ in range(max(1, math.ceil(sum(lengths) / capacity)))]
    fill = [0] * len(rows)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if fill[r] + lengths[i] <= capacity]
        if fits:
            r = min(fits, key=lambda r: (fill[r], r))
        else:
            rows.append([])
            fill.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        fill[r] += lengths[i]
    return [row for row in rows if row]


@dataclass
class MicroBatch:
    tensors: dict[str, "torch.Tensor"]  # each [rows, width]
    tokens: int  # real (non-pad) tokens
    slots: int  # rows x width: what the model computes
    uids: list[str]


def collate(samples: Sequence[Sample], rows: Sequence[Sequence[int]], pad_id: int) -> MicroBatch:
    """Concatenate each row's examples; the padding is one more segment (positions from 0) that predicts nothing."""
    import torch

    width = max(sum(len(samples[i]) for i in row) for row in rows)
    columns: dict[str, list[list]] = {k: [] for k in ("input_ids", "position_ids", "labels", "weights", "targets", "target_roles")}
    for row in rows:
        values = {k: [] for k in columns}
        for i in row:
            s = samples[i]
            values["input_ids"] += s.input_ids
            values["position_ids"] += range(len(s))
            values["labels"] += s.labels
            values["weights"] += s.weights
            values["targets"] += s.targets
            values["target_roles"] += s.target_roles
        pad = width - len(values["input_ids"])
        values["input_ids"] += [pad_id] * pad
        values["position_ids"] += range(pad)
        values["labels"] += [IGNORE_INDEX] * pad
        values["weights"] += [0.0] * pad
        values["targets"] += [IGNORE_INDEX] * pad
        values["target_roles"] += [PROMPT] * pad
        for k in columns:
            columns[k].append(values[k])
    tensors = {k: torch.tensor(v, dtype=torch.float32 if k == "weights" else torch.long) for k, v in columns.items()}
    tokens = sum(len(samples[i]) for row in rows for i in row)
    return MicroBatch(tensors, tokens, len(rows) * width, [samples[i].uid for row in rows for i in row])


def packs_into_one_row(attn_implementation: str) -> bool:
    """Whether packed examples stay apart only in a single row under this attention (an unknown one: yes)."""
    return attn_implementation not in SEPARATES_EVERY_ROW


def micro_batch(samples: Sequence[Sample], indices: Sequence[int], pad_id: int, packing: bool,
                pack_length: int, attn_implementation: str = "sdpa") -> MicroBatch:
    """The examples `indices` as one micro-batch: packed into rows (one row where the attention needs it, with no
    length cap), or one padded row each."""
    chosen = [samples[i] for i in indices]
    if packing and packs_into_one_row(attn_implementation):
        rows = [list(range(len(chosen)))]
    elif packing:
        rows = pack_rows([len(s) for s in chosen], pack_length)
    else:
        rows = [[i] for i in range(len(chosen))]
    return collate(chosen, rows, pad_id)


def example_pieces(samples: Sequence[Sample], indices: Sequence[int], pad_id: int) -> list[MicroBatch]:
    """Each example of a micro-batch as a micro-batch of its own (no padding, attention inside it as packing keeps
    it): pieces of a step whose gradients are computed alone and summed in piece order, on a CPU on one thread per
    core with the same result. Many pieces, longest first, so the threads stay evenly busy: a thread that ends
    a piece waits only for the (longer) one before it."""
    longest_first = sorted(indices, key=lambda i: -len(samples[i]))  # stable: ties keep the batch's order
    return [collate([samples[i]], [[0]], pad_id) for i in longest_first]


def padding_share(batches: Sequence[MicroBatch]) -> float:
    slots = sum(b.slots for b in batches)
    return 1.0 - sum(b.tokens for b in batches) / slots if slots else math.nan
