"""A CPU step in pieces (the examples of its micro-batches) on work threads: the same weights for 1, 2 or 3 threads,
the math of one micro-batch kept, threads only where backward() is not needed, and no effect on a stage's key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from sftkey.config_file import ConfigError
from sftkey.train import trainer
from sftkey.train.batching import micro_batch
from sftkey.train.config import TrainSettings, stage_key
from sftkey.train.tracking import read_metrics

ARM = "sftkey_tag"
EIGHT_PIECES = {"train": {"grad_accum": 2, "batch_size": 8}}  # 2 micro-batches of 4 examples: 8 pieces a step


def trained(make_config, tmp_path, name: str, changes: dict) -> tuple[dict[str, torch.Tensor], list[float]]:
    config = make_config(changes, output_dir=tmp_path / name)
    final = trainer.train_arm(config, ARM, 0)
    run_dir = tmp_path / name / ARM / "seed0"
    return load_file(str(final / "model.safetensors")), [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture
def one_torch_thread_here():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the serial path runs with the process's torch threads: 1, as the CLI sets
    yield
    torch.set_num_threads(before)


def test_weights_are_the_same_on_one_two_or_three_threads(make_config, tmp_path, monkeypatch, one_torch_thread_here):
    calls = []
    real = trainer.ordered_map

    def counted(work, items, threads):  # the real map, counted: the threaded path must have run
        items = list(items)
        calls.append((threads, len(items)))
        return real(work, items, threads)

    monkeypatch.setattr(trainer, "ordered_map", counted)
    runs = {n: trained(make_config, tmp_path, f"t{n}", EIGHT_PIECES | {"train": EIGHT_PIECES["train"] | {"cpu_threads": n}})
            for n in (1, 2, 3)}
    assert calls and {threads for threads, _ in calls} == {2, 3} and min(pieces for _, pieces in calls) >= 4
    base_weights, base_losses = runs[1]
    for n in (2, 3):
        weights, losses = runs[n]
        assert losses == base_losses
        assert weights.keys() == base_weights.keys()
        assert all(torch.equal(weights[k], base_weights[k]) for k in base_weights), f"{n} threads changed weights"


def test_pieces_keep_the_loss_of_one_micro_batch(make_config, tmp_path, monkeypatch):
    pieces = trained(make_config, tmp_path, "pieces", {"train": {"cpu_threads": 2}})
    def one_forward(self, indices, pad_id):  # what a GPU runs: one forward over the micro-batch's packed rows
        train = self.run.config.train
        return [micro_batch(self.data.samples, indices, pad_id, train.packing, train.pack_length)]

    monkeypatch.setattr(trainer.StageRecipe, "_pieces", one_forward)
    whole = trained(make_config, tmp_path, "whole", {"train": {"cpu_threads": 2}})
    assert pieces[1] == pytest.approx(whole[1], rel=1e-5)
    # Adam turns float noise in tiny gradients into updates of up to lr: measured 4e-6 here; a lost or doubled
    # piece moves weights by ~lr (1e-3) a step
    assert max((pieces[0][k] - whole[0][k]).abs().max().item() for k in whole[0]) < 5e-5


def accelerator(device="cpu", processes=1, kind=DistributedType.NO):
    return SimpleNamespace(device=torch.device(device), num_processes=processes, distributed_type=kind)


def test_threads_only_where_backward_itself_is_not_needed():
    train, small = TrainSettings(cpu_threads=3), 10**6
    assert trainer.step_threads(train, accelerator(), small) == 3
    assert trainer.step_threads(train, accelerator(processes=2, kind=DistributedType.MULTI_CPU), small) == 1  # DDP
    assert trainer.step_threads(train, accelerator(device="meta"), small) == 1  # not a CPU: one forward a micro-batch
    assert trainer.step_threads(TrainSettings(cpu_threads=3, compile="regional"), accelerator(), small) == 1
    assert trainer.step_threads(TrainSettings(cpu_threads=3, gradient_checkpointing=True), accelerator(), small) == 1


def test_by_default_threads_are_the_cores_as_far_as_memory_holds_their_gradients(monkeypatch):
    monkeypatch.setattr(trainer, "cpu_threads", lambda: 16)
    monkeypatch.setattr(trainer, "memory_bytes", lambda: 64 * 2**30)
    assert trainer.step_threads(TrainSettings(), accelerator(), 540 * 2**20) == 16  # 135M fp32 parameters
    assert trainer.step_threads(TrainSettings(), accelerator(), 4 * 2**30) == 4  # 1B: 4 GB a gradient copy
    assert trainer.step_threads(TrainSettings(), accelerator(), 40 * 2**30) == 1  # too big for a second copy
    assert trainer.step_threads(TrainSettings(cpu_threads=8), accelerator(), 40 * 2**30) == 8  # asked for: given


def test_threads_do_not_change_a_stage_key(make_config):
    one, four = make_config({"train": {"cpu_threads": 1}}), make_config({"train": {"cpu_threads": 4}})
    assert stage_key(one, ARM, 0, 0, "data", "base") == stage_key(four, ARM, 0, 0, "data", "base")
    lr = make_config({"train": {"cpu_threads": 1, "lr": 2.0e-3}})
    assert stage_key(lr, ARM, 0, 0, "data", "base") != stage_key(one, ARM, 0, 0, "data", "base")


def test_zero_threads_is_refused_naming_the_key(make_config):
    with pytest.raises(ConfigError, match=r"train\.cpu_threads.*must be >= 1, got 0"):
        make_config({"train": {"cpu_threads": 0}})
