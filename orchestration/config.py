"""The pipeline's YAML: a training config (`training:`, the `sftkey train` format) plus what the pipeline adds:
the benchmark, the checks' thresholds, the promotion rule, and where tracking, DVC and outputs live.

Loading checks everything that needs no data or model and names the file, the line and the key of a bad value.
Each section is parsed once into a typed dataclass (the training config into sftkey's TrainConfig); the assets
read them from one resource, `PipelineSettings`, and the other resources are built from their sections
(`resources`). Relative paths are resolved against the folder the command runs in.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from orchestration.registry import DEFAULT_MIN_ACCURACY
from orchestration.tracking import redact
from sftkey.config_file import ConfigError, ConfigSource, build_dataclass, read_config
from sftkey.data import DataConfig, DataError, can_share_records, held_out_config
from sftkey.data.overlap import describe
from sftkey.evaluate import LENGTH_CAP_WARNING_SHARE
from sftkey.train.config import STAGE_NAME, TrainConfig, config_from_dict

MAX_STAGES = 2  # the graph has stage1_model and stage2_model
UI_RUN_DIR = "ui"  # runs launched from the Dagster UI share <work_dir>/runs/ui/
BENCHMARK_COUNTS = ("limit", "max_new_tokens", "batch_size", "lm_eval_limit")  # each >= 1 when given
BENCHMARK_DTYPES = ("float32", "bfloat16")  # the precisions sftkey trains in (fp32 master weights, bf16 autocast)


@dataclass
class BenchmarkSection:
    """`benchmark:`: which held-out questions each model answers, how, and which lm-eval tasks run besides our scorer."""

    dataset: str = field(default="gsm8k", metadata={"help": "gsm8k, svamp, math500 or jsonl"})
    split: str = field(default="test", metadata={"help": "held out: never the training split"})
    path: str | None = field(default=None, metadata={"help": "explicit data file or folder"})
    limit: int | None = field(default=50, metadata={"help": "questions answered (a seeded subsample)"})
    seed: int = field(default=0, metadata={"help": "of the subsample and of a single-split set's carve (the training "
                                                   "data's carve wins when both are halves of one set)"})
    test_fraction: float = field(default=0.3, metadata={"help": "of a carved single-split set (as seed)"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "None: the data set's own cap"})
    batch_size: int = field(default=16, metadata={"help": "questions generated together"})
    backend: str = field(default="sftkey", metadata={
        "help": "generation backend: sftkey, static, continuous or vllm (see sftkey.generate_backends)"})
    dtype: str = field(default="float32", metadata={
        "help": "dtype the models are scored in and logged (registered, served) in, so that the model served is the "
                "model scored: float32, or bfloat16 where benchmarks/eval_precision.py finds no verdict changes"})
    lm_eval_tasks: list[str] = field(default_factory=list, metadata={"help": "lm-eval tasks of evals/run.py, e.g. gsm8k_tagged"})
    lm_eval_limit: int | None = field(default=None, metadata={"help": "questions per lm-eval task (None: all)"})

    def data(self) -> DataConfig:
        """The records the benchmark answers."""
        return DataConfig(self.dataset, self.split, path=self.path, limit=self.limit, seed=self.seed,
                          test_fraction=self.test_fraction)


@dataclass
class ChecksSection:
    """`checks:`: asset check thresholds (a failed check bars promotion unless it is a warning)."""

    min_annotation_coverage: float = field(default=0.9, metadata={"help": "kept records / loaded records"})
    max_too_long_share: float = field(default=0.05, metadata={
        "help": "annotated records dropped because they exceed training.data.max_length, per response format"})
    min_answer_loss_drop: float = field(default=0.0, metadata={
        "help": "stage 2's answer loss must end at least this fraction below its start (0: any drop)"})
    min_format_accuracy: float = field(default=0.0, metadata={"help": "for every tagged arm x seed"})
    max_length_cap_share: float = field(default=LENGTH_CAP_WARNING_SHARE, metadata={
        "help": "answers cut by the new-token cap (a warning: their accuracy is a floor)"})


@dataclass
class PromotionSection:
    """`promotion:`: the registered model and the rule that moves its `champion` alias."""

    model_name: str = field(default="sftkey", metadata={"help": "registered model name in MLflow"})
    candidate_arm: str | None = field(default=None, metadata={"help": "arm whose model is registered (default: the last arm)"})
    baseline_arm: str | None = field(default=None, metadata={"help": "arm the others are tested against (default: the first)"})
    margin_points: float = field(default=1.0, metadata={"help": "accuracy points the candidate must gain over the champion"})
    alpha: float = field(default=0.05, metadata={"help": "significance level of the paired test"})
    min_accuracy: float = field(default=DEFAULT_MIN_ACCURACY,
                                metadata={"help": "strict accuracy in [0, 1] the first champion needs (no champion yet)"})


@dataclass
class TrackingSection:
    """`tracking:`: the MLflow store (a sqlite file under work_dir unless a server is named)."""

    tracking_uri: str | None = field(default=None, metadata={"help": "http://host:port or sqlite:///path; default: sqlite under work_dir"})
    experiment: str = field(default="sftkey", metadata={"help": "MLflow experiment"})
    fallback_tracking_uri: str | None = field(default=None, metadata={"help": "used when tracking_uri does not answer"})
    ui_url: str = field(default="http://127.0.0.1:5000", metadata={"help": "MLflow UI address, for links"})
    server_backend_store_uri: str | None = field(default=None, metadata={
        "help": "the database of the `mlflow server` that `sftkey ui` starts for an http tracking_uri on this host, "
                "e.g. postgresql://sftkey@127.0.0.1:5432/mlflow (no password: see password_env); None: no server "
                "is started for an http tracking_uri (it runs elsewhere)"})
    server_artifacts_destination: str | None = field(default=None, metadata={
        "help": "where that server keeps artifacts, served through it (mlflow-artifacts:/ URIs); "
                "default work_dir/mlflow/artifacts"})
    password_env: str | None = field(default=None, metadata={
        "help": "environment variable holding the server database's password (never written to a file or a log)"})


@dataclass
class DagsterSection:
    """`dagster:`: the Dagster instance's storage (runs, event log, schedules) and its run queue."""

    storage: str = field(default="sqlite", metadata={"help": "sqlite (files under DAGSTER_HOME) or postgres"})
    postgres_url: str | None = field(default=None, metadata={
        "help": "postgres storage: postgresql://user@host:port/database, without a password (see password_env)"})
    password_env: str | None = field(default=None, metadata={
        "help": "environment variable holding the database password; None: libpq's own (PGPASSWORD, ~/.pgpass)"})
    max_concurrent_runs: int = field(default=1, metadata={
        "help": "runs the queue starts at once (runs launched from the UI wait their turn); -1: no limit"})
    pool_default_limit: int = field(default=1, metadata={
        "help": "steps at once in a concurrency pool that has no limit of its own"})


@dataclass
class DvcSection:
    """`dvc:`: the repo that versions the data sets and its remote."""

    repo: str | None = field(default=None, metadata={"help": "git + DVC repo folder; default work_dir/dvc/repo"})
    remote: str | None = field(default=None, metadata={"help": "folder or DVC remote URL; default work_dir/dvc/remote"})


@dataclass
class K8sSection:
    """`compute.k8s:`: the pod that runs one training stage (launcher: k8s)."""

    image: str | None = field(default=None, metadata={"help": "image built from the repo's Dockerfile (required)"})
    namespace: str | None = field(default=None, metadata={
        "help": "None: the current namespace inside a cluster, else `default`"})
    gpus_per_pod: int = field(default=1, metadata={"help": "nvidia.com/gpu limit of the pod (0: a CPU pod)"})
    cpu: str | None = field(default=None, metadata={"help": "CPU request, e.g. '8'"})
    memory: str | None = field(default=None, metadata={"help": "memory request, e.g. 64Gi"})
    volume_claim: str | None = field(default=None, metadata={
        "help": "PersistentVolumeClaim (ReadWriteMany) holding work_dir, mounted at mount_path (required)"})
    mount_path: str | None = field(default=None, metadata={
        "help": "where the claim is mounted, in the pod and here alike: work_dir must lie under it (required)"})
    service_account: str | None = field(default=None, metadata={"help": "the pod's service account"})
    env: dict[str, str] = field(default_factory=dict, metadata={"help": "extra environment of the pod"})
    image_pull_policy: str = field(default="IfNotPresent", metadata={"help": "Always, IfNotPresent or Never"})


@dataclass
class ComputeSection:
    """`compute:`: where training runs."""

    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu, cuda"})
    num_processes: int = field(default=1, metadata={"help": "> 1: stages run under `accelerate launch` via Dagster Pipes"})
    concurrency: int | None = field(default=None, metadata={
        "help": "arm x seed cells that train and benchmark at once: the limit of the device kind's Dagster pool "
                "(None: one per group of num_processes GPUs on cuda, 1 on cpu); > 1 runs each step in its own process"})
    launcher: str = field(default="accelerate", metadata={
        "help": "how a launched stage starts: accelerate (`accelerate launch`), torchrun, or k8s (a pod per stage "
                "through dagster-k8s's Pipes client; see compute.k8s)"})
    num_machines: int = field(default=1, metadata={
        "help": "machines that train one stage together; the Dagster run launches rank machine_rank here and logs "
                "the command each other machine runs (same config, its own machine_rank)"})
    machine_rank: int = field(default=0, metadata={
        "help": "this machine's rank in [0, num_machines); a pipeline runs on machine 0 (its rank-0 process "
                "reports the checkpoint through Pipes) and logs the command each other machine runs"})
    main_process_ip: str | None = field(default=None, metadata={
        "help": "address of machine 0 that every machine reaches (required when num_machines > 1; default 127.0.0.1)"})
    main_process_port: int | None = field(default=None, metadata={
        "help": "rendezvous port on machine 0 (None: a free port on one machine, 29500 across machines)"})
    rdzv_backend: str = field(default="static", metadata={
        "help": "static (fixed ranks, master address/port) or c10d (torch's elastic rendezvous at the same address)"})
    k8s: K8sSection = field(default_factory=K8sSection, metadata={"help": "launcher: k8s settings"})


@dataclass
class PipelineSections:
    """Everything in the file except `training:` (which `sftkey.train.config` reads)."""

    name: str = field(default="pipeline", metadata={"help": "names the MLflow parent runs"})
    work_dir: str = field(default=".sftkey-work", metadata={"help": "store, Dagster home, MLflow store, DVC repo"})
    benchmark: BenchmarkSection = field(default_factory=BenchmarkSection)
    checks: ChecksSection = field(default_factory=ChecksSection)
    promotion: PromotionSection = field(default_factory=PromotionSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    dvc: DvcSection = field(default_factory=DvcSection)
    dagster: DagsterSection = field(default_factory=DagsterSection)
    compute: ComputeSection = field(default_factory=ComputeSection)


@dataclass
class PipelineConfig:
    sections: PipelineSections
    training: TrainConfig
    raw: dict  # the whole mapping as loaded (overrides applied): what PipelineSettings carries
    path: Path | None = None

    @property
    def work_dir(self) -> Path:
        return Path(self.sections.work_dir).resolve()

    @property
    def benchmark(self) -> BenchmarkSection:
        return self.sections.benchmark

    @property
    def checks(self) -> ChecksSection:
        return self.sections.checks

    @property
    def promotion(self) -> PromotionSection:
        return self.sections.promotion

    @property
    def arms(self) -> list[str]:
        return list(self.training.arms)

    @property
    def seeds(self) -> list[int]:
        return list(self.training.seeds)

    @property
    def candidate_arm(self) -> str:
        return self.sections.promotion.candidate_arm or self.arms[-1]

    @property
    def candidate_seed(self) -> int:
        return self.seeds[0]

    @property
    def baseline_arm(self) -> str:
        return self.sections.promotion.baseline_arm or self.arms[0]

    def training_data(self) -> DataConfig:
        """The records part of `training.data` (its DataConfig fields)."""
        data = self.training.data
        return DataConfig(**{f.name: getattr(data, f.name) for f in dataclasses.fields(DataConfig)})


def load_pipeline_config(path: str | Path, overrides: dict[str, Any] | None = None,
                         sets: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read and check a pipeline YAML; `sets` are `--set KEY=VALUE` overrides (compute.concurrency=2,
    training.data.limit=16); `overrides` replace top-level sections (tests, `--work-dir`)."""
    path = Path(path)
    raw, source = read_config(path, list(sets), "pipeline config (see configs/pipeline_demo.yaml for the format)")
    raw.update(overrides or {})
    source = ConfigSource(path, source.root, source.overridden | set(overrides or {}))
    return pipeline_config_from_dict(raw, source, path)


def pipeline_config_from_dict(raw: dict, source: ConfigSource | None = None, path: Path | None = None) -> PipelineConfig:
    source = source or ConfigSource(None, None, set())
    sections_raw = dict(raw)
    if "training" not in sections_raw:
        raise ConfigError(f"{source.where(())}: no `training:` section (an `sftkey train` config: model, data, train, arms, seeds)")
    training_raw = sections_raw.pop("training") or {}
    sections = build_dataclass(PipelineSections, sections_raw, (), source)
    training_node = _child(source.root, "training")
    training = config_from_dict(training_raw, ConfigSource(source.path, training_node, source.overridden))
    config = PipelineConfig(sections, training, json.loads(json.dumps(raw)), path)
    _validate(config, source)
    return config


def _child(node, key: str):
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.value == key:
                return v
    return None


def _validate(config: PipelineConfig, source: ConfigSource) -> None:
    def fail(keys: tuple, message: str) -> ConfigError:
        return ConfigError(f"{source.where(keys)}: {'.'.join(keys)}: {message}")

    name = config.sections.name
    if not STAGE_NAME.match(name):
        raise fail(("name",), f"{name!r} names the run folders under work_dir/runs/: use letters, digits, '_', '.', "
                   "'-' (no '/', '..' or absolute path), e.g. name: demo")
    if not config.sections.work_dir.strip():
        raise fail(("work_dir",), "empty; give a folder, e.g. work_dir: .sftkey-work")
    for arm, arm_config in config.training.arms.items():
        if len(arm_config.stages) > MAX_STAGES:
            raise fail(("training", "arms", arm), f"{len(arm_config.stages)} stages; the pipeline runs at most "
                       f"{MAX_STAGES} (stage1_model, stage2_model)")
    promotion = config.sections.promotion
    for key, arm in (("candidate_arm", promotion.candidate_arm), ("baseline_arm", promotion.baseline_arm)):
        if arm is not None and arm not in config.training.arms:
            raise fail(("promotion", key), f"{arm!r} is not an arm of training.arms ({', '.join(config.arms)})")
    _validate_promotion(promotion, fail)
    _validate_checks(config.sections.checks, fail)
    _validate_dagster(config.sections.dagster, fail)
    _validate_tracking(config.sections.tracking, fail)
    _validate_compute(config.sections.compute, config.work_dir, fail)
    config.sections.benchmark = _held_out_benchmark(config, fail)
    bench = config.sections.benchmark.data()
    if can_share_records(config.training.data, bench):
        raise fail(("benchmark", "split"), f"the benchmark ({describe(bench)}) can share questions with the "
                   f"training data ({describe(config.training.data)}); answer held-out questions (e.g. split: test)")


def _validate_promotion(promotion: PromotionSection, fail) -> None:
    """Gate settings that would let any candidate through (NaN or infinite values compare False)."""
    if not (math.isfinite(promotion.margin_points) and promotion.margin_points >= 0):
        raise fail(("promotion", "margin_points"), f"must be a finite number >= 0 (accuracy points the candidate "
                   f"must gain over the champion), got {promotion.margin_points}")
    if not 0 < promotion.alpha < 1:
        raise fail(("promotion", "alpha"), f"must be in (0, 1), got {promotion.alpha}")
    if not 0 <= promotion.min_accuracy <= 1:
        raise fail(("promotion", "min_accuracy"), f"must be in [0, 1] (strict accuracy the first champion needs), "
                   f"got {promotion.min_accuracy}")


def _validate_checks(checks: ChecksSection, fail) -> None:
    """Every threshold is a share in [0, 1] (NaN would make a check pass or fail whatever it measures)."""
    for f in dataclasses.fields(ChecksSection):
        value = getattr(checks, f.name)
        if not 0 <= value <= 1:
            raise fail(("checks", f.name), f"must be a share in [0, 1] ({f.metadata['help']}), got {value}")


DATABASE_SCHEMES = ("postgresql", "postgres", "mysql", "mssql", "sqlite")  # MLflow's SQLAlchemy stores
LOCAL_HOSTS = ("127.0.0.1", "localhost")  # where `sftkey ui` serves
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _validate_dagster(dagster: DagsterSection, fail) -> None:
    if dagster.storage not in ("sqlite", "postgres"):
        raise fail(("dagster", "storage"), f"{dagster.storage!r}: use sqlite or postgres")
    if dagster.storage == "postgres":
        if not dagster.postgres_url:
            raise fail(("dagster", "postgres_url"), "storage: postgres needs the database, e.g. "
                       "postgres_url: postgresql://sftkey@127.0.0.1:5432/dagster")
        _check_database_url(dagster.postgres_url, ("dagster", "postgres_url"), fail, schemes=("postgresql", "postgres"))
    _check_env_name(dagster.password_env, ("dagster", "password_env"), fail)
    if dagster.max_concurrent_runs < -1:
        raise fail(("dagster", "max_concurrent_runs"), f"must be >= 0, or -1 for no limit, got {dagster.max_concurrent_runs}")
    if dagster.pool_default_limit < 0:
        raise fail(("dagster", "pool_default_limit"), f"must be >= 0, got {dagster.pool_default_limit}")


def _validate_tracking(tracking: TrackingSection, fail) -> None:
    uri = tracking.tracking_uri or ""
    if urllib.parse.urlsplit(uri).scheme.split("+")[0] in DATABASE_SCHEMES[:-1]:
        raise fail(("tracking", "tracking_uri"), f"{redact(uri)}: a database without a server keeps no artifact "
                   "store of its own; serve it: tracking_uri: http://127.0.0.1:5000 and "
                   "server_backend_store_uri: <this database> (`sftkey ui` starts the server)")
    if tracking.server_backend_store_uri:
        _check_database_url(tracking.server_backend_store_uri, ("tracking", "server_backend_store_uri"), fail,
                            schemes=DATABASE_SCHEMES)
        if urllib.parse.urlsplit(uri).scheme != "http" or urllib.parse.urlsplit(uri).hostname not in LOCAL_HOSTS:
            raise fail(("tracking", "server_backend_store_uri"), "`sftkey ui` serves this database on 127.0.0.1 "
                       "at the port of tracking.tracking_uri: set tracking_uri: http://127.0.0.1:5000 (or another "
                       "port), or drop this key when the server runs elsewhere")
    _check_env_name(tracking.password_env, ("tracking", "password_env"), fail)


def _check_database_url(url: str, keys: tuple, fail, schemes: tuple) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.split("+")[0] not in schemes:
        raise fail(keys, f"{redact(url)}: not a {' or '.join(s + '://' for s in schemes)} URL")
    if parts.password is not None:
        raise fail(keys, f"{redact(url)} holds a password, which would end up in files and process lists: "
                   f"remove it and name the environment variable that holds it in {keys[0]}.password_env")


def _check_env_name(name: str | None, keys: tuple, fail) -> None:
    if name is not None and not ENV_NAME.fullmatch(name):
        raise fail(keys, f"{name!r} is not an environment variable name (the variable's name, not the password)")


LAUNCHERS = ("accelerate", "torchrun", "k8s")
RDZV_BACKENDS = ("static", "c10d")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


def _validate_compute(compute: ComputeSection, work_dir: Path, fail) -> None:
    if compute.num_processes < 1:
        raise fail(("compute", "num_processes"), f"must be >= 1, got {compute.num_processes}")
    if compute.launcher not in LAUNCHERS:
        raise fail(("compute", "launcher"), f"{compute.launcher!r}: use {', '.join(LAUNCHERS)}")
    if compute.rdzv_backend not in RDZV_BACKENDS:
        raise fail(("compute", "rdzv_backend"), f"{compute.rdzv_backend!r}: use {' or '.join(RDZV_BACKENDS)}")
    if compute.num_machines < 1:
        raise fail(("compute", "num_machines"), f"must be >= 1, got {compute.num_machines}")
    if not 0 <= compute.machine_rank < compute.num_machines:
        raise fail(("compute", "machine_rank"), f"{compute.machine_rank} is not in [0, num_machines = "
                   f"{compute.num_machines}); give each machine its own rank, 0 on the main one")
    if compute.machine_rank != 0:
        raise fail(("compute", "machine_rank"), f"{compute.machine_rank}: the pipeline runs on machine 0, whose rank-0 "
                   "process reports each stage's checkpoint through Dagster Pipes; run it there (machine_rank: 0) "
                   "and, on the other machines, the command it logs for their rank")
    if compute.num_machines > 1 and not compute.main_process_ip:
        raise fail(("compute", "main_process_ip"), f"num_machines: {compute.num_machines} needs the address of machine "
                   "0 that every machine reaches, e.g. main_process_ip: 10.0.0.1")
    if compute.main_process_port is not None and not 0 < compute.main_process_port < 65536:
        raise fail(("compute", "main_process_port"), f"must be a TCP port in [1, 65535], got {compute.main_process_port}")
    if compute.launcher == "k8s":
        _validate_k8s(compute, work_dir, fail)


def _validate_k8s(compute: ComputeSection, work_dir: Path, fail) -> None:
    k8s = compute.k8s
    if compute.num_machines > 1:
        raise fail(("compute", "num_machines"), "launcher: k8s runs a stage in one pod (up to gpus_per_pod "
                   "processes); for several machines use launcher: accelerate or torchrun on each machine")
    for key, example in (("image", "registry.example.com/sftkey:0.1.0 (docker build -t ... .)"),
                         ("volume_claim", "sftkey-work (a ReadWriteMany claim holding work_dir)"),
                         ("mount_path", f"{work_dir.parent} (a folder above work_dir)")):
        if not getattr(k8s, key):
            raise fail(("compute", "k8s", key), f"launcher: k8s needs it, e.g. {key}: {example}")
    mount = Path(k8s.mount_path)
    if not mount.is_absolute() or not work_dir.is_relative_to(mount):
        raise fail(("compute", "k8s", "mount_path"), f"{k8s.mount_path!r}: work_dir ({work_dir}) must lie under it, "
                   "at the same absolute path in the pod and here, so the pod reads and writes the same store")
    if k8s.gpus_per_pod < 0:
        raise fail(("compute", "k8s", "gpus_per_pod"), f"must be >= 0, got {k8s.gpus_per_pod}")
    if k8s.gpus_per_pod and compute.num_processes > k8s.gpus_per_pod:
        raise fail(("compute", "num_processes"), f"{compute.num_processes} processes on a pod of {k8s.gpus_per_pod} "
                   "GPUs: raise compute.k8s.gpus_per_pod or lower num_processes (one process per GPU)")
    if k8s.image_pull_policy not in PULL_POLICIES:
        raise fail(("compute", "k8s", "image_pull_policy"), f"{k8s.image_pull_policy!r}: use {', '.join(PULL_POLICIES)}")


def _held_out_benchmark(config: PipelineConfig, fail) -> BenchmarkSection:
    """The `benchmark:` section with its counts checked and, when it is carved from the same single-split data set
    as the training data, the training data's carve (seed, test fraction): the held-out half, never questions the
    models trained on."""
    bench = config.sections.benchmark
    for key in BENCHMARK_COUNTS:
        value = getattr(bench, key)
        if value is not None and value < 1:
            raise fail(("benchmark", key), f"must be a positive count, got {value} (or leave it out for the default)")
    from sftkey.generate_backends import BACKENDS

    if bench.backend not in BACKENDS:
        raise fail(("benchmark", "backend"), f"{bench.backend!r}: use one of {', '.join(BACKENDS)}")
    if bench.dtype not in BENCHMARK_DTYPES:
        raise fail(("benchmark", "dtype"), f"{bench.dtype!r}: use {' or '.join(BENCHMARK_DTYPES)}")
    try:
        held_out = held_out_config(config.training_data(), bench.data())
    except DataError as e:  # unknown data set, test_fraction outside (0, 1)
        raise fail(("benchmark",), str(e)) from None
    return dataclasses.replace(bench, seed=held_out.seed, test_fraction=held_out.test_fraction)


# ---------------------------------------------------------------------------------- to Dagster


class PipelineSettings(dg.ConfigurableResource):
    """The pipeline config that every asset and check reads (`settings.config.training`, `.benchmark`, `.checks`,
    `.promotion`): the loaded YAML mapping, parsed and checked once per process."""

    raw_json: str  # the pipeline YAML as JSON (a string: Dagster's config schema refuses the YAML's nulls in a map)
    path: str = ""  # the file it came from, for messages

    @classmethod
    def of(cls, raw: dict[str, Any], path: str = "") -> "PipelineSettings":
        return cls(raw_json=json.dumps(raw, sort_keys=True), path=path)

    @property
    def raw(self) -> dict[str, Any]:
        return json.loads(self.raw_json)

    @property
    def config(self) -> PipelineConfig:
        return _parsed(self.raw_json, self.path)


@functools.lru_cache(maxsize=8)
def _parsed(raw_json: str, path: str) -> PipelineConfig:
    return pipeline_config_from_dict(json.loads(raw_json), path=Path(path) if path else None)


def default_tracking_uri(config: PipelineConfig) -> str:
    return config.sections.tracking.tracking_uri or f"sqlite:///{config.work_dir / 'mlflow' / 'mlflow.db'}"


def resources(config: PipelineConfig, pipeline_run: str | None = None, parent_run_id: str | None = None,
              tracking_uri: str | None = None) -> dict:
    """The resources of a pipeline run; outputs passed between assets live in the run's own folder.
    `tracking_uri`: the store the pre-flight check settled on (the configured one or its fallback)."""
    from orchestration.dvc_data import DvcResource
    from orchestration.resources import ComputeResource, ModelStore
    from orchestration.tracking import MlflowResource

    work, sections = config.work_dir, config.sections
    run_dir = work / "runs" / (pipeline_run or UI_RUN_DIR)
    return {
        "settings": PipelineSettings.of(config.raw, str(config.path or "")),
        "io_manager": dg.FilesystemIOManager(base_dir=str(run_dir / "io")),
        "store": ModelStore(root=str(work / "store"), run_dir=str(run_dir)),
        "tracking": MlflowResource(tracking_uri=tracking_uri or default_tracking_uri(config), experiment=sections.tracking.experiment,
                                   fallback_tracking_uri=sections.tracking.fallback_tracking_uri,
                                   ui_url=sections.tracking.ui_url, parent_run_id=parent_run_id),
        "dvc": DvcResource(repo=str(Path(sections.dvc.repo or work / "dvc" / "repo").resolve()),
                           remote=sections.dvc.remote or str(work / "dvc" / "remote")),
        "compute": ComputeResource.from_section(sections.compute),
    }
