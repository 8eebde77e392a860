"""Launched stages: the accelerate/torchrun command lines of one machine or several, the `compute:` settings'
guards, the Kubernetes pod PipesK8sClient would submit, and the Dockerfile's entry point run here on the tiny
model, reporting its checkpoint through Dagster Pipes (no cluster here: the pod itself has not run)."""

import json
import os
import shlex
import sys
from pathlib import Path

import dagster as dg
import pytest
from dagster_pipes import decode_param

from orchestration import launchers
from orchestration.config import load_pipeline_config, resources
from orchestration.resources import ComputeResource
from sftkey.config_file import ConfigError

PROJECT = Path(__file__).resolve().parents[2]
SMOKE_CONFIG = PROJECT / "configs" / "pipeline_smoke.yaml"
ARITH = PROJECT / "tests" / "train" / "fixtures" / "arith.jsonl"
PY = sys.executable
ACCELERATE = [PY, "-m", "accelerate.commands.launch", "--multi_gpu"]
FIXED = ["--mixed_precision", "no", "--dynamo_backend", "no"]
ARGS = ["--arm", "a"]
K8S = {"image": "registry.example.com/sftkey:1", "namespace": "ml", "gpus_per_pod": 4, "cpu": "16", "memory": "128Gi",
       "volume_claim": "sftkey-work", "mount_path": "/shared", "service_account": "trainer",
       "env": {"HF_HOME": "/shared/hf"}, "image_pull_policy": "Always"}


def compute(**fields) -> ComputeResource:
    return ComputeResource(**{"device": "cuda", "num_processes": 1} | fields)


# ------------------------------------------------------------------------------------------- command lines


def test_one_process_runs_the_module_plainly():
    assert compute().launch_command("m", ARGS) == [PY, "-m", "m", *ARGS]
    assert not compute().launched


def test_one_machine_runs_accelerate_on_a_free_port():
    command = compute(num_processes=2, main_process_port=1234).launch_command("m", ARGS)
    assert command == [*ACCELERATE, "--num_processes", "2", "--num_machines", "1", *FIXED, "--main_process_ip",
                       "127.0.0.1", "--main_process_port", "1234", "-m", "m", *ARGS]
    free = compute(num_processes=2).launch_command("m", ARGS)
    assert free[free.index("--main_process_port") + 1] != "29500"  # a free one: several stages launch at once


def test_accelerate_across_machines_counts_every_process_and_names_the_rank():
    machine = compute(num_processes=8, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    assert machine.launched
    assert machine.launch_command("m", ARGS) == [
        *ACCELERATE, "--num_processes", "16", "--num_machines", "2", *FIXED, "--main_process_ip", "10.0.0.1",
        "--main_process_port", "29500", "--machine_rank", "1", "--rdzv_backend", "static", "--same_network",
        "-m", "m", *ARGS]
    c10d = compute(num_processes=8, num_machines=2, main_process_ip="10.0.0.1", main_process_port=7000,
                   rdzv_backend="c10d").launch_command("m", ARGS)
    assert c10d[c10d.index("--machine_rank"):c10d.index("-m", 4)] == ["--machine_rank", "0", "--rdzv_backend", "c10d"]


def test_torchrun_static_and_c10d():
    static = compute(launcher="torchrun", num_processes=4, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    assert static.launch_command("m", ARGS) == [
        PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "4", "--node_rank", "1",
        "--master_addr", "10.0.0.1", "--master_port", "29500", "-m", "m", *ARGS]
    # one process on each of one machine still needs torchrun (world size 1 would run plainly)
    assert compute(launcher="torchrun", num_processes=2).launch_command("m", ARGS)[2] == "torch.distributed.run"
    launch = compute(launcher="torchrun", num_processes=4, num_machines=3, main_process_ip="10.0.0.1",
                     rdzv_backend="c10d").launch()
    commands = launchers.node_commands(launch, "m", ARGS)
    rdzv_id = launchers.rendezvous_id("m", ARGS)
    assert commands[0] == commands[1] == commands[2] == [
        PY, "-m", "torch.distributed.run", "--nnodes", "3", "--nproc_per_node", "4", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "10.0.0.1:29500", "--rdzv_id", rdzv_id, "-m", "m", *ARGS]
    assert rdzv_id != launchers.rendezvous_id("m", ["--arm", "b"])  # another stage, another rendezvous


def test_static_node_commands_differ_only_by_rank():
    launch = compute(num_processes=2, num_machines=2, main_process_ip="10.0.0.1").launch()
    first, second = launchers.node_commands(launch, "m", ARGS)
    assert [(a, b) for a, b in zip(first, second) if a != b] == [("0", "1")]


def test_the_launched_environment_keeps_threads_hides_gpus_for_cpu_and_adds_the_callers():
    env = compute(device="cpu").launch_env({"MLFLOW_RUN_ID": "r1"})
    assert env == {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "CUDA_VISIBLE_DEVICES": "",
                   "MLFLOW_RUN_ID": "r1"}
    assert "CUDA_VISIBLE_DEVICES" not in compute(device="cuda").launch_env()


# ------------------------------------------------------------------------------------------- config


def load(tmp_path: Path, compute_section: dict):
    return load_pipeline_config(SMOKE_CONFIG, {"work_dir": str(tmp_path / "work"), "compute": compute_section})


def test_the_compute_section_reaches_the_resource(tmp_path):
    k8s = K8S | {"mount_path": str(tmp_path)}
    config = load(tmp_path, {"device": "cuda", "num_processes": 4, "launcher": "k8s", "main_process_port": 6000,
                             "k8s": k8s})
    res = resources(config, "run-1")["compute"]
    assert (res.device, res.num_processes, res.launcher, res.num_machines, res.machine_rank, res.main_process_ip,
            res.main_process_port, res.rdzv_backend) == ("cuda", 4, "k8s", 1, 0, None, 6000, "static")
    assert res.k8s == k8s
    config = load(tmp_path, {"num_machines": 2, "main_process_ip": "10.0.0.1", "launcher": "torchrun",
                             "rdzv_backend": "c10d"})
    res = resources(config, "run-1")["compute"]
    assert (res.num_machines, res.machine_rank, res.main_process_ip, res.launcher, res.rdzv_backend, res.launched) == (
        2, 0, "10.0.0.1", "torchrun", "c10d", True)


@pytest.mark.parametrize("section,message", [
    ({"launcher": "slurm"}, r"compute\.launcher: 'slurm': use accelerate, torchrun, k8s"),
    ({"rdzv_backend": "etcd"}, r"compute\.rdzv_backend: 'etcd': use static or c10d"),
    ({"num_machines": 0}, r"compute\.num_machines: must be >= 1, got 0"),
    ({"num_machines": 2, "machine_rank": 2, "main_process_ip": "10.0.0.1"},
     r"compute\.machine_rank: 2 is not in \[0, num_machines = 2\); give each machine its own rank"),
    ({"machine_rank": -1}, r"compute\.machine_rank: -1 is not in \[0, num_machines = 1\)"),
    ({"num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.1"},
     r"compute\.machine_rank: 1: the pipeline runs on machine 0, .* run it there \(machine_rank: 0\)"),
    ({"num_machines": 2}, r"compute\.main_process_ip: num_machines: 2 needs the address of machine 0"),
    ({"main_process_port": 70000}, r"compute\.main_process_port: must be a TCP port in \[1, 65535\], got 70000"),
    ({"launcher": "k8s", "k8s": {"volume_claim": "c", "mount_path": "/"}},
     r"compute\.k8s\.image: launcher: k8s needs it, e.g. image: "),
    ({"launcher": "k8s", "k8s": {"image": "i", "mount_path": "/"}}, r"compute\.k8s\.volume_claim: launcher: k8s needs it"),
    ({"launcher": "k8s", "k8s": {"image": "i", "volume_claim": "c"}}, r"compute\.k8s\.mount_path: launcher: k8s needs it"),
    ({"launcher": "k8s", "k8s": {"image": "i", "volume_claim": "c", "mount_path": "/elsewhere"}},
     r"compute\.k8s\.mount_path: '/elsewhere': work_dir \(.*\) must lie under it"),
    ({"launcher": "k8s", "num_machines": 2, "main_process_ip": "10.0.0.1", "k8s": {"image": "i"}},
     r"compute\.num_machines: launcher: k8s runs a stage in one pod"),
    ({"launcher": "k8s", "num_processes": 8, "k8s": {"image": "i", "volume_claim": "c", "mount_path": "/", "gpus_per_pod": 4}},
     r"compute\.num_processes: 8 processes on a pod of 4 GPUs"),
    ({"launcher": "k8s", "k8s": {"image": "i", "volume_claim": "c", "mount_path": "/", "image_pull_policy": "Sometimes"}},
     r"compute\.k8s\.image_pull_policy: 'Sometimes': use Always, IfNotPresent, Never"),
    ({"k8s": {"gpus_per_node": 1}}, r"compute\.k8s\.gpus_per_node: unknown key; did you mean 'gpus_per_pod'\?"),
])
def test_bad_compute_settings_name_the_key_and_the_fix(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, section)


# ------------------------------------------------------------------------------------------- Kubernetes


def dockerfile_entrypoint() -> list[str]:
    lines = [line for line in (PROJECT / "Dockerfile").read_text().splitlines() if line.startswith("ENTRYPOINT ")]
    assert len(lines) == 1
    return json.loads(lines[0].removeprefix("ENTRYPOINT "))


def k8s_compute(**fields) -> ComputeResource:
    return compute(launcher="k8s", k8s=K8S, **fields)


def test_a_pod_runs_the_images_entry_point_or_accelerate_inside_it():
    assert dockerfile_entrypoint() == ["python", "-m", launchers.STAGE_MODULE]
    one = k8s_compute().launch_command(launchers.STAGE_MODULE, ARGS, python="python")
    assert one == dockerfile_entrypoint() + ARGS
    four = k8s_compute(num_processes=4).launch_command(launchers.STAGE_MODULE, ARGS, python="python")
    assert four == ["python", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "4",
                    "--num_machines", "1", *FIXED, "--main_process_ip", "127.0.0.1", "--main_process_port", "29500",
                    "-m", launchers.STAGE_MODULE, *ARGS]


def test_the_pod_spec_pipes_k8s_client_submits(tmp_path):
    """The V1Pod PipesK8sClient.run would create, built in a real Dagster run with the client's own context
    injector and message reader (their DAGSTER_PIPES_* variables included)."""
    from dagster._core.pipes.utils import open_pipes_session
    from dagster_k8s import PipesK8sClient

    resource = k8s_compute(num_processes=4)
    pod = launchers.PodSettings(**resource.k8s)
    command = resource.launch_command(launchers.STAGE_MODULE, ARGS, python="python")
    telemetry = {"MLFLOW_RUN_ID": "r1", "CUDA_VISIBLE_DEVICES": "2,3"}  # a local GPU slot means nothing in a pod

    @dg.asset
    def pod_of_a_stage(context: dg.AssetExecutionContext) -> dict:
        client = PipesK8sClient()
        with open_pipes_session(context=context, context_injector=client.context_injector,
                                message_reader=client.message_reader) as session:
            request = launchers.pod_request(pod, command, resource.launch_env(telemetry))
            body = launchers.pod_body(request, "stage-pod", session.get_bootstrap_env_vars()).to_dict()
        return dg.Output(body)  # a Pipes session asks for typed events

    result = dg.materialize([pod_of_a_stage], instance=dg.DagsterInstance.ephemeral())
    body = result.output_for_node("pod_of_a_stage")
    spec, = [body["spec"]]
    container, = spec["containers"]
    assert (container["name"], container["image"], container["image_pull_policy"]) == (
        "stage", "registry.example.com/sftkey:1", "Always")
    assert container["command"] == command
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "4"}, "requests": {"cpu": "16", "memory": "128Gi"},
                                      "claims": None}
    assert [(m["name"], m["mount_path"]) for m in container["volume_mounts"]] == [("work", "/shared")]
    assert [(v["name"], v["persistent_volume_claim"]["claim_name"]) for v in spec["volumes"]] == [("work", "sftkey-work")]
    assert (spec["service_account_name"], spec["restart_policy"]) == ("trainer", "Never")
    env = {e["name"]: e["value"] for e in container["env"]}
    assert {k: env[k] for k in ("MLFLOW_RUN_ID", "HF_HOME", "OMP_NUM_THREADS")} == {
        "MLFLOW_RUN_ID": "r1", "HF_HOME": "/shared/hf", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    assert "CUDA_VISIBLE_DEVICES" not in env
    # Pipes' context, and its messages written to the pod's log, where the client reads them
    assert decode_param(env["DAGSTER_PIPES_CONTEXT"])["data"]["asset_keys"] == ["pod_of_a_stage"]
    assert decode_param(env["DAGSTER_PIPES_MESSAGES"]) == {"stdio": "stderr"}


def test_a_cpu_pod_asks_for_no_gpu():
    pod = launchers.PodSettings(image="i", volume_claim="c", mount_path="/shared", gpus_per_pod=0)
    assert launchers.pod_spec(pod)["containers"][0]["resources"] == {}
    assert launchers.pod_env(pod, {"CUDA_VISIBLE_DEVICES": ""}) == {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture
def prepared_stage(tiny_model_dir, tiny_tokenizer, tmp_path):
    """A one-stage training config on the tiny model and its prepared (tokenized) data folder."""
    from sftkey.data import DataConfig
    from sftkey.prepare import PrepareConfig, prepare, write_prepared
    from sftkey.train.config import config_from_dict

    data = DataConfig("gsm8k", path=str(ARITH))
    folder = write_prepared(prepare(PrepareConfig(data, tagged=True, max_length=256), tiny_tokenizer), tmp_path / "prepared")
    training = config_from_dict({
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "store"), "seeds": [0],
        "data": {"dataset": "gsm8k", "path": str(ARITH), "max_length": 256},
        "train": {"batch_size": 2, "lr": 1.0e-3, "pack_length": 512},
        "arms": {"sft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 2}]}}})
    return training, folder


@pytest.mark.slow  # a training subprocess: 25-50 s on 2 cores
def test_the_images_entry_point_runs_a_stage_here_and_reports_its_checkpoint(prepared_stage, tiny_model_dir, tmp_path):
    """The pod's command (the Dockerfile's ENTRYPOINT + the stage's arguments), run here through Dagster Pipes
    with `python` found on PATH as in the image."""
    training, prepared = prepared_stage
    resource = k8s_compute(device="cpu")
    args = ComputeResource.stage_args(training, "sft_tag", 0, 0, str(tiny_model_dir), str(prepared))
    command = resource.launch_command(launchers.STAGE_MODULE, args, python="python")
    assert command == dockerfile_entrypoint() + args
    env = resource.launch_env({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})

    @dg.asset
    def stage1(context: dg.AssetExecutionContext) -> str:
        result = launchers.run_subprocess(context, command, env)
        checkpoint = launchers.checked_checkpoint(launchers.reported_checkpoint(result, "the entry point"), "the entry point")
        return dg.Output(str(checkpoint))

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([stage1], instance=instance)
    checkpoint = Path(result.output_for_node("stage1"))
    assert checkpoint == tmp_path / "store" / "sft_tag" / "seed0" / "checkpoints" / "stage1-final"
    meta = json.loads((checkpoint / "sftkey.json").read_text())
    assert (meta["step"], meta["final"], meta["world_size"]) == (2, True, 1)
    assert "stage 0 of sft_tag seed 0 on 1 processes" in logged_messages(instance, result)  # pipes.log from the entry point


@pytest.mark.slow  # two launchers and their workers: ~50 s on 2 cores
def test_a_stage_on_two_machines_runs_rank_0_through_pipes_and_logs_the_other_machines_command(
        prepared_stage, tiny_model_dir, tmp_path):
    """ComputeResource.run_stage with num_machines 2 on 127.0.0.1: the Dagster run launches machine 0; the command
    it logs for machine 1 is started here (as a second machine would), and the stage trains on both."""
    import socket
    import subprocess

    training, prepared = prepared_stage
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    resource = ComputeResource(device="cpu", num_processes=1, launcher="accelerate", num_machines=2,
                               main_process_ip="127.0.0.1", main_process_port=port)
    args = ComputeResource.stage_args(training, "sft_tag", 0, 0, str(tiny_model_dir), str(prepared))
    machine1 = launchers.node_commands(resource.launch(), launchers.STAGE_MODULE, args)[1]
    second = subprocess.Popen(machine1, env={**os.environ, **resource.launch_env()}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)

    @dg.asset
    def stage1(context: dg.AssetExecutionContext, compute: ComputeResource):
        return dg.Output(str(compute.run_stage(context, training, "sft_tag", 0, 0, str(tiny_model_dir), str(prepared))))

    instance = dg.DagsterInstance.ephemeral()
    try:
        result = dg.materialize([stage1], instance=instance, resources={"compute": resource})
    finally:
        output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output[-3000:]
    checkpoint = Path(result.output_for_node("stage1"))
    meta = json.loads((checkpoint / "sftkey.json").read_text())
    assert (meta["step"], meta["final"], meta["world_size"]) == (2, True, 2)
    assert f"stage 0 of arm sft_tag seed 0: machine 1 of 2 runs {shlex.join(machine1)}" in logged_messages(instance, result)


def logged_messages(instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult) -> list[str]:
    return [entry.user_message for entry in instance.all_logs(result.run_id) if entry.user_message]


def test_a_checkpoint_from_other_code_is_refused(tmp_path):
    from sftkey.version import code_version

    checkpoint = tmp_path / "stage1-final"
    checkpoint.mkdir()
    (checkpoint / "sftkey.json").write_text(json.dumps({"code_version": "sftkey 0.0.9"}))
    with pytest.raises(launchers.LaunchError, match=r"the pod ran code 'sftkey 0.0.9', not this checkout's .*: "
                                                    r"rebuild the image from this checkout"):
        launchers.checked_checkpoint(checkpoint, "the pod")
    (checkpoint / "sftkey.json").write_text(json.dumps({"code_version": code_version()}))
    assert launchers.checked_checkpoint(checkpoint, "the pod") == checkpoint
