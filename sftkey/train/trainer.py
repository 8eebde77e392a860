"""The training job: an arm's stages run one after another, each starting from the previous stage's final checkpoint.

Built on accelerate, so the same code runs in one process or data parallel (`accelerate launch`, `torchrun`), with
FSDP on request. A global batch (train.batch_size examples) is split into processes x grad_accum micro-batches;
every micro-batch's summed loss is divided by the weight sum of the whole global batch (known from the data before
the step), so the gradient is the same whatever the split, up to float rounding.

    train_arm(config, arm, seed)           every stage of one arm and seed -> the last stage's final checkpoint
    run_stage(config, arm, seed, k, init)  one stage from a given starting model (for orchestration assets)

Read top to bottom: `_setup` checks everything and builds the `ArmRun` (what every stage shares), then each stage
is a `StageRecipe`: setup() -> train() -> cleanup(). The run's files are described in sftkey.train.layout and
sftkey.train.checkpoint. The base model is resolved once per job (with `model_fallback` where `model` cannot be),
and its identity (sftkey.models.weights_identity) is recorded in run.json, every checkpoint's sftkey.json
(`base_model`) and the tracker params.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sftkey.atomic import write_text
from sftkey.config_file import ConfigError, dump_yaml, first_difference
from sftkey.cpu_threads import add_gradients, cpu_threads, memory_bytes, ordered_map
from sftkey.errors import UserError
from sftkey.loss import LossParts, normalize
from sftkey.models import ResolvedModel, identity_params, resolve_base_model
from sftkey.roles import ROLE_NAMES
from sftkey.train import checkpoint as ckpt
from sftkey.train.batching import (MicroBatch, Sample, StagePlan, example_pieces, micro_batch, rank_micro_batches,
                                   stage_samples, stage_steps, warmup_steps)
from sftkey.train.config import (
    ResolvedStage,
    TrainConfig,
    resolve_stage,
    run_config,
    stage_key,
    stage_loss,
    stage_view,
    training_view,
    validate,
)
from sftkey.train.attention import check_attn_implementation, is_flash
from sftkey.train.compile import WarmupClock, compile_loss_model
from sftkey.train.layout import LOCK_FILE, RunPaths, finished_stage, run_folder
from sftkey.train.objective import LossModel
from sftkey.train.tracking import FanoutTracker, JsonlTracker, NullTracker, Tracker

log = logging.getLogger("sftkey.train")

LOGGED_ROLES = ("thinking", "answer", "eos")  # prompt targets never carry loss


class TrainingError(UserError, RuntimeError):
    """Training stopped (a non-finite loss or gradient); the message names the step, the batch and the last checkpoint."""

    exit_code = 1


class Terminated(SystemExit):
    """Raised in the main thread by the SIGTERM handler `sftkey train` installs, so `finally` blocks run and
    run.json says "killed"; exit status 143 (128 + SIGTERM), as the shell reports a process it terminated."""

    def __init__(self, signum: int = 15):
        super().__init__(128 + signum)


class RunStateError(UserError, RuntimeError):
    """The run folder does not fit the request: a finished run without --resume, or a checkpoint from another config or data."""


@dataclass
class StageData:
    """A stage as it will run: its resolved settings, its examples and its length."""

    stage: ResolvedStage
    samples: list[Sample]
    dropped: int  # examples with no weighted target under this stage's loss
    plan: StagePlan
    steps: int
    warmup: int


@dataclass
class ArmRun:
    """One arm x seed run: what its stages share, built once by `_setup`."""

    config: TrainConfig
    arm: str
    seed: int
    paths: RunPaths
    accelerator: Any
    base: ResolvedModel  # the base model's folder and the identity of its weights
    tokenizer: Any
    data_version: str
    stages: list[StageData]
    tracker: Tracker
    progress: bool = False
    lock: Any = None  # the open lock file of this process's rank (see _lock_run)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def base_sha256(self) -> str:
        return self.base.identity["weights_sha256"]

    @property
    def code_version(self) -> str:
        from sftkey.version import code_version  # part of the stage key: other code, another stage

        return code_version()

    def stage_key(self, stage_index: int) -> str:
        return stage_key(self.config, self.arm, self.seed, stage_index, self.data_version, self.base_sha256)

    def global_offset(self, stage_index: int) -> int:
        return sum(s.steps for s in self.stages[:stage_index])

    def final_checkpoint(self, stage_index: int) -> Path:
        return self.paths.checkpoints / ckpt.final_name(self.stages[stage_index].stage.name)


# --------------------------------------------------------------------------- public API


def train_arm(config: TrainConfig, arm: str, seed: int, *, tracker: Tracker | None = None, resume: bool = False,
              prepared=None, progress: bool = False) -> Path:
    """Run every stage of `arm` for `seed`; returns the last stage's final checkpoint.

    resume: continue from the newest complete checkpoint in the run folder (error if it came from another
      config or data version). Without it, a run folder that already holds checkpoints is an error.
    prepared: a `sftkey.prepare.Prepared` of the arm's format, to skip preparing the data again.
    A stage whose result another arm of the same output_dir already has (same stages so far, seed, data and
    settings) is linked from there instead of trained again: SFTKey-Tag's stage 1 is SFT-Tag's.
    """
    run = _setup(config, arm, seed, tracker, resume, prepared, progress)
    with contextlib.closing(run.lock):  # closing the file releases the run folder's lock
        return _train_stages(run, resume)


def _train_stages(run: ArmRun, resume: bool) -> Path:
    started = time.time()
    record = {"arm": run.arm, "seed": run.seed, "status": "running", "pid": os.getpid(), "host": socket.gethostname(),
              "data_version": run.data_version, "base_model": run.base.identity, "stages": [],
              "final_checkpoint": None, "started": started}
    _write_run(run, record)
    run.tracker.set_tags({"arm": run.arm, "seed": str(run.seed)})
    run.tracker.log_params(_flat(training_view(run.config, run.arm, run.seed)) | {"data_version": run.data_version}
                           | _flat(identity_params(run.base.identity)))
    init: str | Path = run.base.folder
    try:
        for k, data in enumerate(run.stages):
            final = run.final_checkpoint(k)
            entry = {"name": data.stage.name, "checkpoint": str(final), "steps": data.steps}
            meta = ckpt.read_meta(final)
            if meta is not None:
                log.info("stage %s: already finished, %s", data.stage.name, final)
            else:
                meta = _reuse_stage(run, k, final)
            if meta is None:
                _train_stage(run, k, init, resume)
            elif meta.get("reused_from"):
                entry["reused_from"] = meta["reused_from"]
            record["stages"].append(entry)
            _write_run(run, record)
            init = final
    except BaseException as error:
        record |= {"status": ended_status(error), "error": f"{type(error).__name__}: {error}",
                   "wall_s": round(time.time() - started, 1)}
        _write_run(run, record)
        raise
    record |= {"status": "done", "final_checkpoint": str(init), "wall_s": round(time.time() - started, 1)}
    _write_run(run, record)
    return Path(init)


def run_stage(config: TrainConfig, arm: str, seed: int, stage_index: int, init: str | Path, *,
              tracker: Tracker | None = None, resume: bool = True, prepared=None, progress: bool = False) -> Path:
    """Run one stage of `arm` from the model `init` (a model name or a checkpoint folder); returns its final checkpoint.

    The result is the same as that stage inside `train_arm` when `init` is the previous stage's final checkpoint.
    A finished stage is returned as is; with `resume`, an interrupted one continues from its newest checkpoint.
    `init` equal to `config.model` means the base model as the job resolved it (with `model_fallback`).
    """
    run = _setup(config, arm, seed, tracker, resume, prepared, progress, check_existing=False)
    with contextlib.closing(run.lock):
        return _run_one_stage(run, stage_index, init, resume)


def _run_one_stage(run: ArmRun, stage_index: int, init: str | Path, resume: bool) -> Path:
    if str(init) == run.config.model:
        init = run.base.folder
    if not 0 <= stage_index < len(run.stages):
        raise ConfigError(f"arm {run.arm!r} has {len(run.stages)} stages; stage index {stage_index} does not exist")
    final = run.final_checkpoint(stage_index)
    meta = ckpt.read_meta(final)
    if meta is not None:
        _check_resumable(run, final, meta)
        return final
    run.tracker.set_tags({"arm": run.arm, "seed": str(run.seed)})
    run.tracker.log_params(_flat(identity_params(run.base.identity)))
    return _train_stage(run, stage_index, init, resume)


# --------------------------------------------------------------------------- set-up: every check before any work


def _setup(config: TrainConfig, arm: str, seed: int, tracker: Tracker | None, resume: bool, prepared, progress: bool,
           check_existing: bool = True) -> ArmRun:
    validate(config)
    if arm not in config.arms:
        raise ConfigError(f"no arm {arm!r} in the config; arms: {', '.join(config.arms)}")
    accelerator = make_accelerator(config)
    _check_parallel_layout(config, accelerator)
    base = resolve_base_model(config.model, config.model_fallback, announce=accelerator.is_main_process)
    tokenizer = _load_tokenizer(base.folder)
    prepared = _arm_data(config, arm, tokenizer, prepared)
    stages = [_stage_data(config, arm, seed, k, prepared.examples) for k in range(len(config.arms[arm].stages))]
    paths = run_folder(config.output_dir, arm, seed)
    run = ArmRun(config, arm, seed, paths, accelerator, base, tokenizer, prepared.meta["data_version"], stages,
                 NullTracker(), progress)
    run.lock = _lock_run(paths.root, accelerator.process_index)
    try:
        _claim_run(run, resume, check_existing, tracker)
    except BaseException:
        run.lock.close()
        raise
    return run


def _check_parallel_layout(config: TrainConfig, accelerator) -> None:
    if config.train.fsdp and not _is_fsdp(accelerator):
        raise ConfigError(f"train.fsdp is true but accelerate's distributed type is {accelerator.distributed_type.value}, "
                          "not FSDP: FSDP shards over GPU processes started by `accelerate launch` or torchrun; set "
                          "train.fsdp: false to train data parallel or in one process")
    world = accelerator.num_processes
    micro_parts = world * config.train.grad_accum
    if config.train.batch_size % micro_parts:
        raise ConfigError(f"train.batch_size {config.train.batch_size} does not split into {world} processes x "
                          f"train.grad_accum {config.train.grad_accum}: make it a multiple of {micro_parts}")


def _arm_data(config: TrainConfig, arm: str, tokenizer, prepared):
    """The prepared examples in the arm's format: `prepared` when given (checked), else prepared now."""
    arm_format = config.arms[arm].format
    tagged = arm_format == "tagged"
    if prepared is None:
        from sftkey.prepare import prepare

        return prepare(config.data.prepare_config(tagged), tokenizer)
    if prepared.meta["config"]["tagged"] != tagged:
        raise ConfigError(f"arm {arm!r} trains on the {arm_format} format but the prepared data is not")
    return prepared


def _stage_data(config: TrainConfig, arm: str, seed: int, k: int, examples) -> StageData:
    """Stage k's resolved settings, the examples its loss trains on, its batches and its length in steps."""
    stage = resolve_stage(config, config.arms[arm].stages[k])
    where = f"arms.{arm}.stages[{k}] ({stage.name})"
    try:
        samples, dropped = stage_samples(examples, stage_loss(config.arms[arm].stages[k]))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    plan = StagePlan([len(s) for s in samples], config.train.batch_size, seed, k, bucket=not config.train.packing)
    if plan.steps_per_epoch < 1:
        raise ConfigError(f"{where}: the stage has no steps: {len(samples)} examples do not fill one batch of "
                          f"train.batch_size {config.train.batch_size}")
    steps = stage_steps(stage.epochs, stage.steps, plan.steps_per_epoch)
    if steps < 1:
        raise ConfigError(f"{where}: the stage has no steps: epochs {stage.epochs} x {plan.steps_per_epoch} "
                          "batches per epoch rounds to 0")
    warm = warmup_steps(stage.warmup_epochs or 0.0, stage.warmup_steps, plan.steps_per_epoch, steps)
    return StageData(stage, samples, dropped, plan, steps, warm)


def _claim_run(run: ArmRun, resume: bool, check_existing: bool, tracker: Tracker | None) -> None:
    """Holding the lock: settle what a dead run left (run.json, bad checkpoints, its metrics), then start ours."""
    paths = run.paths
    if run.main:
        _mark_dead_run(paths.run_json)
    newest = ckpt.latest(paths.checkpoints)
    if newest is not None and check_existing and not resume:
        raise RunStateError(f"{paths.root} already holds checkpoints (newest {newest[0].name}): pass --resume to "
                            "continue or reuse it, or choose another output_dir")
    newest = _newest_loadable(run)
    if newest is not None:
        _check_resumable(run, *newest)
    if run.main:
        paths.root.mkdir(parents=True, exist_ok=True)
        jsonl = JsonlTracker(paths.metrics)
        # a dead run logged steps past its last checkpoint (all of them when it wrote none): those run again
        for line in jsonl.drop_metrics_after(newest[1]["global_step"] if newest else 0):
            log.warning("%s", line)
        run.tracker = FanoutTracker(jsonl, tracker) if tracker is not None else jsonl
        header = (f"# resolved config of arm {run.arm}, seed {run.seed}; rerun: sftkey train --config {paths.config} "
                  "--resume")
        _atomic_text(paths.config, dump_yaml(run_config(run.config, run.arm, run.seed), header))
    run.accelerator.wait_for_everyone()


def refuse_if_training(root: Path) -> None:
    """Raise RunStateError when another process holds the run folder's lock; hold nothing. For callers that set
    things up before training (an MLflow run), so that a second process refuses before touching them."""
    import fcntl

    try:
        handle = open(root / LOCK_FILE, encoding="utf-8")
    except FileNotFoundError:
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails while a trainer holds LOCK_EX
        except BlockingIOError:
            raise _locked(root, handle.read().strip()) from None


def _locked(root: Path, holder: str) -> RunStateError:
    return RunStateError(f"{root}: another sftkey train ({holder or 'another process'}) is training this run folder; "
                         "wait for it to finish or stop it, then rerun with --resume")


def _lock_run(root: Path, rank: int):
    """An exclusive flock on `{run}/run.lock` (one file per rank): a second `sftkey train` on the same arm/seed
    folder refuses at once. The kernel drops a flock when its process dies, kill -9 included, so a lock file left
    behind never blocks; its text (pid and host of the holder) only names who holds it."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    path = root / (LOCK_FILE if rank == 0 else f"{LOCK_FILE}.rank{rank}")
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise _locked(root, holder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def _mark_dead_run(run_json: Path) -> None:
    """A run.json still "running" while we hold the lock was left by a process that died without a word (kill -9,
    out of memory, power loss): its pid is gone, so the run was interrupted."""
    try:
        record = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if record.get("status") != "running":
        return
    who = f"pid {record.get('pid', '?')} on {record.get('host', '?')}"
    record |= {"status": "interrupted", "error": f"{who} died while running (killed with SIGKILL, out of memory or "
                                              "lost power); no status was written"}
    ckpt.write_json(run_json, record)
    log.warning("%s: the previous run (%s) died while running; marked interrupted", run_json, who)


def _newest_loadable(run: ArmRun) -> tuple[Path, dict] | None:
    """The newest complete checkpoint that loads. Newer ones that do not (a cut or zero-byte file, an unreadable
    sftkey.json) are renamed aside, never deleted, and the log says so and where training resumes instead."""
    checkpoints = run.paths.checkpoints
    found = ckpt.complete_checkpoints(checkpoints)
    complete = {folder for folder, _meta in found}
    bad = [(folder, f"no readable {ckpt.META_FILE}") for folder in sorted(checkpoints.glob("[!.]*"))
           if folder.is_dir() and folder not in complete]  # renamed into place, so a folder without it is damaged
    while found and (problem := ckpt.load_problem(*found[-1])) is not None:
        bad.append((found.pop()[0], problem))
    run.accelerator.wait_for_everyone()  # every process has looked before the main one renames
    if run.main:
        instead = f"resuming from {found[-1][0].name}" if found else "no usable checkpoint left, starting over"
        for folder, problem in bad:
            aside = ckpt.set_aside(folder)
            log.warning("checkpoint %s does not load (%s): moved aside to %s; %s", folder, problem, aside.name, instead)
    run.accelerator.wait_for_everyone()
    return found[-1] if found else None


def ended_status(error: BaseException) -> str:
    """run.json's status for a run stopped by `error`: Ctrl-C, SIGTERM, or a failure."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return "killed" if isinstance(error, Terminated) else "failed"


def make_accelerator(config: TrainConfig):
    """The run's Accelerator: precision `auto` is bf16 autocast on a GPU with bf16 and on a CPU where the probe
    (sftkey.precision) measured it faster, fp32 elsewhere; `cpu=True` on a CPU-only machine lets torchrun start gloo."""
    from accelerate import Accelerator

    from sftkey.precision import resolve_precision

    cuda = torch.cuda.is_available()
    precision, why = resolve_precision(config.train.precision, cuda, cuda and torch.cuda.is_bf16_supported())
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("precision %s (%s)", precision, why)
    kwargs = {}
    if config.train.fsdp:
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT"
        )
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if precision == "bf16" else "no", **kwargs)


def training_precision(accelerator) -> str:
    """train.precision as resolved for this run: "bf16" (autocast) or "fp32"; recorded in every checkpoint."""
    return "bf16" if accelerator.mixed_precision == "bf16" else "fp32"


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _check_resumable(run: ArmRun, folder: Path, meta: dict) -> None:
    """A checkpoint fits the job when its stage key is the one the job gives its stage: same base weights, data and
    everything that decides that stage. A stage linked from another arm carries that arm's config; its key is ours."""
    if meta.get("arm") != run.arm or meta.get("seed") != run.seed:
        raise RunStateError(f"{folder}: belongs to arm {meta.get('arm')!r} seed {meta.get('seed')}, not arm "
                            f"{run.arm!r} seed {run.seed}; point output_dir elsewhere")
    if meta["data_version"] != run.data_version:
        raise RunStateError(f"{folder}: made from data version {meta['data_version'][:16]}, but the data now has "
                            f"version {run.data_version[:16]}; use another output_dir or restore the data")
    old = meta.get("base_model") or {}
    if old.get("weights_sha256") != run.base_sha256:
        now = run.base.identity
        if not old:
            raise RunStateError(f"{folder}: made by an older sftkey that did not record its base model's weights, so "
                                f"it cannot be checked against {now['description']} (weights sha256 "
                                f"{run.base_sha256}); use another output_dir")
        raise RunStateError(
            f"{folder}: trained from base weights sha256 {old.get('weights_sha256')} ({old.get('description')}), but "
            f"model {run.config.model!r} now gives weights sha256 {run.base_sha256} ({now['description']}); resume "
            f"where it resolves to the old weights (e.g. with the hub reachable, or the same model_fallback), or use "
            "another output_dir")
    k = meta["stage_index"]
    if meta.get("stage_key") != run.stage_key(k):
        mine = training_view(run.config, run.arm, run.seed)
        diff = first_difference(stage_view(meta["config"], k, run.arm), stage_view(mine, k, run.arm))
        if diff is None and meta.get("code_version") != run.code_version:
            diff = f"code version {meta.get('code_version') or 'unrecorded'} -> {run.code_version}"
        raise RunStateError(f"{folder}: made with a different config ({diff or 'another stage key: an older sftkey'}); "
                            "use another output_dir, or put the old value (or code) back to resume")


# --------------------------------------------------------------------------- one stage


def _train_stage(run: ArmRun, k: int, init: str | Path, resume: bool) -> Path:
    recipe = StageRecipe(run, k, init, resume)
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()


@dataclass
class StepSums:
    """Sums over one optimizer step's micro-batches, then over processes (float64, on the CPU)."""

    loss: torch.Tensor  # () summed weighted loss
    role_nll: torch.Tensor  # [roles] summed NLL of each role's targets
    role_count: torch.Tensor  # [roles] targets of each role
    tokens: torch.Tensor  # () real tokens in the micro-batches

    @classmethod
    def zeros(cls) -> StepSums:
        roles = len(ROLE_NAMES)
        return cls(*(torch.zeros(n, dtype=torch.float64) for n in ((), roles, roles, ())))

    def add(self, out: dict[str, torch.Tensor], tokens: int) -> None:
        """Add one micro-batch: the loss model's output and its token count."""
        self.loss += out["total"].detach().double().cpu()
        self.role_nll += out["role_nll"].double().cpu()
        self.role_count += out["role_count"].double().cpu()
        self.tokens += tokens

    def over_processes(self, accelerator) -> StepSums:
        """The sums of every process (one all-reduce of the values packed in one vector)."""
        roles = len(ROLE_NAMES)
        packed = torch.cat([self.loss.reshape(1), self.role_nll, self.role_count, self.tokens.reshape(1)])
        packed = accelerator.reduce(packed.to(accelerator.device), reduction="sum").cpu()
        loss, role_nll, role_count, tokens = packed.split([1, roles, roles, 1])
        return StepSums(loss[0], role_nll, role_count, tokens[0])

    def role_losses(self) -> dict[str, float]:
        """Mean NLL of each logged role that had targets this step."""
        out = {}
        for role in LOGGED_ROLES:
            r = ROLE_NAMES.index(role)
            if self.role_count[r] > 0:
                out[f"loss_{role}"] = (self.role_nll[r] / self.role_count[r]).item()
        return out


class StageRecipe:
    """One stage of a run: setup() -> train() -> cleanup().

    setup: the starting model (the given one, or on resume the stage's newest periodic checkpoint), the loss
    model, optimizer and lr schedule, restored with the RNG state on resume. train: the optimizer steps, the
    metrics lines, periodic checkpoints and the stage-final one. cleanup: the progress bar closed and the
    accelerator's references freed, also after an error.
    """

    def __init__(self, run: ArmRun, k: int, init: str | Path, resume: bool):
        self.run, self.k = run, k
        self.data = run.stages[k]
        self.stage = self.data.stage
        self.spec = stage_loss(self.stage)  # the LossSpec: role weights and whether DFT
        self.resume_from = _stage_checkpoint(run, k) if resume else None
        self.init_dir = _model_folder(self.resume_from[1]["init"] if self.resume_from else init)
        self.offset = run.global_offset(k)  # global step of this stage's step 0
        self.start = self.resume_from[1]["step"] if self.resume_from else 0
        self.loss_model = self.optimizer = self.scheduler = self.bar = None
        self.trainable: list[torch.nn.Parameter] = []
        self.threads = 1  # work threads of a step's pieces (step_threads)
        self.warmup = WarmupClock(run.config.train.compile != "none")
        self.last_checkpoint: Path | None = None  # named when training stops on a bad step

    # ----------------------------------------------------------------------- set-up

    def setup(self) -> None:
        from accelerate.utils import set_seed

        run, train, acc = self.run, self.run.config.train, self.run.accelerator
        set_seed(_stage_seed(run.seed, self.k))
        model = self._starting_model()
        loss_model = LossModel(model, sparse_logits=train.sparse_logits,
                               varlen=train.packing and is_flash(train.attn_implementation))
        loss_model._no_split_modules = getattr(loss_model.causal_lm(), "_no_split_modules", None)  # FSDP wraps these
        optimizer = torch.optim.AdamW(_param_groups(model, train.weight_decay), lr=self.stage.lr,
                                      betas=tuple(train.betas), eps=train.eps,
                                      # one kernel over all tensors: on this project's 2-vCPU VM 0.23 s a step for
                                      # 135M parameters where the default (foreach) took 1.0 s
                                      fused=acc.device.type in ("cuda", "cpu") or None)
        data, schedule = self.data, self.stage.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, data.steps, data.warmup, schedule))
        if self.resume_from and not _is_fsdp(acc):  # FSDP's sharded state loads after wrapping, below
            optimizer.load_state_dict(torch.load(self.resume_from[0] / ckpt.OPTIMIZER_FILE, weights_only=True))
        if self.resume_from:
            self._restore_schedule_and_rng()
        self.loss_model, self.optimizer = acc.prepare(loss_model, optimizer)
        compile_loss_model(self.loss_model, train.compile)  # compiles lazily: the first step carries the warm-up
        self.trainable = [p for p in self.loss_model.parameters() if p.requires_grad]
        self.threads = step_threads(train, acc, sum(p.numel() * p.element_size() for p in self.trainable))
        if self.resume_from and _is_fsdp(acc):
            from accelerate.utils import load_fsdp_optimizer

            load_fsdp_optimizer(acc.state.fsdp_plugin, acc, self.optimizer, self.loss_model, self.resume_from[0])
        self._announce()
        self.bar = _progress_bar(run, self.stage.name, data.steps, self.start)
        self.last_checkpoint = (self.resume_from[0] if self.resume_from
                                else (self.init_dir if ckpt.read_meta(self.init_dir) else None))

    def _starting_model(self):
        config, resume_from = self.run.config, self.resume_from
        if resume_from is None:
            return _load_model(config, self.init_dir, adapter=None)
        if config.train.lora is not None:  # the stage's starting weights plus the adapter trained so far
            return _load_model(config, self.init_dir, adapter=resume_from[0] / ckpt.ADAPTER_DIR)
        return _load_model(config, resume_from[0], adapter=None)

    def _restore_schedule_and_rng(self) -> None:
        folder = self.resume_from[0]
        self.scheduler.load_state_dict(torch.load(folder / ckpt.SCHEDULER_FILE, weights_only=True))
        ckpt.set_rng_state(torch.load(folder / ckpt.rng_file(self.run.accelerator.process_index), weights_only=True))
        log.info("stage %s: resuming at step %d from %s", self.stage.name, self.start, folder)

    def _announce(self) -> None:
        run, stage, data = self.run, self.stage, self.data
        run.tracker.set_tags({"stage": stage.name})
        run.tracker.log_params({f"{stage.name}.steps": data.steps, f"{stage.name}.warmup_steps": data.warmup,
                                f"{stage.name}.examples": len(data.samples),
                                f"{stage.name}.examples_dropped": data.dropped, f"{stage.name}.init": str(self.init_dir)})
        run.tracker.start_stage(stage.name, data.steps, self.offset, self.start)
        if run.main and data.dropped:
            log.info("stage %s: %d examples have no weighted token under loss %s and are left out",
                     stage.name, data.dropped, stage.loss)

    # ----------------------------------------------------------------------- training

    def train(self) -> Path:
        save_every = self.run.config.train.save_every
        for step in range(self.start, self.data.steps):
            self._optimizer_step(step)
            if save_every and (step + 1) % save_every == 0 and step + 1 < self.data.steps:
                self.last_checkpoint = self.save(step + 1, final=False)
        final = self.save(self.data.steps, final=True)
        # where it is, not its files: a tracker that uploads artifacts (MLflow) would copy every stage's weights
        self.run.tracker.log_params({f"{self.stage.name}.checkpoint": str(final)})
        return final

    def _optimizer_step(self, step: int) -> None:
        train, acc = self.run.config.train, self.run.accelerator
        began = time.perf_counter()
        batch = self.data.plan.batch(step)
        # the whole global batch's denominators, known before the step: every micro-batch divides by them
        weight_sum = torch.tensor(float(sum(self.data.samples[i].weight_sum for i in batch)), device=acc.device)
        token_count = torch.tensor(float(sum(self.data.samples[i].token_count for i in batch)), device=acc.device)
        all_roles = step % train.log_every == 0 or step == self.data.steps - 1
        sums = self._accumulate(batch, weight_sum, token_count, all_roles).over_processes(acc)
        loss = normalize(LossParts(sums.loss, weight_sum.double().cpu(), token_count.double().cpu()),
                         train.normalizer).item()
        if not math.isfinite(loss):
            self._stop(step, f"loss is {loss}", batch)
        grad_norm = float(acc.clip_grad_norm_(self.loss_model.parameters(), train.max_grad_norm or math.inf))
        if not math.isfinite(grad_norm):
            self._stop(step, f"gradient norm is {grad_norm}", batch)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._log(step, loss, lr, grad_norm, sums, time.perf_counter() - began)

    def _accumulate(self, batch: list[int], weight_sum: torch.Tensor, token_count: torch.Tensor,
                    all_roles: bool) -> StepSums:
        """Forward and backward over this process's pieces of the global batch (its micro-batches; on a CPU each
        example of them); their sums. Gradients add up in piece order, whether the pieces run one after another or
        on work threads, so the weights are the same for any number of threads."""
        run, train, acc = self.run, self.run.config.train, self.run.accelerator
        world, pad_id = acc.num_processes, run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
        pieces = [piece for indices in rank_micro_batches(batch, world, train.grad_accum, acc.process_index)
                  for piece in self._pieces(indices, pad_id)]

        def scaled_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
            # DDP averages gradients over processes; the sum over processes is what the global batch needs.
            return normalize(LossParts(out["total"], weight_sum, token_count), train.normalizer) * world

        def forward(piece: MicroBatch) -> dict[str, torch.Tensor]:
            inputs = {name: t.to(acc.device) for name, t in piece.tensors.items()}
            return self.loss_model(**inputs, dft=self.spec.dft, all_roles=all_roles)

        sums = StepSums.zeros()
        if self.threads > 1 and len(pieces) > 1:
            def gradient(piece: MicroBatch):
                out = forward(piece)
                return out, torch.autograd.grad(scaled_loss(out), self.trainable, allow_unused=True)

            for piece, (out, grads) in zip(pieces, ordered_map(gradient, pieces, self.threads)):
                add_gradients(self.trainable, grads)  # what backward() does to .grad, in piece order
                sums.add(out, piece.tokens)
            return sums
        for a, piece in enumerate(pieces):
            sync = contextlib.nullcontext() if a == len(pieces) - 1 else acc.no_sync(self.loss_model)
            with sync:
                out = forward(piece)
                acc.backward(scaled_loss(out))
            sums.add(out, piece.tokens)
        return sums

    def _pieces(self, indices: list[int], pad_id: int) -> list[MicroBatch]:
        """A micro-batch as the device computes it: on a CPU one piece per example (sftkey.cpu_threads), elsewhere
        one forward over its packed or padded rows."""
        train = self.run.config.train
        if self.run.accelerator.device.type == "cpu":
            return example_pieces(self.data.samples, indices, pad_id)
        return [micro_batch(self.data.samples, indices, pad_id, train.packing, train.pack_length,
                            train.attn_implementation)]

    def _log(self, step: int, loss: float, lr: float, grad_norm: float, sums: StepSums, seconds: float) -> None:
        tokens = int(sums.tokens)
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / seconds,
                   "epoch": (step + 1) / self.data.plan.steps_per_epoch} | sums.role_losses()
        warmup = self.warmup.add(seconds, last=step + 1 == self.data.steps)
        if warmup is not None:
            log.info("compile warm-up: %.1f s", warmup)
            metrics["compile_warmup_s"] = warmup
        self.run.tracker.log_metrics(metrics, step=self.offset + step + 1)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
            self.bar.update(1)

    def _stop(self, step: int, what: str, batch: list[int]) -> None:
        uids = [self.data.samples[i].uid for i in batch]
        shown = ", ".join(uids[:8]) + (f", ... ({len(uids)} examples)" if len(uids) > 8 else "")
        kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint of this run was written")
        raise TrainingError(f"stage {self.stage.name} step {step + 1} (global step {self.offset + step + 1}): {what} "
                            f"on the batch [{shown}]; stopped before the optimizer step, {kept}")

    # ----------------------------------------------------------------------- checkpoints

    def save(self, step: int, *, final: bool) -> Path:
        """All processes call this (FSDP gathers the weights collectively); the main process writes and renames."""
        run, acc = self.run, self.run.accelerator
        global_step = self.offset + step
        folder = run.paths.checkpoints / (ckpt.final_name(self.stage.name) if final else ckpt.periodic_name(global_step))
        tmp = ckpt.temp_folder(folder)
        if run.main:
            ckpt.begin(folder)
        acc.wait_for_everyone()
        self._write_weights(tmp)
        if not final:
            self._write_optimizer_state(tmp)
        torch.save(ckpt.rng_state(), tmp / ckpt.rng_file(acc.process_index))
        acc.wait_for_everyone()
        if run.main:
            ckpt.commit(tmp, folder, self._meta(step, global_step, final))
            if not final:
                ckpt.prune_periodic(run.paths.checkpoints, run.config.train.keep_last)
            elif run.config.train.keep_final_only:
                ckpt.prune_finished_stages(run.paths.checkpoints, self.k)
        acc.wait_for_everyone()
        return folder

    def _write_weights(self, tmp: Path) -> None:
        run, acc = self.run, self.run.accelerator
        state_dict = acc.get_state_dict(self.loss_model) if _is_fsdp(acc) else None  # collective under FSDP
        if not run.main:
            return
        lm_wrapper = acc.unwrap_model(self.loss_model).model
        if run.config.train.lora is not None:
            import copy

            lm_wrapper.save_pretrained(tmp / ckpt.ADAPTER_DIR)
            copy.deepcopy(lm_wrapper).merge_and_unload().save_pretrained(tmp, safe_serialization=True)
        elif state_dict is not None:
            weights = {name.removeprefix("model."): t for name, t in state_dict.items()}
            lm_wrapper.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        else:
            lm_wrapper.save_pretrained(tmp, safe_serialization=True)
        run.tokenizer.save_pretrained(tmp)

    def _write_optimizer_state(self, tmp: Path) -> None:
        run, acc = self.run, self.run.accelerator
        if _is_fsdp(acc):
            from accelerate.utils import save_fsdp_optimizer

            save_fsdp_optimizer(acc.state.fsdp_plugin, acc, self.optimizer, self.loss_model, tmp)
        elif run.main:
            torch.save(self.optimizer.state_dict(), tmp / ckpt.OPTIMIZER_FILE)
        if run.main:
            torch.save(self.scheduler.state_dict(), tmp / ckpt.SCHEDULER_FILE)

    def _meta(self, step: int, global_step: int, final: bool) -> dict:
        run = self.run
        return {
            "arm": run.arm, "seed": run.seed, "stage": self.stage.name, "stage_index": self.k, "step": step,
            "steps": self.data.steps, "global_step": global_step, "final": final,
            "epoch": step / self.data.plan.steps_per_epoch, "data_version": run.data_version,
            "config": training_view(run.config, run.arm, run.seed),
            "stage_key": run.stage_key(self.k), "code_version": run.code_version, "base_model": run.base.identity,
            "init": str(self.init_dir), "loss": self.stage.loss, "world_size": run.accelerator.num_processes,
            "precision": training_precision(run.accelerator),
            "created": time.time(),
        } | self.warmup.meta()

    # ----------------------------------------------------------------------- clean-up

    def cleanup(self) -> None:
        if self.bar is not None:  # closed before any error line is printed, not at garbage collection after it
            self.bar.close()
        self.run.accelerator.free_memory()


def step_threads(train, accelerator, parameter_bytes: int) -> int:
    """Work threads for a step's pieces: train.cpu_threads (null: one per core, as many as half the memory holds
    at a gradient copy and the activations of a piece, ~2x the trained parameters, each) on a CPU in one process;
    1 where the pieces need backward() itself (DDP's hooks, FSDP, compiled graphs, reentrant checkpointing)."""
    if (accelerator.device.type != "cpu" or accelerator.num_processes > 1 or _is_fsdp(accelerator)
            or train.compile != "none" or train.gradient_checkpointing):
        return 1
    if train.cpu_threads is not None:
        return train.cpu_threads
    return max(1, min(cpu_threads(), memory_bytes() // 2 // (2 * max(1, parameter_bytes))))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up from 1/warmup, then the schedule."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def _stage_seed(seed: int, stage_index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"sftkey-stage:{seed}:{stage_index}".encode()).digest()[:4], "big")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms and biases keep their scale."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]

def _stage_checkpoint(run: ArmRun, k: int) -> tuple[Path, dict] | None:
    """The newest periodic checkpoint of stage k, where an interrupted stage continues."""
    mine = [(f, m) for f, m in ckpt.complete_checkpoints(run.paths.checkpoints) if m["stage_index"] == k and not m["final"]]
    return mine[-1] if mine else None


def _progress_bar(run: ArmRun, stage: str, total: int, start: int):
    if not (run.progress and run.main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"{run.arm}/seed{run.seed}/{stage}", unit="step", dynamic_ncols=True)


# --------------------------------------------------------------------------- models


def _model_folder(name: str | Path) -> Path:
    """A model name or folder as a checked local folder: config.json and complete safetensors, never pickles."""
    from sftkey.models import resolve_model

    return resolve_model(str(name))


def _load_tokenizer(name: str | Path):
    from sftkey.models import load_tokenizer

    return load_tokenizer(name)  # resolves and checks the folder too


def _load_model(config: TrainConfig, folder: Path, adapter: Path | None):
    from transformers import AutoModelForCausalLM

    folder = _model_folder(folder)  # a checkpoint cut short fails here in one line, not inside transformers
    check_attn_implementation(config.train.attn_implementation)  # flash attention without CUDA or its package
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                 attn_implementation=config.train.attn_implementation)
    lora = config.train.lora
    if lora is not None:
        from peft import LoraConfig, PeftModel, get_peft_model

        if adapter is not None:
            _check_adapter(adapter)  # PEFT has no use_safetensors: it reads the safetensors file when present
            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        else:
            settings = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                  target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
            model = get_peft_model(model, settings)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model


def _check_adapter(adapter: Path) -> None:
    """A LoRA adapter folder must hold complete safetensors weights (PEFT would fall back to a pickle)."""
    from sftkey.models import ModelResolveError, check_safetensors

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelResolveError(f"{adapter}: no adapter_model.safetensors (pickled adapters are not loaded); "
                                "delete the checkpoint folder and resume from the one before it")
    check_safetensors(weights)


# --------------------------------------------------------------------------- reuse of another arm's stage


def _reuse_stage(run: ArmRun, k: int, final: Path) -> dict | None:
    """Link another arm's finished checkpoint of the identical stage (same key) in place of training it again."""
    source = finished_stage(Path(run.config.output_dir), run.seed, run.stage_key(k))
    run.accelerator.wait_for_everyone()
    if source is None:
        return None
    name = run.stages[k].stage.name
    meta = ckpt.read_meta(source) | {"arm": run.arm, "stage": name, "reused_from": str(source)}
    if run.main:
        tmp = ckpt.temp_folder(final)
        shutil.rmtree(tmp, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        ckpt.link_copy(source, tmp)
        ckpt.commit(tmp, final, meta)  # sftkey.json is replaced by rename, never written through the link
        log.info("stage %s: reused %s (identical stage of another arm)", name, source)
    run.accelerator.wait_for_everyone()
    return meta


# --------------------------------------------------------------------------- run record


def _write_run(run: ArmRun, record: dict) -> None:
    if run.main:
        run.paths.root.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(run.paths.run_json, record)


def _atomic_text(path: Path, text: str) -> None:
    write_text(path, text)


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists and nested stages become JSON strings."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out
