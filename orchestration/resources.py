"""The model store (where data sets, checkpoints and scores live) and the compute resource (where training runs).

Everything heavy is content-addressed: a folder's name is a hash of what decides its content (data version,
config, upstream keys). An unchanged upstream therefore finds its finished folder and does no work, a crashed
materialization finds its partial folder and resumes, and two pipeline runs with different configs write to
different folders. Two runs with the same config take turns through a file lock on the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
from pathlib import Path
from typing import Any, Iterator

import dagster as dg
from sftkey.atomic import write_text


def content_key(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts and of the code version: the name of a content-addressed folder.
    Other code (another release, commit or local change) never reuses a folder that this code made."""
    from sftkey import version  # module attribute, so a test can stand in another code version

    keyed = [version.code_version(), *parts]
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ModelStore(dg.ConfigurableResource):
    """Folders for content-addressed outputs (`root`) and for this pipeline run's own outputs (`run_dir`)."""

    root: str  # work_dir/store (orchestration.config.resources)
    run_dir: str  # comparison tables, plots, reports of one pipeline run

    def folder(self, kind: str, key: str) -> Path:
        return Path(self.root).resolve() / kind / key

    @contextlib.contextmanager
    def claim(self, kind: str, key: str) -> Iterator[Path]:
        """The folder for (kind, key), held exclusively: a second run with the same key waits, then reuses it."""
        from filelock import FileLock

        folder = self.folder(kind, key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder.parent / f".{key}.lock")):
            yield folder

    def run_folder(self, *parts: str) -> Path:
        folder = Path(self.run_dir).resolve().joinpath(*parts)
        folder.mkdir(parents=True, exist_ok=True)
        return folder


class ComputeResource(dg.ConfigurableResource):
    """Where training runs: in this process, or launched (`accelerate launch` or `torchrun`, on one machine or
    several, or in a Kubernetes pod) and reporting back through Dagster Pipes (orchestration.launchers)."""

    device: str  # the `compute:` section: auto (cuda when available), cpu, cuda
    num_processes: int  # per machine; > 1: a launched subprocess
    launcher: str = "accelerate"  # accelerate, torchrun, k8s
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None  # None: a free port on one machine, launchers.DEFAULT_PORT across machines
    rdzv_backend: str = "static"
    k8s: dict[str, Any] = {}  # the `compute.k8s:` section (launcher: k8s)

    @classmethod
    def from_section(cls, compute) -> "ComputeResource":
        """From orchestration.config.ComputeSection."""
        import dataclasses

        fields = {f.name: getattr(compute, f.name) for f in dataclasses.fields(compute) if f.name in cls.model_fields}
        # unset (None) entries left out: Dagster's config schema refuses nulls inside a map
        k8s = {key: value for key, value in dataclasses.asdict(compute.k8s).items() if value is not None}
        return cls(**fields | {"k8s": k8s})

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def launched(self) -> bool:
        return self.num_processes > 1 or self.num_machines > 1 or self.launcher == "k8s"

    def run_stage(self, context: dg.AssetExecutionContext, training, arm: str, seed: int, stage_index: int,
                  init: str, prepared_folder: str, tracker=None, env: dict[str, str] | None = None) -> Path:
        """One training stage (sftkey.train.trainer.run_stage, resuming an interrupted one): in this process, or
        launched (see `launched`), reporting back through Dagster Pipes. `tracker`: the in-process stage's metric
        logger; `env`: added to a launched stage's environment."""
        if not self.launched:
            from sftkey.prepare import read_prepared
            from sftkey.train.trainer import run_stage

            return run_stage(training, arm, seed, stage_index, init, resume=True, tracker=tracker,
                             prepared=read_prepared(Path(prepared_folder)))
        return self.run_launched(context, self.stage_args(training, arm, seed, stage_index, init, prepared_folder),
                                 f"stage {stage_index} of arm {arm} seed {seed}", env or {})

    @staticmethod
    def stage_args(training, arm: str, seed: int, stage_index: int, init: str, prepared_folder: str) -> list[str]:
        """orchestration.launch_stage's arguments; the resolved config is written beside the stage's output."""
        from sftkey.config_file import dump_yaml
        from sftkey.train.config import config_dict

        work = Path(training.output_dir)
        config_file = write_text(work / f".{arm}-seed{seed}-stage{stage_index}.yaml", dump_yaml(config_dict(training)))
        return ["--config", str(config_file), "--arm", arm, "--seed", str(seed), "--stage-index", str(stage_index),
                "--init", str(init), "--prepared", str(prepared_folder)]

    def run_launched(self, context: dg.AssetExecutionContext, args: list[str], what: str, env: dict[str, str]) -> Path:
        """orchestration.launch_stage with `args`, in a pod or under this machine's launcher (the commands of the
        other machines logged); the checkpoint its main process reports."""
        from orchestration import launchers

        module = launchers.STAGE_MODULE
        if self.launcher == "k8s":
            command = self.launch_command(module, args, python="python")  # the image's interpreter
            context.log.info(f"{what}: pod running " + shlex.join(command))
            result = launchers.run_pod(context, launchers.PodSettings(**self.k8s), command, self.launch_env(env))
        else:
            launch = self.launch()
            command = launchers.launch_command(launch, module, args)
            for rank, other in enumerate(launchers.node_commands(launch, module, args)):
                if rank != self.machine_rank:
                    context.log.info(f"{what}: machine {rank} of {self.num_machines} runs " + shlex.join(other))
            context.log.info(f"{what}: launching " + shlex.join(command))
            result = launchers.run_subprocess(context, command, self.launch_env(env))
        return launchers.checked_checkpoint(launchers.reported_checkpoint(result, f"the launched {what}"),
                                            f"the launched {what}")

    def launch(self, python: str | None = None):
        """The launcher settings (orchestration.launchers.Launch) of this machine."""
        import sys

        from orchestration import launchers

        several = self.num_machines > 1 or self.launcher == "k8s"
        port = self.main_process_port or (launchers.DEFAULT_PORT if several else _free_port())
        launcher = "accelerate" if self.launcher == "k8s" else self.launcher
        return launchers.Launch(launcher=launcher, num_processes=self.num_processes, num_machines=self.num_machines,
                                machine_rank=self.machine_rank, main_process_ip=self.main_process_ip or "127.0.0.1",
                                main_process_port=port, rdzv_backend=self.rdzv_backend, python=python or sys.executable)

    def launch_command(self, module: str, args: list[str], python: str | None = None) -> list[str]:
        """The command this machine runs: `python -m module args` under `accelerate launch` or `torchrun` on
        `num_processes` processes here (of `num_machines` machines), or plainly for a single process."""
        from orchestration import launchers

        return launchers.launch_command(self.launch(python), module, args)

    def launch_env(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """The launched stage's environment on top of this process's: thread count, hidden GPUs for device: cpu,
        then `env` (e.g. the telemetry's MLflow run)."""
        launched = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if self.device == "cpu" or (self.launcher != "k8s" and self.resolved_device() == "cpu"):
            launched["CUDA_VISIBLE_DEVICES"] = ""  # device: cpu on a GPU machine
        return launched | dict(env or {})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
