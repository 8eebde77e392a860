"""The training job: an arm's stages run one after another, each starting from the previous stage's final checkpoint.

Built on accelerate, so the same code runs in one process or data parallel (`accelerate launch`, `torchrun`), with
FSDP on request. A global batch (train.batch_size examples) is split into processes x grad_accum micro-batches;
every micro-batch's summed loss is divided by the weight sum of the whole global batch (known from the data before
the step), so the gradient is the same whatever the split, up to float rounding.

    train_arm(config, arm, seed)           every stage of one arm and seed -> the last stage's final checkpoint
    run_stage(config, arm, seed, k, init)  one stage from a given starting model (for orchestration assets)

A run lives in `{output_dir}/{arm}/seed{seed}/`: `config.yaml` (resolved), `metrics.jsonl` (one line per optimizer
step), `run.json` (status, stages, final checkpoint, base model) and `checkpoints/` (`step-XXXXXXXX/` every
train.save_every steps, `<stage>-final/` at the end of each stage; see sftkey.train.checkpoint). The base model is
resolved once per job (with `model_fallback` where `model` cannot be), and its identity (sftkey.models.
weights_identity) is recorded in run.json, every checkpoint's sftkey.json (`base_model`) and the tracker params.
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
from sftkey.errors import UserError
from sftkey.loss import LossParts, normalize
from sftkey.models import ResolvedModel, identity_params, resolve_base_model
from sftkey.roles import ROLE_NAMES
from sftkey.train import checkpoint as ckpt
from sftkey.train.batching import Sample, StagePlan, micro_batch, rank_micro_batches, stage_samples, stage_steps, warmup_steps
from sftkey.train.config import (
    ArmConfig,
    ConfigError,
    TrainConfig,
    dump_yaml,
    first_difference,
    run_config,
    stage_key,
    stage_loss,
    stage_view,
    training_view,
    validate,
)
from sftkey.train.objective import LossModel
from sftkey.train.tracking import FanoutTracker, JsonlTracker, NullTracker, Tracker

log = logging.getLogger("sftkey.train")

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
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
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def run_json(self) -> Path:
        return self.root / RUN_FILE


def run_paths(config: TrainConfig, arm: str, seed: int) -> RunPaths:
    return RunPaths(Path(config.output_dir) / arm / f"seed{seed}")


@dataclass
class StageData:
    samples: list[Sample]
    dropped: int  # examples with no weighted target under this stage's loss
    plan: StagePlan
    steps: int
    warmup: int


@dataclass
class Job:
    """Everything a stage needs that does not change between stages: built once per arm and seed."""

    config: TrainConfig
    arm_name: str
    arm: ArmConfig
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
        return stage_key(self.config, self.arm_name, self.seed, stage_index, self.data_version, self.base_sha256)

    def global_offset(self, stage_index: int) -> int:
        return sum(s.steps for s in self.stages[:stage_index])


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
    job = _setup(config, arm, seed, tracker, resume, prepared, progress)
    with contextlib.closing(job.lock):  # closing the file releases the run folder's lock
        return _train_stages(job, resume)


def _train_stages(job: Job, resume: bool) -> Path:
    config, arm, seed = job.config, job.arm_name, job.seed
    started = time.time()
    run = {"arm": arm, "seed": seed, "status": "running", "pid": os.getpid(), "host": socket.gethostname(),
           "data_version": job.data_version, "base_model": job.base.identity, "stages": [], "final_checkpoint": None,
           "started": started}
    _write_run(job, run)
    job.tracker.set_tags({"arm": arm, "seed": str(seed)})
    job.tracker.log_params(_flat(training_view(config, arm, seed)) | {"data_version": job.data_version}
                           | _flat(identity_params(job.base.identity)))
    init: str | Path = job.base.folder
    try:
        for k, stage in enumerate(job.arm.stages):
            final = job.paths.checkpoints / ckpt.final_name(stage.name)
            entry = {"name": stage.name, "checkpoint": str(final), "steps": job.stages[k].steps}
            meta = ckpt.read_meta(final)
            if meta is not None:
                log.info("stage %s: already finished, %s", stage.name, final)
            else:
                meta = _reuse_stage(job, k, final)
            if meta is None:
                _run_stage(job, k, init, resume=resume)
            elif meta.get("reused_from"):
                entry["reused_from"] = meta["reused_from"]
            run["stages"].append(entry)
            _write_run(job, run)
            init = final
    except BaseException as error:
        run |= {"status": ended_status(error), "error": f"{type(error).__name__}: {error}",
                "wall_s": round(time.time() - started, 1)}
        _write_run(job, run)
        raise
    run |= {"status": "done", "final_checkpoint": str(init), "wall_s": round(time.time() - started, 1)}
    _write_run(job, run)
    return Path(init)


def run_stage(config: TrainConfig, arm: str, seed: int, stage_index: int, init: str | Path, *,
              tracker: Tracker | None = None, resume: bool = True, prepared=None, progress: bool = False) -> Path:
    """Run one stage of `arm` from the model `init` (a model name or a checkpoint folder); returns its final checkpoint.

    The result is the same as that stage inside `train_arm` when `init` is the previous stage's final checkpoint.
    A finished stage is returned as is; with `resume`, an interrupted one continues from its newest checkpoint.
    `init` equal to `config.model` means the base model as the job resolved it (with `model_fallback`).
    """
    job = _setup(config, arm, seed, tracker, resume, prepared, progress, check_existing=False)
    with contextlib.closing(job.lock):
        return _run_one_stage(job, stage_index, init, resume)


def _run_one_stage(job: Job, stage_index: int, init: str | Path, resume: bool) -> Path:
    config, arm, seed = job.config, job.arm_name, job.seed
    if str(init) == config.model:
        init = job.base.folder
    if not 0 <= stage_index < len(job.arm.stages):
        raise ConfigError(f"arm {arm!r} has {len(job.arm.stages)} stages; stage index {stage_index} does not exist")
    final = job.paths.checkpoints / ckpt.final_name(job.arm.stages[stage_index].name)
    meta = ckpt.read_meta(final)
    if meta is not None:
        _check_resumable(job, final, meta)
        return final
    job.tracker.set_tags({"arm": arm, "seed": str(seed)})
    job.tracker.log_params(_flat(identity_params(job.base.identity)))
    return _run_stage(job, stage_index, init, resume=resume)


# --------------------------------------------------------------------------- set-up: every check before any work


def _setup(config: TrainConfig, arm: str, seed: int, tracker: Tracker | None, resume: bool, prepared, progress: bool,
           check_existing: bool = True) -> Job:
    validate(config)
    if arm not in config.arms:
        raise ConfigError(f"no arm {arm!r} in the config; arms: {', '.join(config.arms)}")
    arm_config = config.arms[arm]
    accelerator = make_accelerator(config)
    if config.train.fsdp and not _is_fsdp(accelerator):
        raise ConfigError(f"train.fsdp is true but accelerate's distributed type is {accelerator.distributed_type.value}, "
                          "not FSDP: FSDP shards over GPU processes started by `accelerate launch` or torchrun; set "
                          "train.fsdp: false to train data parallel or in one process")
    world = accelerator.num_processes
    micro_parts = world * config.train.grad_accum
    if config.train.batch_size % micro_parts:
        raise ConfigError(f"train.batch_size {config.train.batch_size} does not split into {world} processes x "
                          f"train.grad_accum {config.train.grad_accum}: make it a multiple of {micro_parts}")
    base = resolve_base_model(config.model, config.model_fallback, announce=accelerator.is_main_process)
    tokenizer = _load_tokenizer(base.folder)
    tagged = arm_config.format == "tagged"
    if prepared is None:
        from sftkey.prepare import prepare

        prepared = prepare(config.data.prepare_config(tagged), tokenizer)
    elif prepared.meta["config"]["tagged"] != tagged:
        raise ConfigError(f"arm {arm!r} trains on the {arm_config.format} format but the prepared data is not")
    stages = []
    for k, stage in enumerate(arm_config.stages):
        where = f"arms.{arm}.stages[{k}] ({stage.name})"
        try:
            samples, dropped = stage_samples(prepared.examples, stage_loss(stage))
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
        if stage.warmup_epochs is not None or stage.warmup_steps is not None:
            warm = warmup_steps(stage.warmup_epochs or 0.0, stage.warmup_steps, plan.steps_per_epoch, steps)
        else:
            warm = warmup_steps(config.train.warmup_epochs, config.train.warmup_steps, plan.steps_per_epoch, steps)
        stages.append(StageData(samples, dropped, plan, steps, warm))
    paths = run_paths(config, arm, seed)
    job = Job(config, arm, arm_config, seed, paths, accelerator, base, tokenizer, prepared.meta["data_version"],
              stages, NullTracker(), progress)
    job.lock = _lock_run(paths.root, accelerator.process_index)
    try:
        _claim_run(job, resume, check_existing, tracker)
    except BaseException:
        job.lock.close()
        raise
    return job


def _claim_run(job: Job, resume: bool, check_existing: bool, tracker: Tracker | None) -> None:
    """Holding the lock: settle what a dead run left (run.json, bad checkpoints, its metrics), then start ours."""
    config, arm, seed, paths, accelerator = job.config, job.arm_name, job.seed, job.paths, job.accelerator
    if job.main:
        _mark_dead_run(paths.run_json)
    newest = ckpt.latest(paths.checkpoints)
    if newest is not None and check_existing and not resume:
        raise RunStateError(f"{paths.root} already holds checkpoints (newest {newest[0].name}): pass --resume to "
                            "continue or reuse it, or choose another output_dir")
    newest = _newest_loadable(job)
    if newest is not None:
        _check_resumable(job, *newest)
    if job.main:
        paths.root.mkdir(parents=True, exist_ok=True)
        jsonl = JsonlTracker(paths.metrics)
        # a dead run logged steps past its last checkpoint (all of them when it wrote none): those run again
        for line in jsonl.drop_metrics_after(newest[1]["global_step"] if newest else 0):
            log.warning("%s", line)
        job.tracker = FanoutTracker(jsonl, tracker) if tracker is not None else jsonl
        header = f"# resolved config of arm {arm}, seed {seed}; rerun: sftkey train --config {paths.config} --resume"
        _atomic_text(paths.config, dump_yaml(run_config(config, arm, seed), header))
    accelerator.wait_for_everyone()


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
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunStateError(f"{root}: another sftkey train ({holder}) is training this run folder; wait for it to "
                            "finish or stop it, then rerun with --resume") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def _mark_dead_run(run_json: Path) -> None:
    """A run.json still "running" while we hold the lock was left by a process that died without a word (kill -9,
    out of memory, power loss): its pid is gone, so the run was interrupted."""
    try:
        run = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if run.get("status") != "running":
        return
    who = f"pid {run.get('pid', '?')} on {run.get('host', '?')}"
    run |= {"status": "interrupted", "error": f"{who} died while running (killed with SIGKILL, out of memory or "
                                              "lost power); no status was written"}
    ckpt.write_json(run_json, run)
    log.warning("%s: the previous run (%s) died while running; marked interrupted", run_json, who)


def _newest_loadable(job: Job) -> tuple[Path, dict] | None:
    """The newest complete checkpoint that loads. Newer ones that do not (a cut or zero-byte file, an unreadable
    sftkey.json) are renamed aside, never deleted, and the log says so and where training resumes instead."""
    checkpoints = job.paths.checkpoints
    found = ckpt.complete_checkpoints(checkpoints)
    complete = {folder for folder, _meta in found}
    bad = [(folder, f"no readable {ckpt.META_FILE}") for folder in sorted(checkpoints.glob("[!.]*"))
           if folder.is_dir() and folder not in complete]  # renamed into place, so a folder without it is damaged
    while found and (problem := ckpt.load_problem(*found[-1])) is not None:
        bad.append((found.pop()[0], problem))
    job.accelerator.wait_for_everyone()  # every process has looked before the main one renames
    if job.main:
        instead = f"resuming from {found[-1][0].name}" if found else "no usable checkpoint left, starting over"
        for folder, problem in bad:
            aside = ckpt.set_aside(folder)
            log.warning("checkpoint %s does not load (%s): moved aside to %s; %s", folder, problem, aside.name, instead)
    job.accelerator.wait_for_everyone()
    return found[-1] if found else None


def ended_status(error: BaseException) -> str:
    """run.json's status for a run stopped by `error`: Ctrl-C, SIGTERM, or a failure."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return "killed" if isinstance(error, Terminated) else "failed"


def make_accelerator(config: TrainConfig):
    """bf16 autocast on a GPU (precision auto), fp32 on CPU; `cpu=True` on a CPU-only machine lets torchrun start gloo."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    kwargs = {}
    if config.train.fsdp:
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT"
        )
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if precision == "bf16" else "no", **kwargs)


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _check_resumable(job: Job, folder: Path, meta: dict) -> None:
    """A checkpoint fits the job when its stage key is the one the job gives its stage: same base weights, data and
    everything that decides that stage. A stage linked from another arm carries that arm's config; its key is ours."""
    if meta.get("arm") != job.arm_name or meta.get("seed") != job.seed:
        raise RunStateError(f"{folder}: belongs to arm {meta.get('arm')!r} seed {meta.get('seed')}, not arm "
                            f"{job.arm_name!r} seed {job.seed}; point output_dir elsewhere")
    if meta["data_version"] != job.data_version:
        raise RunStateError(f"{folder}: made from data version {meta['data_version'][:16]}, but the data now has "
                            f"version {job.data_version[:16]}; use another output_dir or restore the data")
    old = meta.get("base_model") or {}
    if old.get("weights_sha256") != job.base_sha256:
        now = job.base.identity
        if not old:
            raise RunStateError(f"{folder}: made by an older sftkey that did not record its base model's weights, so "
                                f"it cannot be checked against {now['description']} (weights sha256 "
                                f"{job.base_sha256}); use another output_dir")
        raise RunStateError(
            f"{folder}: trained from base weights sha256 {old.get('weights_sha256')} ({old.get('description')}), but "
            f"model {job.config.model!r} now gives weights sha256 {job.base_sha256} ({now['description']}); resume "
            f"where it resolves to the old weights (e.g. with the hub reachable, or the same model_fallback), or use "
            "another output_dir")
    k = meta["stage_index"]
    if meta.get("stage_key") != job.stage_key(k):
        mine = training_view(job.config, job.arm_name, job.seed)
        diff = first_difference(stage_view(meta["config"], k, job.arm_name), stage_view(mine, k, job.arm_name))
        if diff is None and meta.get("code_version") != job.code_version:
            diff = f"code version {meta.get('code_version') or 'unrecorded'} -> {job.code_version}"
        raise RunStateError(f"{folder}: made with a different config ({diff or 'another stage key: an older sftkey'}); "
                            "use another output_dir, or put the old value (or code) back to resume")


# --------------------------------------------------------------------------- one stage


def _run_stage(job: Job, k: int, init: str | Path, resume: bool = True) -> Path:
    from accelerate.utils import set_seed

    config, train, acc = job.config, job.config.train, job.accelerator
    stage, data = job.arm.stages[k], job.stages[k]
    spec = stage_loss(stage)
    resume_from = _stage_checkpoint(job, k) if resume else None
    init_dir = _model_folder(resume_from[1]["init"] if resume_from else init)
    set_seed(_stage_seed(job.seed, k))
    if resume_from is None:
        model = _load_model(config, init_dir, adapter=None)
    elif train.lora is not None:  # the stage's starting weights plus the adapter trained so far
        model = _load_model(config, init_dir, adapter=resume_from[0] / ckpt.ADAPTER_DIR)
    else:
        model = _load_model(config, resume_from[0], adapter=None)
    loss_model = LossModel(model, sparse_logits=train.sparse_logits)
    loss_model._no_split_modules = getattr(loss_model.causal_lm(), "_no_split_modules", None)  # FSDP wraps these
    optimizer = torch.optim.AdamW(_param_groups(model, train.weight_decay), lr=config.stage_lr(stage),
                                  betas=tuple(train.betas), eps=train.eps, fused=acc.device.type == "cuda" or None)
    schedule = config.stage_schedule(stage)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, data.steps, data.warmup, schedule))
    start = 0
    fsdp = _is_fsdp(acc)
    if resume_from:
        folder, meta = resume_from
        if not fsdp:  # FSDP's sharded state loads after wrapping, below
            optimizer.load_state_dict(torch.load(folder / ckpt.OPTIMIZER_FILE, weights_only=True))
        scheduler.load_state_dict(torch.load(folder / ckpt.SCHEDULER_FILE, weights_only=True))
        ckpt.set_rng_state(torch.load(folder / ckpt.rng_file(acc.process_index), weights_only=True))
        start = meta["step"]
        log.info("stage %s: resuming at step %d from %s", stage.name, start, folder)
    loss_model, optimizer = acc.prepare(loss_model, optimizer)
    if resume_from and fsdp:
        from accelerate.utils import load_fsdp_optimizer

        load_fsdp_optimizer(acc.state.fsdp_plugin, acc, optimizer, loss_model, resume_from[0])

    offset = job.global_offset(k)
    job.tracker.set_tags({"stage": stage.name})
    job.tracker.log_params({f"{stage.name}.steps": data.steps, f"{stage.name}.warmup_steps": data.warmup,
                            f"{stage.name}.examples": len(data.samples), f"{stage.name}.examples_dropped": data.dropped,
                            f"{stage.name}.init": str(init_dir)})
    if job.main and data.dropped:
        log.info("stage %s: %d examples have no weighted token under loss %s and are left out",
                 stage.name, data.dropped, stage.loss)
    bar = _progress_bar(job, stage.name, data.steps, start)
    last_checkpoint = resume_from[0] if resume_from else (init_dir if ckpt.read_meta(init_dir) else None)
    world, rank = acc.num_processes, acc.process_index
    pad_id = job.tokenizer.pad_token_id if job.tokenizer.pad_token_id is not None else 0
    try:  # the bar is closed before any error line is printed, not at garbage collection after it
        for step in range(start, data.steps):
            began = time.perf_counter()
            batch = data.plan.batch(step)
            # the whole global batch's denominators, known before the step: every micro-batch divides by them
            weight_sum = torch.tensor(float(sum(data.samples[i].weight_sum for i in batch)), device=acc.device)
            token_count = torch.tensor(float(sum(data.samples[i].token_count for i in batch)), device=acc.device)
            all_roles = step % train.log_every == 0 or step == data.steps - 1
            stats = torch.zeros(1 + 2 * len(ROLE_NAMES) + 1, dtype=torch.float64)  # total, role nll, role count, tokens
            micro = rank_micro_batches(batch, world, train.grad_accum, rank)
            for a, indices in enumerate(micro):
                mb = micro_batch(data.samples, indices, pad_id, train.packing, train.pack_length, train.attn_implementation)
                inputs = {name: t.to(acc.device) for name, t in mb.tensors.items()}
                sync = contextlib.nullcontext() if a == len(micro) - 1 else acc.no_sync(loss_model)
                with sync:
                    out = loss_model(**inputs, dft=spec.dft, all_roles=all_roles)
                    # DDP averages gradients over processes; the sum over processes is what the global batch needs.
                    acc.backward(normalize(LossParts(out["total"], weight_sum, token_count), train.normalizer) * world)
                stats += torch.cat([out["total"].detach().reshape(1), out["role_nll"], out["role_count"],
                                    torch.tensor([float(mb.tokens)], device=acc.device)]).double().cpu()
            stats = acc.reduce(stats.to(acc.device), reduction="sum").cpu()
            loss = normalize(LossParts(stats[0], weight_sum.double().cpu(), token_count.double().cpu()), train.normalizer).item()
            if not math.isfinite(loss):
                _stop(job, stage.name, step, offset, f"loss is {loss}", batch, data, last_checkpoint)
            grad_norm = acc.clip_grad_norm_(loss_model.parameters(), train.max_grad_norm or math.inf)
            grad_norm = float(grad_norm)
            if not math.isfinite(grad_norm):
                _stop(job, stage.name, step, offset, f"gradient norm is {grad_norm}", batch, data, last_checkpoint)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - began
            tokens = int(stats[-1])
            metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                       "tokens_per_s": tokens / seconds, "epoch": (step + 1) / data.plan.steps_per_epoch}
            nll, count = stats[1 : 1 + len(ROLE_NAMES)], stats[1 + len(ROLE_NAMES) : 1 + 2 * len(ROLE_NAMES)]
            for role in LOGGED_ROLES:
                r = ROLE_NAMES.index(role)
                if count[r] > 0:
                    metrics[f"loss_{role}"] = (nll[r] / count[r]).item()
            job.tracker.log_metrics(metrics, step=offset + step + 1)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
            if train.save_every and (step + 1) % train.save_every == 0 and step + 1 < data.steps:
                last_checkpoint = _save(job, k, step + 1, loss_model, optimizer, scheduler, init_dir, final=False)
    finally:
        if bar is not None:
            bar.close()
    final = _save(job, k, data.steps, loss_model, optimizer, scheduler, init_dir, final=True)
    job.tracker.log_artifact(final)
    acc.free_memory()
    return final


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


def _stop(job: Job, stage: str, step: int, offset: int, what: str, batch: list[int], data: StageData,
          last_checkpoint: Path | None) -> None:
    uids = [data.samples[i].uid for i in batch]
    shown = ", ".join(uids[:8]) + (f", ... ({len(uids)} examples)" if len(uids) > 8 else "")
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint of this run was written"
    raise TrainingError(f"stage {stage} step {step + 1} (global step {offset + step + 1}): {what} on the batch "
                        f"[{shown}]; stopped before the optimizer step, {kept}")


def _stage_seed(seed: int, stage_index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"sftkey-stage:{seed}:{stage_index}".encode()).digest()[:4], "big")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms and biases keep their scale."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]


def _stage_checkpoint(job: Job, k: int) -> tuple[Path, dict] | None:
    """The newest periodic checkpoint of stage k, where an interrupted stage continues."""
    mine = [(f, m) for f, m in ckpt.complete_checkpoints(job.paths.checkpoints) if m["stage_index"] == k and not m["final"]]
    return mine[-1] if mine else None


def _progress_bar(job: Job, stage: str, total: int, start: int):
    if not (job.progress and job.main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"{job.arm_name}/seed{job.seed}/{stage}", unit="step", dynamic_ncols=True)


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


# --------------------------------------------------------------------------- checkpoints


def _save(job: Job, k: int, step: int, loss_model, optimizer, scheduler, init_dir: Path, final: bool) -> Path:
    """All processes call this (FSDP gathers the weights collectively); the main process writes and renames."""
    acc, stage = job.accelerator, job.arm.stages[k]
    global_step = job.global_offset(k) + step
    name = ckpt.final_name(stage.name) if final else ckpt.periodic_name(global_step)
    folder = job.paths.checkpoints / name
    tmp = ckpt.temp_folder(folder)
    if job.main:
        ckpt.begin(folder)
    acc.wait_for_everyone()
    fsdp = _is_fsdp(acc)
    state_dict = acc.get_state_dict(loss_model) if fsdp else None  # collective under FSDP
    if job.main:
        lm_wrapper = acc.unwrap_model(loss_model).model
        if job.config.train.lora is not None:
            import copy

            lm_wrapper.save_pretrained(tmp / ckpt.ADAPTER_DIR)
            copy.deepcopy(lm_wrapper).merge_and_unload().save_pretrained(tmp, safe_serialization=True)
        elif state_dict is not None:
            weights = {name.removeprefix("model."): t for name, t in state_dict.items()}
            lm_wrapper.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        else:
            lm_wrapper.save_pretrained(tmp, safe_serialization=True)
        job.tokenizer.save_pretrained(tmp)
    if not final:
        if fsdp:
            from accelerate.utils import save_fsdp_optimizer

            save_fsdp_optimizer(acc.state.fsdp_plugin, acc, optimizer, loss_model, tmp)
        elif job.main:
            torch.save(optimizer.state_dict(), tmp / ckpt.OPTIMIZER_FILE)
        if job.main:
            torch.save(scheduler.state_dict(), tmp / ckpt.SCHEDULER_FILE)
    torch.save(ckpt.rng_state(), tmp / ckpt.rng_file(acc.process_index))
    acc.wait_for_everyone()
    if job.main:
        data = job.stages[k]
        meta = {
            "arm": job.arm_name, "seed": job.seed, "stage": stage.name, "stage_index": k, "step": step,
            "steps": data.steps, "global_step": global_step, "final": final,
            "epoch": step / data.plan.steps_per_epoch, "data_version": job.data_version,
            "config": training_view(job.config, job.arm_name, job.seed),
            "stage_key": job.stage_key(k), "code_version": job.code_version, "base_model": job.base.identity,
            "init": str(init_dir), "loss": stage.loss, "world_size": acc.num_processes, "created": time.time(),
        }
        ckpt.commit(tmp, folder, meta)
        if not final:
            ckpt.prune_periodic(job.paths.checkpoints, job.config.train.keep_last)
    acc.wait_for_everyone()
    return folder


def _reuse_stage(job: Job, k: int, final: Path) -> dict | None:
    """Link another arm's finished checkpoint of the identical stage (same key) in place of training it again."""
    key = job.stage_key(k)
    pattern = f"*/seed{job.seed}/checkpoints/*{ckpt.FINAL_SUFFIX}/{ckpt.META_FILE}"
    source = None
    for meta_file in sorted(Path(job.config.output_dir).glob(pattern)):
        folder = meta_file.parent
        meta = ckpt.read_meta(folder)
        if folder.parent.parent != job.paths.root and meta and meta.get("stage_key") == key:
            source = (folder, meta)
            break
    job.accelerator.wait_for_everyone()
    if source is None:
        return None
    folder, meta = source
    meta = meta | {"arm": job.arm_name, "stage": job.arm.stages[k].name, "reused_from": str(folder)}
    if job.main:
        tmp = ckpt.temp_folder(final)
        shutil.rmtree(tmp, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        ckpt.link_copy(folder, tmp)
        ckpt.commit(tmp, final, meta)  # sftkey.json is replaced by rename, never written through the link
        log.info("stage %s: reused %s (identical stage of another arm)", job.arm.stages[k].name, folder)
    job.accelerator.wait_for_everyone()
    return meta


# --------------------------------------------------------------------------- run record


def _write_run(job: Job, run: dict) -> None:
    if job.main:
        job.paths.root.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(job.paths.run_json, run)


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
