"""Work threads: pieces come back in order, at most `threads` at once and held; a failure stops the rest; greedy
generation gives the same records on any number of threads, sampling stays on one."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from sftkey.cpu_threads import THREADS_ENV, cpu_cores, cpu_threads, one_torch_thread, ordered_map
from sftkey.generate import GenerationConfig, generate
from sftkey.generate_backends import batch_threads
from sftkey.tokenize import format_prompt

from test_generate_backends import QUESTIONS


class Tally:
    """What ran: the items started, the most at once, and the results made but not yet taken."""

    def __init__(self):
        self.lock, self.started, self.running, self.most, self.made, self.taken = threading.Lock(), [], 0, 0, 0, 0
        self.most_held = 0

    def work(self, item: int) -> int:
        with self.lock:
            self.started.append(item)
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.02 * (4 - item % 4))  # later items finish first
        if item == 13:
            raise RuntimeError("piece 13 failed")
        with self.lock:
            self.running -= 1
            self.made += 1
            self.most_held = max(self.most_held, self.made - self.taken)
        return item * item

    def take(self, results):
        for result in results:
            self.taken += 1
            yield result


def test_results_come_in_item_order_with_threads_at_once_and_at_most_threads_held():
    tally = Tally()
    assert list(tally.take(ordered_map(tally.work, range(10), threads=3))) == [i * i for i in range(10)]
    assert tally.most == 3  # three at once, never more
    assert tally.most_held <= 3  # memory of `threads` pieces, not of all of them


def test_one_thread_is_a_plain_map_in_this_thread():
    seen = []
    assert list(ordered_map(lambda i: seen.append(threading.current_thread()) or i, range(3), threads=1)) == [0, 1, 2]
    assert seen == [threading.main_thread()] * 3


def test_a_failure_is_raised_at_its_place_and_no_later_piece_starts():
    tally = Tally()
    got = []
    with pytest.raises(RuntimeError, match="piece 13 failed"):
        for result in ordered_map(tally.work, range(10, 30), threads=2):
            got.append(result)
    assert got == [100, 121, 144]  # the pieces before it, in order
    assert max(tally.started) <= 15  # pieces ahead of the failure by at most `threads`; none after it was raised


def test_torch_runs_one_thread_inside_and_its_setting_comes_back():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_torch_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threads_default_to_the_cores_capped_by_the_environment(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert cpu_threads() == cpu_cores()
    assert cpu_threads(5) == 5  # a setting wins over the machine
    monkeypatch.setenv(THREADS_ENV, "1")
    assert cpu_threads() == 1
    with pytest.raises(ValueError, match="work threads must be >= 1, got 0"):
        cpu_threads(0)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        GenerationConfig(threads=0)


def test_greedy_generation_gives_the_same_records_on_any_number_of_threads(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    pairs = [(f"q{i}", format_prompt(tokenizer, q)) for i, q in enumerate(QUESTIONS)]
    runs = {threads: generate(model, tokenizer, pairs, GenerationConfig(max_new_tokens=12, batch_size=2,
                                                                         progress=False, threads=threads))
            for threads in (1, 2, 3)}
    assert runs[2] == runs[1] and runs[3] == runs[1]
    assert len({g.n_tokens for g in runs[1]}) > 1  # rows stop at different times: batches differ in length


def test_threads_go_to_greedy_batches_on_a_cpu_only(model_and_tokenizer):
    model, _ = model_and_tokenizer
    assert batch_threads(GenerationConfig(threads=4), model, batches=3) == 3  # no more than there are batches
    assert batch_threads(GenerationConfig(threads=4), model, batches=8) == 4
    # sampling draws from one seeded generator in batch order: threads would make the draws race
    assert batch_threads(GenerationConfig(threads=4, temperature=0.7), model, batches=8) == 1
    # off the CPU one stream runs the batches in turn: a model on the meta device stands in for a GPU here
    off_cpu = torch.nn.Linear(2, 2, device="meta")
    assert batch_threads(GenerationConfig(threads=4), off_cpu, batches=8) == 1


def test_sampled_generation_is_the_same_with_threads_asked_for(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    pairs = [(f"q{i}", format_prompt(tokenizer, q)) for i, q in enumerate(QUESTIONS)]
    config = GenerationConfig(max_new_tokens=8, batch_size=2, progress=False, temperature=0.9, seed=3)
    import dataclasses

    assert generate(model, tokenizer, pairs, dataclasses.replace(config, threads=3)) == \
        generate(model, tokenizer, pairs, config)
