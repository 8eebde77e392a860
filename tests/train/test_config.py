"""Config loading: the shipped configs, overrides, and every bad input named with file, line and key."""

from pathlib import Path

import pytest

from sftkey.config_file import ConfigError, first_difference, parse_override
from sftkey.train.config import config_from_dict, load_config, stage_key, training_view

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

GOOD = """\
model: tiny
output_dir: runs/x
data: {dataset: gsm8k, limit: 16, max_length: 512}
train:
  batch_size: 8
  lr: 2e-5
arms:
  sft_tag:
    format: tagged
    stages:
      - {name: stage1, loss: sft, epochs: 2}
"""


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_good_config_loads_with_defaults_and_yaml11_numbers(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.train.lr == 2e-5  # YAML 1.1 reads `2e-5` as a string; the loader takes it as the number
    assert config.train.betas == [0.9, 0.95] and config.train.warmup_epochs == 0.5
    assert config.data.limit == 16 and config.data.max_length == 512
    prepare_config = config.data.prepare_config(tagged=True)
    assert (prepare_config.data.limit, prepare_config.max_length, prepare_config.tagged) == (16, 512, True)
    assert config.arms["sft_tag"].stages[0].epochs == 2.0


def test_overrides_are_yaml_parsed_and_reach_lists(tmp_path):
    config = load_config(write(tmp_path, GOOD), ["train.lr=1e-4", "arms.sft_tag.stages.0.epochs=3",
                                                 "train.lora={r: 4}", "seeds=[1, 2]"])
    assert config.train.lr == 1e-4
    assert config.arms["sft_tag"].stages[0].epochs == 3.0
    assert config.train.lora.r == 4 and config.train.lora.target_modules[0] == "q_proj"
    assert config.seeds == [1, 2]
    assert parse_override("a.b.0.c=x") == (["a", "b", 0, "c"], "x")


@pytest.mark.parametrize("text,overrides,message", [
    (GOOD.replace("  lr: 2e-5", "  lrr: 2e-5"), [],
     "job.yaml line 6: train.lrr: unknown key; did you mean 'lr'?"),
    (GOOD, ["train.warmup=1"], "--set train.warmup: train.warmup: unknown key; did you mean 'warmup_steps'?"),
    (GOOD.replace("{name: stage1, loss: sft, epochs: 2}", "{name: stage1, loss: sft, epoch: 2}"), [],
     "job.yaml line 11: arms.sft_tag.stages[0].epoch: unknown key; did you mean 'epochs'?"),
    (GOOD.replace("epochs: 2", "epochs: 0"), [],
     "job.yaml line 11: arms.sft_tag.stages[0].epochs: stage has no steps: epochs must be > 0, got 0.0"),
    (GOOD.replace("epochs: 2", "steps: 0"), [],
     "job.yaml line 11: arms.sft_tag.stages[0].steps: stage has no steps: steps must be >= 1, got 0"),
    (GOOD.replace(", epochs: 2", ""), [],
     "job.yaml line 11: arms.sft_tag.stages[0]: give exactly one of epochs or steps (got epochs=None, steps=None)"),
    (GOOD.replace("lr: 2e-5", "lr: 0"), [],
     "job.yaml line 6: train.lr: learning rate must be a finite number > 0, got 0.0"),
    (GOOD.replace("lr: 2e-5", "lr: .nan"), [],
     "job.yaml line 6: train.lr: learning rate must be a finite number > 0, got nan"),
    (GOOD, ["arms.sft_tag.stages.0.lr=.nan"],
     "--set arms.sft_tag.stages.0.lr: arms.sft_tag.stages[0].lr: learning rate must be a finite number > 0, got nan"),
    (GOOD.replace("loss: sft", "loss: custom, loss_args: {weights: {thinking: 0.0}}"), [],
     "job.yaml line 11: arms.sft_tag.stages[0].loss: loss weights {'thinking': 0.0} select no token: "
     "give some role a weight > 0"),
    (GOOD.replace("loss: sft", "loss: keys"), [],
     "arms.sft_tag.stages[0].loss: unknown loss 'keys': choose one of ['dft', 'key', 'sft', 'weighted', 'custom']"),
    (GOOD.replace("format: tagged", "format: tag"), [],
     "job.yaml line 9: arms.sft_tag.format: 'tag' is not one of tagged, plain"),
    (GOOD, ["train.pack_length=256"],
     "--set train.pack_length: train.pack_length: 256 is shorter than data.max_length 512"),
    (GOOD, ["train.grad_accum=3"], "train.batch_size: 8 is not divisible by train.grad_accum 3"),
    (GOOD, ["data.dataset=gsm9k"], "job.yaml line 3 (with --set data.dataset): data: unknown dataset 'gsm9k'"),
    (GOOD.replace("batch_size: 8", "batch_size: eight"), [],
     "job.yaml line 5: train.batch_size: expected an integer, got 'eight'"),
    (GOOD.replace("model: tiny", "model: tiny\nmodel_fallback: ' '"), [],
     "job.yaml line 2: model_fallback: empty; use default, tiny, a folder or a hub id, or null for no fallback"),
])
def test_bad_config_is_named_before_any_work(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), overrides)
    assert message in str(error.value)


def test_shipped_configs_load_and_cover_the_arms():
    smoke = load_config(CONFIGS / "smoke_cpu.yaml")
    assert (smoke.model, list(smoke.arms)) == ("tiny", ["sft_tag", "sftkey_tag"])
    demo = load_config(CONFIGS / "demo_cpu.yaml")
    assert demo.model == "default" and list(demo.arms) == ["sft_tag", "sftkey_tag"]
    gpu = load_config(CONFIGS / "gsm8k_smollm2_gpu.yaml")
    assert (gpu.model, gpu.model_fallback) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "default")  # the hub's weights
    assert gpu.seeds == [0, 1, 2]
    assert {name: (arm.format, [(s.loss, s.epochs) for s in arm.stages]) for name, arm in gpu.arms.items()} == {
        "sft": ("plain", [("sft", 2.0)]),
        "sft_tag": ("tagged", [("sft", 2.0)]),
        "key_tag": ("tagged", [("key", 2.0)]),
        "sftkey_tag": ("tagged", [("sft", 2.0), ("key", 1.0)]),
        "sft_tag_matched": ("tagged", [("sft", 2.0), ("sft", 1.0)]),
        "weighted_tag": ("tagged", [("weighted", 3.0)]),
        "dft_tag": ("tagged", [("dft", 3.0)]),
    }
    assert gpu.data.limit is None and gpu.train.batch_size == 32


def test_stage_key_is_shared_by_identical_stages_only(tmp_path):
    config = load_config(write(tmp_path, GOOD), [
        "arms.sftkey_tag={format: tagged, stages: [{name: first, loss: sft, epochs: 2}, {name: second, loss: key, epochs: 1}]}"
    ])
    hub, offline = "a" * 64, "b" * 64  # the base weights' sha256: e.g. the hub's, and an offline fallback's
    one = stage_key(config, "sft_tag", 0, 0, "v1", hub)
    assert stage_key(config, "sftkey_tag", 0, 0, "v1", hub) == one  # stage names are labels, not identity
    assert stage_key(config, "sftkey_tag", 0, 1, "v1", hub) != one
    assert stage_key(config, "sft_tag", 1, 0, "v1", hub) != one
    assert stage_key(config, "sft_tag", 0, 0, "v2", hub) != one
    assert stage_key(config, "sft_tag", 0, 0, "v1", offline) != one  # other base weights, never the same stage
    changed = load_config(write(tmp_path, GOOD), ["train.save_every=5", "output_dir=elsewhere", "model_fallback=default"])
    assert stage_key(changed, "sft_tag", 0, 0, "v1", hub) == one  # bookkeeping (and the fallback) do not change it
    # a later stage's settings are not part of an earlier stage's identity
    later = load_config(write(tmp_path, GOOD), ["arms.sftkey_tag={format: tagged, stages: [{name: first, loss: sft, "
                                                "epochs: 2}, {name: second, loss: key, epochs: 1, lr: 1e-3}]}"])
    assert stage_key(later, "sftkey_tag", 0, 0, "v1", hub) == one
    assert stage_key(later, "sftkey_tag", 0, 1, "v1", hub) != stage_key(config, "sftkey_tag", 0, 1, "v1", hub)


def test_stage_key_is_the_same_for_a_default_and_the_same_value_written_out():
    """A stage's lr, schedule and warm-up default to `train:`; written out or inherited, it is the same stage."""
    def key(train: dict, stage: dict) -> str:
        config = config_from_dict({"train": train, "arms": {"a": {"stages": [{"loss": "sft", "steps": 4} | stage]}}})
        return stage_key(config, "a", 0, 0, "v1", "a" * 64)

    inherited = key({"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"}, {})
    written = key({"lr": 5e-4, "warmup_steps": 3, "schedule": "linear"},
                  {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"})
    assert written == inherited
    # warm-up steps given: warm-up epochs do not count
    assert key({"lr": 1e-3, "warmup_steps": 2, "warmup_epochs": 3.0, "schedule": "cosine"}, {}) == inherited
    assert key({"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"}, {"lr": 2e-3}) != inherited
    assert key({"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"}, {"warmup_epochs": 1.0}) != inherited


def test_resolve_stage_fills_every_default_from_train():
    from sftkey.train.config import ResolvedStage, resolve_stage

    config = config_from_dict({"train": {"lr": 1e-3, "warmup_epochs": 0.25, "schedule": "cosine"}, "arms": {"a": {
        "stages": [{"name": "s1", "loss": "sft", "epochs": 2}, {"name": "s2", "loss": "key", "steps": 5,
                                                                 "lr": 1e-4, "warmup_steps": 1}]}}})
    first, second = (resolve_stage(config, s) for s in config.arms["a"].stages)
    assert first == ResolvedStage(name="s1", loss="sft", loss_args={}, epochs=2.0, steps=None, lr=1e-3,
                                  schedule="cosine", warmup_epochs=0.25, warmup_steps=None)
    # a stage's own warm-up replaces train's warm-up whole (its epochs default to 0, not to train.warmup_epochs)
    assert second == ResolvedStage(name="s2", loss="key", loss_args={}, epochs=None, steps=5, lr=1e-4,
                                   schedule="cosine", warmup_epochs=None, warmup_steps=1)


def test_stage_key_changes_with_the_code_version(tmp_path, monkeypatch):
    from sftkey import version

    config = load_config(write(tmp_path, GOOD))
    one = stage_key(config, "sft_tag", 0, 0, "v1", "a" * 64)
    assert stage_key(config, "sft_tag", 0, 0, "v1", "a" * 64) == one
    monkeypatch.setattr(version, "code_version", lambda: "sftkey 0.1.0 git 0123abcd dirty 00ff")  # other code
    assert stage_key(config, "sft_tag", 0, 0, "v1", "a" * 64) != one


def test_first_difference_names_the_key():
    base = config_from_dict({"arms": {"a": {"stages": [{"loss": "sft", "steps": 1}]}}})
    changed = config_from_dict({"train": {"lr": 3e-5}, "arms": {"a": {"stages": [{"loss": "sft", "steps": 1}]}}})
    # the stage inherits train.lr: its resolved value is where the views first differ
    assert first_difference(training_view(base, "a", 0), training_view(changed, "a", 0)) == "arms.a.stages.0.lr: 2e-05 -> 3e-05"
    assert first_difference({"x": [1, 2]}, {"x": [1, 3]}) == "x.1: 2 -> 3"
    assert first_difference({"x": 1}, {"x": 1}) is None
