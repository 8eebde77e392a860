"""Weights per stage, the batch order, micro-batch split and packing, with exact values."""

import pytest

from sftkey.loss import IGNORE_INDEX as X
from sftkey.loss import loss_spec
from sftkey.roles import ANSWER, EOS, PROMPT, THINKING
from sftkey.tokenize import TokenizedExample
from sftkey.train.batching import (
    Sample,
    StageDataError,
    StagePlan,
    collate,
    epoch_batches,
    example_pieces,
    micro_batch,
    pack_rows,
    packs_into_one_row,
    rank_micro_batches,
    stage_samples,
)
from sftkey.train.trainer import lr_factor

P, T, A, E = PROMPT, THINKING, ANSWER, EOS
EXAMPLE = TokenizedExample("u1", [10, 11, 12, 13, 14, 15, 16], [P, P, T, T, A, A, E])


def test_sft_and_key_weights_become_shifted_labels():
    (sft,), dropped = stage_samples([EXAMPLE], loss_spec("sft"))
    assert dropped == 0
    assert sft.targets == [11, 12, 13, 14, 15, 16, X]
    assert sft.target_roles == [P, T, T, A, A, E, P]
    assert sft.labels == [X, 12, 13, 14, 15, 16, X]
    assert sft.weights == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    (key,), _ = stage_samples([EXAMPLE], loss_spec("key"))
    assert key.labels == [X, X, X, 14, 15, 16, X]  # reasoning stays input, carries no loss
    assert (key.weight_sum, key.token_count) == (3.0, 3)
    (weighted,), _ = stage_samples([EXAMPLE], loss_spec("weighted", w_thinking=1.0, w_answer=5.0))
    assert weighted.weights == [0.0, 1.0, 1.0, 5.0, 5.0, 5.0, 0.0]


def test_examples_without_weighted_tokens_are_dropped_and_counted():
    no_answer = TokenizedExample("u2", [1, 2, 3], [P, T, T])
    samples, dropped = stage_samples([EXAMPLE, no_answer], loss_spec("key"))
    assert [s.uid for s in samples] == ["u1"] and dropped == 1
    with pytest.raises(StageDataError, match="select no token in any of the 1 examples"):
        stage_samples([no_answer], loss_spec("key"))


def test_packing_makes_few_rows_of_similar_length():
    # 23 tokens need 3 rows of 10; longest first into the least-filled row: 7, 6, 5 open the rows,
    # 3 joins the 5 (fill 8), 2 joins the 6 (fill 8): rows of 7, 8, 8 tokens, padded to 8
    assert pack_rows([5, 3, 7, 2, 6], 10) == [[2], [4, 3], [0, 1]]
    assert pack_rows([9, 9, 2], 10) == [[0], [1], [2]]  # 20 tokens, but 9 + 9 cannot share: a third row opens
    assert pack_rows([4, 4], 10) == [[0, 1]]
    with pytest.raises(ValueError, match="an example of 11 tokens does not fit a row of 10"):
        pack_rows([11], 10)


def test_collate_restarts_positions_per_example_and_pads_as_its_own_segment():
    a = Sample("a", [5, 6, 7], [P, T, A], [6, 7, X], [1.0, 2.0, 0.0])
    b = Sample("b", [8, 9], [A, E], [9, X], [1.0, 0.0])
    c = Sample("c", [4], [P], [X], [0.0])
    batch = collate([a, b, c], [[0, 1], [2]], pad_id=0)
    t = batch.tensors
    assert t["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert t["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert t["labels"].tolist() == [[6, 7, X, 9, X], [X, X, X, X, X]]
    assert t["weights"].tolist() == [[1.0, 2.0, 0.0, 1.0, 0.0], [0.0] * 5]
    assert t["targets"].tolist() == [[6, 7, X, 9, X], [X] * 5]
    assert t["target_roles"].tolist() == [[T, A, P, E, P], [P] * 5]
    assert (batch.tokens, batch.slots, batch.uids) == (6, 10, ["a", "b", "c"])


def test_attention_that_keeps_packed_examples_apart_only_in_one_row_gets_one_row():
    assert [packs_into_one_row(a) for a in ("sdpa", "eager", "flex_attention")] == [False, False, False]
    for name in ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn", "paged|sdpa", "SDPA"):
        assert packs_into_one_row(name), name  # flash attention, and anything not known to separate every row


def lengths_samples(lengths):
    """Example k holds ids 10k+1, 10k+2, ... (no pad id 0), its length given."""
    return [Sample(f"u{k}", [10 * k + t + 1 for t in range(n)], [T] * n, [X] * n, [0.0] * n)
            for k, n in enumerate(lengths)]


def test_cpu_pieces_are_the_examples_alone_longest_first_ties_in_batch_order():
    samples = lengths_samples([5, 3, 7, 3, 6])
    pieces = example_pieces(samples, [1, 3, 2, 0], pad_id=0)
    assert [p.uids for p in pieces] == [["u2"], ["u0"], ["u1"], ["u3"]]
    assert [(p.tokens, p.slots) for p in pieces] == [(7, 7), (5, 5), (3, 3), (3, 3)]  # one row each, no padding
    assert pieces[0].tensors["input_ids"].tolist() == [samples[2].input_ids]
    assert pieces[0].tensors["position_ids"].tolist() == [list(range(7))]


def test_a_packed_micro_batch_under_flash_attention_is_one_row_of_all_its_examples():
    samples = lengths_samples([5, 3, 7, 2, 6])
    flash = micro_batch(samples, [2, 1, 3], pad_id=0, packing=True, pack_length=10,
                        attn_implementation="flash_attention_2")
    t = flash.tensors
    assert t["input_ids"].tolist() == [samples[2].input_ids + samples[1].input_ids + samples[3].input_ids]
    assert t["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 1]]  # 12 tokens > pack_length 10
    assert t["labels"].shape == t["weights"].shape == t["targets"].shape == t["target_roles"].shape == (1, 12)
    assert (flash.tokens, flash.slots, flash.uids) == (12, 12, ["u2", "u1", "u3"])
    sdpa = micro_batch(samples, [2, 1, 3], pad_id=0, packing=True, pack_length=10, attn_implementation="sdpa")
    assert sdpa.tensors["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 0, 1]]  # as before
    padded = micro_batch(samples, [2, 1, 3], pad_id=0, packing=False, pack_length=10,
                         attn_implementation="flash_attention_2")
    assert padded.tensors["input_ids"].shape == (3, 7)  # unpacked rows are causal and pad at the end: unchanged


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_attention_trusted_to_separate_every_row_does(attn_implementation, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    assert not packs_into_one_row(attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, use_safetensors=True,
                                                 attn_implementation=attn_implementation)
    samples = lengths_samples([5, 3, 7, 2, 6])
    batch = micro_batch(samples, range(5), pad_id=0, packing=True, pack_length=10,
                        attn_implementation=attn_implementation)
    t = batch.tensors
    assert t["input_ids"].shape[0] == 3
    with torch.no_grad():
        packed = model(input_ids=t["input_ids"], position_ids=t["position_ids"], use_cache=False).logits
        for row, members in enumerate(pack_rows([len(s) for s in samples], 10)):
            start = 0
            for k in members:
                alone = model(input_ids=torch.tensor([samples[k].input_ids]), use_cache=False).logits[0]
                assert t["input_ids"][row, start].item() == 10 * k + 1
                assert torch.allclose(packed[row, start:start + len(samples[k])], alone, atol=1e-5)
                start += len(samples[k])


def test_batch_order_is_seeded_per_stage_and_epoch_and_drops_the_last_partial_batch():
    lengths = [10, 50, 20, 40, 30, 60, 70]
    first = epoch_batches(lengths, 2, seed=0, stage_index=0, epoch=0, bucket=False)
    assert first == [[3, 6], [5, 2], [1, 4]]  # pinned: the order must not change between versions (resume)
    assert first != epoch_batches(lengths, 2, seed=0, stage_index=0, epoch=1, bucket=False)
    assert first != epoch_batches(lengths, 2, seed=1, stage_index=0, epoch=0, bucket=False)
    assert first != epoch_batches(lengths, 2, seed=0, stage_index=1, epoch=0, bucket=False)
    # bucketed: the shuffled order less its last partial batch (length 10), sorted by length, cut, batches shuffled
    bucketed = epoch_batches(lengths, 2, seed=0, stage_index=0, epoch=0, bucket=True)
    assert bucketed == [[2, 4], [5, 6], [3, 1]]
    assert [[lengths[i] for i in b] for b in bucketed] == [[20, 30], [60, 70], [40, 50]]
    plan = StagePlan(lengths, 2, seed=0, stage_index=0, bucket=False)
    assert plan.steps_per_epoch == 3
    assert [plan.batch(s) for s in range(3)] == first
    assert plan.batch(3) == epoch_batches(lengths, 2, 0, 0, 1, False)[0]


def test_micro_batches_partition_the_global_batch():
    batch = [7, 3, 5, 1, 0, 2, 4, 6]
    assert rank_micro_batches(batch, world=1, accum=1, rank=0) == [batch]
    assert rank_micro_batches(batch, world=2, accum=2, rank=0) == [[7, 3], [0, 2]]
    assert rank_micro_batches(batch, world=2, accum=2, rank=1) == [[5, 1], [4, 6]]
    with pytest.raises(ValueError, match="does not split into 3 processes x 1"):
        rank_micro_batches(batch, world=3, accum=1, rank=0)


def test_learning_rate_schedule():
    assert [lr_factor(s, total=6, warmup=2, schedule="linear") for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [lr_factor(s, total=4, warmup=0, schedule="constant") for s in range(4)] == [1.0] * 4
    assert [round(lr_factor(s, total=5, warmup=1, schedule="cosine"), 6) for s in range(5)] == [1.0, 1.0, 0.853553, 0.5, 0.146447]
