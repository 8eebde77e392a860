"""How a launched training stage starts: the command line (`accelerate launch` or `torchrun`, one machine or
several), and where it runs (a local subprocess, or a Kubernetes pod), both reporting back through Dagster Pipes.

The entry point is `orchestration.launch_stage` (the Dockerfile's ENTRYPOINT); its main process reports the
finished checkpoint as a Pipes custom message `{"checkpoint": path}`.

Several machines: every machine runs the same launcher with its own rank; the Dagster run, on machine 0, launches
rank 0 and logs the command each other machine runs (`node_commands`). Every machine reads and writes the same
work_dir (a shared filesystem), where the stage's config, data and checkpoints are.
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import dagster as dg

from sftkey.errors import UserError

DEFAULT_PORT = 29500  # torch.distributed's; a fixed port is what every machine can agree on
STAGE_MODULE = "orchestration.launch_stage"
POD_CONTAINER = "stage"
WORK_VOLUME = "work"


@dataclass(frozen=True)
class Launch:
    """The distributed settings of one launch (the `compute:` section's launcher fields)."""

    launcher: str = "accelerate"  # accelerate or torchrun (k8s pods run one of these inside)
    num_processes: int = 1  # per machine
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    main_process_port: int = DEFAULT_PORT
    rdzv_backend: str = "static"
    python: str = "python"  # the interpreter on the machine that runs the command

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_command(launch: Launch, module: str, args: list[str]) -> list[str]:
    """The command that runs `python -m module args` on this machine's share of the processes."""
    if not launch.distributed:
        return [launch.python, "-m", module, *args]
    if launch.launcher == "torchrun":
        return [launch.python, "-m", "torch.distributed.run", *_torchrun_flags(launch, module, args), "-m", module, *args]
    return [launch.python, "-m", "accelerate.commands.launch", *_accelerate_flags(launch), "-m", module, *args]


def node_commands(launch: Launch, module: str, args: list[str]) -> list[list[str]]:
    """The command each machine runs, by machine rank (the same but for the rank)."""
    return [launch_command(replace(launch, machine_rank=rank), module, args) for rank in range(launch.num_machines)]


def _accelerate_flags(launch: Launch) -> list[str]:
    # --multi_gpu starts torch.distributed (NCCL on GPUs, gloo on CPUs); accelerate's --cpu would start one process
    flags = ["--multi_gpu", "--num_processes", str(launch.world_size), "--num_machines", str(launch.num_machines),
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", launch.main_process_ip,
             "--main_process_port", str(launch.main_process_port)]
    if launch.num_machines > 1:
        flags += ["--machine_rank", str(launch.machine_rank), "--rdzv_backend", launch.rdzv_backend]
        if launch.rdzv_backend == "static":
            flags.append("--same_network")  # master address/port; without it accelerate uses a rendezvous endpoint
    return flags


def _torchrun_flags(launch: Launch, module: str, args: list[str]) -> list[str]:
    flags = ["--nnodes", str(launch.num_machines), "--nproc_per_node", str(launch.num_processes)]
    if launch.rdzv_backend == "c10d":
        # elastic rendezvous: ranks are handed out at the endpoint; the id is the same on every machine for a stage
        return flags + ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{launch.main_process_ip}:{launch.main_process_port}",
                        "--rdzv_id", rendezvous_id(module, args)]
    return flags + ["--node_rank", str(launch.machine_rank), "--master_addr", launch.main_process_ip,
                    "--master_port", str(launch.main_process_port)]


def rendezvous_id(module: str, args: list[str]) -> str:
    """One id per stage launch, computed alike on every machine."""
    return "sftkey-" + hashlib.sha256(shlex.join([module, *args]).encode()).hexdigest()[:16]


def reported_checkpoint(result: dg.PipesClientCompletedInvocation, what: str) -> Path:
    """The checkpoint that the stage's main process reported through Pipes."""
    messages = [m for m in result.get_custom_messages() if isinstance(m, dict) and "checkpoint" in m]
    if not messages:
        raise LaunchError(f"{what} reported no checkpoint; see the run's logs")
    return Path(messages[-1]["checkpoint"])


class LaunchError(UserError, RuntimeError):
    """A launched stage ran other code than this process, or reported nothing."""


def checked_checkpoint(checkpoint: Path, what: str) -> Path:
    """`checkpoint`, once its code version is this process's: the stage key (which holds it) is what the pipeline
    finds the stage by, so a pod image built from other code would retrain the stage on every run."""
    import json

    from sftkey.version import code_version

    made_by = json.loads((checkpoint / "sftkey.json").read_text()).get("code_version")
    if made_by != code_version():
        raise LaunchError(f"{what} ran code {made_by!r}, not this checkout's {code_version()!r}: rebuild the image "
                          "from this checkout (docker build -t IMAGE .) and set compute.k8s.image to it")
    return checkpoint


def run_subprocess(context: dg.AssetExecutionContext, command: list[str], env: Mapping[str, str]) -> dg.PipesClientCompletedInvocation:
    """The stage as a subprocess of this one (Pipes over a temp file, its output streamed into the run's log)."""
    return dg.PipesSubprocessClient().run(context=context, command=command, env=dict(env))


# ------------------------------------------------------------------------------------------- Kubernetes


@dataclass(frozen=True)
class PodSettings:
    """orchestration.config.K8sSection as the launcher needs it."""

    image: str
    volume_claim: str
    mount_path: str
    namespace: str | None = None
    gpus_per_pod: int = 1
    cpu: str | None = None
    memory: str | None = None
    service_account: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    image_pull_policy: str = "IfNotPresent"


def pod_spec(pod: PodSettings) -> dict[str, Any]:
    """The pod spec PipesK8sClient starts from (it fills in the image, the command and the environment, Pipes' own
    variables included): GPU limit, requests, the shared volume holding work_dir, the service account."""
    resources: dict[str, Any] = {}
    if pod.gpus_per_pod:
        resources["limits"] = {"nvidia.com/gpu": str(pod.gpus_per_pod)}  # extended resources: limits only
    requests = {k: v for k, v in (("cpu", pod.cpu), ("memory", pod.memory)) if v}
    if requests:
        resources["requests"] = requests
    container = {"name": POD_CONTAINER, "image_pull_policy": pod.image_pull_policy, "resources": resources,
                 "volume_mounts": [{"name": WORK_VOLUME, "mount_path": pod.mount_path}]}
    spec: dict[str, Any] = {"containers": [container], "restart_policy": "Never",
                            "volumes": [{"name": WORK_VOLUME, "persistent_volume_claim": {"claim_name": pod.volume_claim}}]}
    if pod.service_account:
        spec["service_account_name"] = pod.service_account
    return spec


def pod_env(pod: PodSettings, env: Mapping[str, str]) -> dict[str, str]:
    """The stage's environment in the pod. CUDA_VISIBLE_DEVICES is the device plugin's there, not this machine's."""
    merged = {**env, **pod.env}
    if pod.gpus_per_pod:
        merged.pop("CUDA_VISIBLE_DEVICES", None)
    return merged


def pod_request(pod: PodSettings, command: list[str], env: Mapping[str, str]) -> dict[str, Any]:
    """PipesK8sClient.run's arguments for one stage."""
    return {"image": pod.image, "command": command, "namespace": pod.namespace, "env": pod_env(pod, env),
            "base_pod_spec": pod_spec(pod)}


def pod_body(request: dict[str, Any], pod_name: str, pipes_env: Mapping[str, str]):
    """The V1Pod that PipesK8sClient.run submits for `request` (as it builds it: Pipes' bootstrap variables
    `pipes_env` first, the request's environment over them)."""
    from dagster_k8s.pipes import build_pod_body

    return build_pod_body(pod_name=pod_name, image=request["image"], command=request["command"],
                          env_vars={**pipes_env, **request["env"]}, base_pod_meta=None,
                          base_pod_spec=request["base_pod_spec"])


def run_pod(context: dg.AssetExecutionContext, pod: PodSettings, command: list[str],
            env: Mapping[str, str]) -> dg.PipesClientCompletedInvocation:
    """The stage in a pod (the kube config of this machine, or the cluster's own inside one), Pipes messages read
    from the pod's log; the pod is deleted when it ends."""
    from dagster_k8s import PipesK8sClient

    return PipesK8sClient().run(context=context, **pod_request(pod, command, env))
