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
    """Where training runs: in this process, or under `accelerate launch` with several processes."""

    device: str  # the `compute:` section: auto (cuda when available), cpu, cuda
    num_processes: int  # > 1: a subprocess under `accelerate launch`, reporting back through Dagster Pipes

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def run_stage(self, context: dg.AssetExecutionContext, training, arm: str, seed: int, stage_index: int,
                  init: str, prepared_folder: str) -> Path:
        """One training stage (sftkey.train.trainer.run_stage, resuming an interrupted one): in this process, or
        with `num_processes` > 1 under `accelerate launch`, reporting back through Dagster Pipes."""
        if self.num_processes == 1:
            from sftkey.prepare import read_prepared
            from sftkey.train.trainer import run_stage

            return run_stage(training, arm, seed, stage_index, init, resume=True,
                             prepared=read_prepared(Path(prepared_folder)))
        from sftkey.config_file import dump_yaml
        from sftkey.train.config import config_dict

        work = Path(training.output_dir)
        config_file = write_text(work / f".{arm}-seed{seed}-stage{stage_index}.yaml", dump_yaml(config_dict(training)))
        args = ["--config", str(config_file), "--arm", arm, "--seed", str(seed), "--stage-index", str(stage_index),
                "--init", str(init), "--prepared", str(prepared_folder)]
        command = self.launch_command("orchestration.launch_stage", args)
        context.log.info("launching " + " ".join(command))
        result = dg.PipesSubprocessClient().run(context=context, command=command, env=self.launch_env())
        messages = [m for m in result.get_custom_messages() if isinstance(m, dict) and "checkpoint" in m]
        if not messages:
            raise RuntimeError(f"`accelerate launch` of stage {stage_index} of arm {arm} seed {seed} reported no "
                               f"checkpoint; see the run's logs")
        return Path(messages[-1]["checkpoint"])

    def launch_command(self, module: str, args: list[str]) -> list[str]:
        """`accelerate launch` of a Python module on `num_processes` processes (torch.distributed: NCCL on GPUs,
        gloo on CPUs; accelerate's `--cpu` would start a single process)."""
        import sys

        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(self.num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), "-m", module, *args]

    def launch_env(self) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if self.resolved_device() == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # device: cpu on a GPU machine
        return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
