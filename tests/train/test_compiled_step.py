"""train.compile: the compiled step keeps the eager step's losses and weights, records its warm-up, and packed
micro-batches of changing shapes do not recompile every step.

The default run compiles with dynamo's eager backend (the same capture, graph breaks and guards, so the same
recompiles, but no code generation: seconds instead of minutes on a shared CPU); the slow tests compile with
inductor as training does.
"""

import json
import logging

import pytest
from safetensors.torch import load_file

from sftkey.config_file import ConfigError
from sftkey.train import compile as compile_module
from sftkey.train.compile import WarmupClock, recompile_counts
from sftkey.train.trainer import train_arm


@pytest.fixture
def backend(request, monkeypatch):
    """Compile with the backend the test is parametrised with (default: eager), from a fresh dynamo cache."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compile_module, "BACKEND", getattr(request, "param", "eager"))
    torch._dynamo.reset()
    counters.clear()  # recompile_counts() then counts this test's graphs only
    yield compile_module.BACKEND
    torch._dynamo.reset()


def run_metrics(out, arm="sft_tag"):
    lines = (out / arm / "seed0" / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row.get("type") == "metrics"]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def eager_run(config_at, tmp_path_factory):
    """The reference: five eager steps of SFT-Tag on the tiny model."""
    out = tmp_path_factory.mktemp("eager")
    final = train_arm(config_at(ARM_5_STEPS, out), "sft_tag", 0)
    return run_metrics(out), weights(final)


ARM_5_STEPS = {"arms": {"sft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 5}]}}}


def check_parity(eager_run, out, final, rel):
    eager_rows, eager_weights = eager_run
    rows = run_metrics(out)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in eager_rows], rel=rel)
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in eager_rows], rel=10 * rel)
    compiled = weights(final)
    assert set(compiled) == set(eager_weights)  # in-place compile: the eager parameter names
    # Adam divides by sqrt(v): rounding-level gradient differences move tiny-gradient weights by up to ~lr x 1e-2
    assert max((compiled[k] - eager_weights[k]).abs().max().item() for k in compiled) < 1e-4
    return rows


def test_regional_compile_keeps_the_eager_losses_and_records_its_warm_up(backend, eager_run, make_config, tmp_path,
                                                                          caplog):
    config = make_config(ARM_5_STEPS | {"train": {"compile": "regional"}}, tmp_path / "runs")
    with caplog.at_level(logging.INFO, logger="sftkey.train"):
        final = train_arm(config, "sft_tag", 0)
    rows = check_parity(eager_run, tmp_path / "runs", final, rel=1e-5)
    # known after the first step and three typical ones: logged once, on step 4's metrics line and in sftkey.json
    assert [("compile_warmup_s" in r) for r in rows] == [False, False, False, True, False]
    warmup = rows[3]["compile_warmup_s"]
    assert warmup > 0
    assert [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()] == [f"compile warm-up: {warmup:.1f} s"]
    assert json.loads((final / "sftkey.json").read_text())["compile_warmup_s"] == warmup
    # five packed micro-batches of different widths (and row counts): one graph for many rows, one for a single row
    # (dynamic shapes still specialise a size of 1: the sparse-logits probe is one row), never one per shape
    assert recompile_counts()["unique_graphs"] <= 2


def test_warmup_clock():
    clock = WarmupClock(enabled=True)
    assert [clock.add(s, last=False) for s in (10.0, 1.0, 3.0)] == [None, None, None]
    assert clock.add(2.0, last=False) == 8.0  # 10 minus the median of 1, 3 and 2
    assert clock.add(50.0, last=True) is None and clock.meta() == {"compile_warmup_s": 8.0}
    short = WarmupClock(enabled=True)
    assert short.add(4.5, last=True) == 4.5  # a one-step stage: its only step
    off = WarmupClock(enabled=False)
    assert off.add(4.5, last=True) is None and off.meta() == {}


def test_an_unknown_compile_mode_is_a_config_error(make_config):
    with pytest.raises(ConfigError) as error:
        make_config({"train": {"compile": "max"}})
    assert str(error.value).endswith("train.compile: 'max' is not one of none, regional, model")


@pytest.mark.slow
@pytest.mark.parametrize("backend,mode", [("eager", "model"), ("inductor", "regional"), ("inductor", "model")],
                         indirect=["backend"])
def test_compiled_steps_keep_the_eager_losses(backend, mode, eager_run, make_config, tmp_path):
    """Inductor fuses kernels, so its sums round differently: fp32 losses within rel 1e-4 of eager."""
    config = make_config(ARM_5_STEPS | {"train": {"compile": mode}}, tmp_path / "runs")
    final = train_arm(config, "sft_tag", 0)
    rows = check_parity(eager_run, tmp_path / "runs", final, rel=1e-4)
    assert rows[3]["compile_warmup_s"] > 0
    counts = recompile_counts()
    # model: graph breaks at the weighted-position selection and the packed-mask detection make several frames,
    # and all_roles (every step here) is one variant; regional: one layer graph, plus the one-row probe's
    assert counts["unique_graphs"] <= (2 if mode == "regional" else 40), counts
