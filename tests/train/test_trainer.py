"""The trainer end to end on the tiny model: every arm trains, logs per-role losses, checkpoints, resumes exactly."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftkey.config_file import ConfigError
from sftkey.train.config import load_config, run_config
from sftkey.train.layout import run_root
from sftkey.train.tracking import read_metrics
from sftkey.train.trainer import RunStateError, TrainingError, run_stage, train_arm

ALL_ARMS = {
    "sft": {"format": "plain", "stages": [{"name": "stage1", "loss": "sft", "steps": 2}]},
    "sft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 2}]},
    "key_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "key", "steps": 2}]},
    "sftkey_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 2},
                                                 {"name": "stage2", "loss": "key", "steps": 2}]},
    "sft_tag_matched": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 2},
                                                      {"name": "stage2", "loss": "sft", "steps": 2}]},
    "weighted_tag": {"format": "tagged", "stages": [
        {"name": "stage1", "loss": "weighted", "loss_args": {"w_thinking": 1.0, "w_answer": 5.0}, "steps": 2}]},
    "dft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "dft", "steps": 2}]},
}


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def all_arms(tiny_model_dir, arith, tmp_path_factory):
    """Every arm of method.md, two steps per stage, in one output_dir (trained once for this module)."""
    from sftkey.train.config import config_from_dict

    out = tmp_path_factory.mktemp("all_arms")
    config = config_from_dict({
        "model": str(tiny_model_dir), "output_dir": str(out), "seeds": [0],
        "data": {"dataset": "gsm8k", "path": str(arith), "max_length": 256},
        "train": {"batch_size": 4, "lr": 1.0e-3, "pack_length": 512},
        "arms": ALL_ARMS,
    })
    finals = {arm: train_arm(config, arm, 0) for arm in ALL_ARMS}
    return config, out, finals


def test_every_arm_logs_role_losses_and_changes_every_parameter(all_arms, tiny_model_dir):
    config, out, finals = all_arms
    base = weights(tiny_model_dir)
    for arm, final in finals.items():
        rows = read_metrics(out / arm / "seed0" / "metrics.jsonl")
        trained_steps = 2  # every arm trains 2 steps: the two-stage ones reuse SFT-Tag's stage 1
        assert len(rows) == trained_steps, arm
        for row in rows:
            assert {"loss", "loss_thinking", "loss_answer", "loss_eos", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(row)
            assert row["arm"] == arm and row["tokens"] > 0 and row["grad_norm"] > 0
        after = weights(final)
        assert set(after) == set(base)
        unchanged = [name for name in base if torch.equal(base[name], after[name])]
        assert unchanged == [], (arm, unchanged)


def test_loss_curve_is_pinned_and_key_loss_is_the_answer_and_eos_mean(all_arms):
    config, out, _ = all_arms
    # Pinned (torch 2.13, CPU, fp32): a change in data order, packing, weighting or normalisation moves these.
    assert losses(out / "sft_tag" / "seed0") == pytest.approx([6.00617, 5.96851], abs=1e-4)
    row = read_metrics(out / "key_tag" / "seed0" / "metrics.jsonl")[0]
    # the key stage trains answer + eos only, so its loss lies between those two role losses, not near thinking
    low, high = sorted([row["loss_answer"], row["loss_eos"]])
    assert low <= row["loss"] <= high
    # arms are paired: the same stage index and seed give the same batches, so from the same weights the plain
    # NLL of a role is the same whichever loss the arm trains
    first = {arm: read_metrics(out / arm / "seed0" / "metrics.jsonl")[0] for arm in ALL_ARMS}
    assert first["key_tag"]["loss_thinking"] == pytest.approx(first["sft_tag"]["loss_thinking"], abs=1e-5)
    assert first["sftkey_tag"]["step"] == first["sft_tag_matched"]["step"] == 3
    assert first["sftkey_tag"]["loss_answer"] == pytest.approx(first["sft_tag_matched"]["loss_answer"], abs=1e-5)


def test_run_layout_and_checkpoints_load_with_transformers(all_arms):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, out, finals = all_arms
    run = out / "sftkey_tag" / "seed0"
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "done" and record["final_checkpoint"] == str(run / "checkpoints" / "stage2-final")
    assert [s["name"] for s in record["stages"]] == ["stage1", "stage2"]
    assert load_config(run / "config.yaml").arms.keys() == {"sftkey_tag"}
    assert run_config(load_config(run / "config.yaml"), "sftkey_tag", 0) == run_config(config, "sftkey_tag", 0)
    final = finals["sftkey_tag"]
    meta = json.loads((final / "sftkey.json").read_text())
    assert {k: meta[k] for k in ("arm", "seed", "stage", "stage_index", "step", "global_step", "final")} == {
        "arm": "sftkey_tag", "seed": 0, "stage": "stage2", "stage_index": 1, "step": 2, "global_step": 4, "final": True}
    assert meta["data_version"] == record["data_version"] and meta["config"]["arms"]["sftkey_tag"]["format"] == "tagged"
    model = AutoModelForCausalLM.from_pretrained(final, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.eos_token == "<|im_end|>" and model.config.num_hidden_layers == 2
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in weights(final).items())


def test_sftkey_reuses_the_sft_tag_stage_and_run_stage_reproduces_stage2(all_arms, tmp_path):
    config, out, finals = all_arms
    mine = out / "sftkey_tag" / "seed0" / "checkpoints" / "stage1-final"
    theirs = out / "sft_tag" / "seed0" / "checkpoints" / "stage1-final"
    assert os.path.samefile(mine / "model.safetensors", theirs / "model.safetensors")  # hard link, no copy
    assert json.loads((mine / "sftkey.json").read_text())["reused_from"] == str(theirs)
    assert [r["step"] for r in read_metrics(out / "sftkey_tag" / "seed0" / "metrics.jsonl")] == [3, 4]
    # stage 2 alone (what an orchestration asset runs), from SFT-Tag's checkpoint, into another folder
    config.output_dir = str(tmp_path / "alone")
    try:
        alone = run_stage(config, "sftkey_tag", 0, 1, init=theirs)
    finally:
        config.output_dir = str(out)
    assert alone == tmp_path / "alone" / "sftkey_tag" / "seed0" / "checkpoints" / "stage2-final"
    expected = weights(finals["sftkey_tag"])
    assert all(torch.equal(expected[name], tensor) for name, tensor in weights(alone).items())


class CrashAt:
    """A tracker that raises when it is told about `step`: an interrupted run (after that step's update)."""

    def __init__(self, step: int):
        self.step = step

    def log_params(self, params):
        pass

    def set_tags(self, tags):
        pass

    def log_artifact(self, path):
        pass

    def log_metrics(self, metrics, step):
        if step == self.step:
            raise KeyboardInterrupt(f"simulated kill at step {step}")


KILL_ARMS = {"sftkey_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 3},
                                                          {"name": "stage2", "loss": "key", "steps": 3}]}}


def kill_changes(lora: bool) -> dict:
    return {"arms": KILL_ARMS, "train": {"save_every": 1, "lora": {"r": 4} if lora else None}}


@pytest.fixture(scope="module")
def straight_run(config_at, tmp_path_factory):
    """The uninterrupted reference of the kill tests: trained once per module and LoRA setting (read only)."""
    finals = {}

    def final(lora: bool) -> Path:
        if lora not in finals:
            finals[lora] = train_arm(config_at(kill_changes(lora), tmp_path_factory.mktemp("straight")), "sftkey_tag", 0)
        return finals[lora]

    return final


@pytest.mark.parametrize("crash_step,lora", [pytest.param(2, False, marks=pytest.mark.slow, id="mid-stage1"),
                                             pytest.param(5, False, id="mid-stage2"),
                                             pytest.param(5, True, marks=pytest.mark.slow, id="lora-mid-stage2")])
def test_a_killed_run_resumes_to_bit_identical_weights(make_config, tmp_path, crash_step, lora, straight_run):
    changes = kill_changes(lora)
    straight = straight_run(lora)
    config = make_config(changes, tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        train_arm(config, "sftkey_tag", 0, tracker=CrashAt(crash_step))
    run = tmp_path / "killed" / "sftkey_tag" / "seed0"
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"  # KeyboardInterrupt: Ctrl-C
    newest = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert newest == [f"step-{crash_step - 1:08d}"]  # keep_last 1; the crashed step never got its checkpoint
    (run / "checkpoints" / f".step-{crash_step:08d}.tmp").mkdir()  # a half-written checkpoint left by the kill
    (run / "checkpoints" / f".step-{crash_step:08d}.tmp" / "model.safetensors").write_bytes(b"garbage")
    resumed = train_arm(config, "sftkey_tag", 0, resume=True)
    expected, got = weights(straight), weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert losses(run) == losses(run_root(straight))
    if lora:
        assert (resumed / "adapter" / "adapter_config.json").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "done"


def test_gradient_accumulation_gives_the_same_steps(make_config, tmp_path):
    one = train_arm(make_config({}, tmp_path / "one"), "sft_tag", 0)
    two = train_arm(make_config({"train": {"grad_accum": 2}}, tmp_path / "two"), "sft_tag", 0)
    assert losses(tmp_path / "one" / "sft_tag" / "seed0") == pytest.approx(losses(tmp_path / "two" / "sft_tag" / "seed0"), rel=1e-6)
    a, b = weights(one), weights(two)
    # float rounding only: Adam divides by sqrt(v), which magnifies ~1e-9 gradient differences on tiny gradients
    assert max((a[name] - b[name]).abs().max().item() for name in a) < 1e-5


def test_lora_trains_adapters_and_saves_the_merged_model(make_config, tmp_path, tiny_model_dir):
    final = train_arm(make_config({"train": {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}}), "sft_tag", 0)
    base, merged = weights(tiny_model_dir), weights(final)
    changed = sorted(name for name in base if not torch.equal(base[name], merged[name]))
    assert changed == [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]
    adapter = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 8 and all(t.abs().sum() > 0 for t in adapter.values())


def test_padded_batches_and_sparse_role_logging(make_config, tmp_path):
    arms = {"key_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "key", "steps": 3}]}}
    train_arm(make_config({"arms": arms, "train": {"packing": False, "log_every": 2}}), "key_tag", 0)
    rows = read_metrics(tmp_path / "runs" / "key_tag" / "seed0" / "metrics.jsonl")
    assert [("loss_thinking" in r) for r in rows] == [True, False, True]  # every 2nd step, and the last
    assert all("loss_answer" in r and "loss_eos" in r for r in rows)  # trained roles: every step


def test_non_finite_loss_stops_with_the_step_and_batch(make_config, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(broken)
    shutil.copy(tiny_model_dir / "tokenizer.json", broken)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", broken)
    shutil.copy(tiny_model_dir / "chat_template.jinja", broken)
    with pytest.raises(TrainingError) as error:
        train_arm(make_config({"model": str(broken)}), "sft_tag", 0)
    assert str(error.value).startswith("stage stage1 step 1 (global step 1): loss is nan on the batch [gsm8k-train-")
    assert str(error.value).endswith("stopped before the optimizer step, no checkpoint of this run was written")


def test_exploding_update_stops_and_keeps_the_last_good_checkpoint(make_config, tmp_path):
    config = make_config({"train": {"lr": 1.0e30, "max_grad_norm": None, "save_every": 1}})
    with pytest.raises(TrainingError, match=r"^stage stage1 step 2 \(global step 2\): gradient norm is nan") as error:
        train_arm(config, "sft_tag", 0)
    run = tmp_path / "runs" / "sft_tag" / "seed0"
    assert str(error.value).endswith(f"the last good checkpoint is {run / 'checkpoints' / 'step-00000001'}")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and "gradient norm is nan" in record["error"]


def test_resume_refuses_another_config_or_data_version(make_config, tmp_path, arith):
    data = tmp_path / "data.jsonl"
    shutil.copy(arith, data)
    config = make_config({"data": {"path": str(data)}})
    train_arm(config, "sft_tag", 0)
    with pytest.raises(RunStateError, match="already holds checkpoints .newest stage1-final.: pass --resume"):
        train_arm(config, "sft_tag", 0)
    assert train_arm(config, "sft_tag", 0, resume=True).name == "stage1-final"  # finished: returned as is
    # the stage inherits train.lr: the message names the stage's resolved value
    with pytest.raises(RunStateError, match=r"made with a different config \(arms.sft_tag.stages.0.lr: 0.001 -> 0.002\)"):
        train_arm(make_config({"data": {"path": str(data)}, "train": {"lr": 2.0e-3}}), "sft_tag", 0, resume=True)
    data.write_text(data.read_text().replace("Ava has", "Ava holds", 1))
    with pytest.raises(RunStateError, match="made from data version [0-9a-f]{16}, but the data now has version"):
        train_arm(config, "sft_tag", 0, resume=True)


def test_impossible_stages_fail_before_any_run_folder_exists(make_config, tmp_path):
    short = {"sft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "epochs": 0.05}]}}
    with pytest.raises(ConfigError, match=r"stages\[0\] \(stage1\): the stage has no steps: epochs 0.05 x 6 batches"):
        train_arm(make_config({"arms": short}), "sft_tag", 0)
    with pytest.raises(ConfigError, match="the stage has no steps: 24 examples do not fill one batch of train.batch_size 32"):
        train_arm(make_config({"train": {"batch_size": 32}}), "sft_tag", 0)
    with pytest.raises(ConfigError, match="no arm 'sft' in the config; arms: sft_tag, sftkey_tag"):
        train_arm(make_config(), "sft", 0)
    with pytest.raises(ConfigError, match="train.fsdp is true but accelerate's distributed type is NO, not FSDP"):
        train_arm(make_config({"train": {"fsdp": True}}), "sft_tag", 0)  # accelerate has no FSDP on CPU
    assert not (tmp_path / "runs").exists()


REUSE_CHANGES = {"train": {"save_every": 2}}  # stage 2 (global steps 4-6) checkpoints at global step 5


@pytest.fixture(scope="module")
def straight_reused(config_at, tmp_path_factory) -> Path:
    """SFTKey-Tag's final checkpoint after SFT-Tag trained the shared stage 1, uninterrupted (trained once)."""
    config = config_at(REUSE_CHANGES, tmp_path_factory.mktemp("straight"))
    train_arm(config, "sft_tag", 0)
    return train_arm(config, "sftkey_tag", 0)


@pytest.mark.parametrize("crash_step,left", [
    pytest.param(4, ["stage1-final"], marks=pytest.mark.slow, id="before-first-stage2-checkpoint"),
    pytest.param(6, ["stage1-final", "step-00000005"], id="after-first-stage2-checkpoint")])
def test_an_arm_with_a_reused_stage1_resumes_its_stage2(make_config, tmp_path, crash_step, left, straight_reused):
    """SFTKey-Tag's stage 1 is linked from SFT-Tag (its sftkey.json carries SFT-Tag's config); a crash in its
    stage 2 resumes whether or not a stage-2 checkpoint was written, and a real config change is still refused."""
    changes = REUSE_CHANGES
    straight = straight_reused
    config = make_config(changes, tmp_path / "killed")
    train_arm(config, "sft_tag", 0)
    with pytest.raises(KeyboardInterrupt):
        train_arm(config, "sftkey_tag", 0, tracker=CrashAt(crash_step))
    run = tmp_path / "killed" / "sftkey_tag" / "seed0"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == left
    stage1 = json.loads((run / "checkpoints" / "stage1-final" / "sftkey.json").read_text())
    assert stage1["reused_from"] and list(stage1["config"]["arms"]) == ["sft_tag"]  # the other arm's config

    if crash_step == 4:  # the newest checkpoint is the linked stage 1: a change to what made it is named
        changed, message = {"train": {"save_every": 2, "lr": 2.0e-3}}, r"\(arms.sftkey_tag.stages.0.lr: 0.001 -> 0.002\)"
    else:  # the newest is stage 2's own: so is a change to stage 2
        stages = [{"name": "stage1", "loss": "sft", "steps": 3}, {"name": "stage2", "loss": "key", "steps": 3, "lr": 2.0e-3}]
        changed = changes | {"arms": {"sftkey_tag": {"format": "tagged", "stages": stages}}}
        message = r"\(arms.sftkey_tag.stages.1.lr: 0.001 -> 0.002\)"  # resolved: it inherited train.lr
    with pytest.raises(RunStateError, match=rf"/checkpoints/{left[-1]}: made with a different config {message}"):
        train_arm(make_config(changed, tmp_path / "killed"), "sftkey_tag", 0, resume=True)

    resumed = train_arm(config, "sftkey_tag", 0, resume=True)
    expected, got = weights(straight), weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert losses(run) == losses(run_root(straight))
    assert [row["step"] for row in read_metrics(run / "metrics.jsonl")] == [4, 5, 6]
    assert json.loads((run / "run.json").read_text())["status"] == "done"


def test_an_unreachable_hub_id_falls_back_and_records_the_weights_used(make_config, tmp_path, monkeypatch, capfd):
    from sftkey.models import ModelResolveError, weights_identity

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SFTKEY_HOME", str(tmp_path / "home"))
    hub_id = "sftkey-tests/no-such-model-7f3a"
    final = train_arm(make_config({"model": hub_id, "model_fallback": "tiny"}), "sft_tag", 0)
    tiny = weights_identity("tiny")
    notice = (f"sftkey: {hub_id} is not reachable (offline and no copy in the local HF cache); using the fallback "
              f"tiny: tiny random Llama (sftkey.tiny), for tests and smoke runs (weights sha256 "
              f"{tiny['weights_sha256'][:16]})\n")
    assert capfd.readouterr().err.count(notice) == 1
    used = tiny | {"fallback_for": hub_id,
                   "fallback_reason": "is not reachable (offline and no copy in the local HF cache)"}
    run = tmp_path / "runs" / "sft_tag" / "seed0"
    assert json.loads((run / "run.json").read_text())["base_model"] == used
    meta = json.loads((final / "sftkey.json").read_text())
    assert meta["base_model"] == used and meta["config"]["model"] == hub_id
    params = [row["params"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if row["type"] == "params"][0]
    assert {k: params[k] for k in ("model", "model.source", "model.weights_sha256", "model.fallback_for")} == {
        "model": hub_id, "model.source": "tiny", "model.weights_sha256": tiny["weights_sha256"],
        "model.fallback_for": hub_id}
    # what `sftkey eval` records of the checkpoint it scores: its own weights, and what it was trained from
    scored = weights_identity(final)
    manifest = f"{hashlib.sha256((final / 'model.safetensors').read_bytes()).hexdigest()}  model.safetensors\n"
    assert scored["weights_sha256"] == hashlib.sha256(manifest.encode()).hexdigest() != tiny["weights_sha256"]
    assert (scored["source"], scored["stage"], scored["step"], scored["base_model"]) == ("folder", "stage1", 3, used)
    assert scored["description"] == ("sftkey checkpoint sft_tag/seed0/stage1 step 3, trained from tiny random Llama "
                                     "(sftkey.tiny), for tests and smoke runs")
    # without a fallback: the resolve error, before any run folder
    with pytest.raises(ModelResolveError, match=f"model '{hub_id}': no local folder by that name, HF_HUB_OFFLINE is set"):
        train_arm(make_config({"model": hub_id}, tmp_path / "no_fallback"), "sft_tag", 0)
    assert not (tmp_path / "no_fallback").exists()


def test_a_resume_on_other_base_weights_is_refused(make_config, tmp_path, tiny_model_dir):
    from sftkey.models import weights_identity
    from sftkey.tiny import build_tiny_model

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    config = make_config({"model": str(base)})
    final = train_arm(config, "sft_tag", 0)
    old = weights_identity(base)["weights_sha256"]
    shutil.copy(build_tiny_model(tmp_path / "other", seed=1) / "model.safetensors", base / "model.safetensors")
    new = weights_identity(base)["weights_sha256"]
    assert new != old
    with pytest.raises(RunStateError, match=rf"stage1-final: trained from base weights sha256 {old} \(model folder "
                                            rf"{base}\), but model '{base}' now gives weights sha256 {new} \(model "
                                            rf"folder {base}\); resume where it resolves to the old weights"):
        train_arm(config, "sft_tag", 0, resume=True)
    meta = json.loads((final / "sftkey.json").read_text())  # a checkpoint that never recorded its base weights
    del meta["base_model"]
    (final / "sftkey.json").write_text(json.dumps(meta))
    with pytest.raises(RunStateError, match="made by an older sftkey that did not record its base model's weights"):
        train_arm(config, "sft_tag", 0, resume=True)


def test_step_sums_add_micro_batches_and_average_each_logged_role():
    from sftkey.roles import ROLE_NAMES
    from sftkey.train.trainer import StepSums

    answer, eos = ROLE_NAMES.index("answer"), ROLE_NAMES.index("eos")
    sums = StepSums.zeros()
    for nll, count in ((3.0, 2.0), (1.0, 2.0)):
        role_nll, role_count = torch.zeros(len(ROLE_NAMES)), torch.zeros(len(ROLE_NAMES))
        role_nll[answer], role_count[answer] = nll, count
        sums.add({"total": torch.tensor(nll), "role_nll": role_nll, "role_count": role_count}, tokens=10)
    assert (sums.loss.item(), sums.tokens.item()) == (4.0, 20.0)
    assert sums.role_losses() == {"loss_answer": 1.0}  # (3 + 1) / (2 + 2); eos had no targets: not logged
    assert sums.role_count[eos].item() == 0.0
