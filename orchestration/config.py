"""The pipeline's YAML: a training config (`training:`, the `sftkey train` format) plus what the pipeline adds:
the benchmark, the checks' thresholds, the promotion rule, and where tracking, DVC and outputs live.

Loading checks everything that needs no data or model and names the file, the line and the key of a bad value.
The loaded config becomes Dagster run config (`run_config`) and resources (`resources`); relative paths are
resolved against the folder the command runs in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from orchestration.registry import DEFAULT_MIN_ACCURACY
from sftkey.data import DataConfig, DataError, can_share_records, held_out_config
from sftkey.data.overlap import describe
from sftkey.train.config import (STAGE_NAME, ConfigError, ConfigSource, TrainConfig, build_dataclass, config_from_dict,
                                 read_yaml)

MAX_STAGES = 2  # the graph has stage1_model and stage2_model
UI_RUN_DIR = "ui"  # runs launched from the Dagster UI share <work_dir>/runs/ui/
BENCHMARK_COUNTS = ("limit", "max_new_tokens", "batch_size", "lm_eval_limit")  # each >= 1 when given


# ---------------------------------------------------------------------------------- asset configs (Dagster)


class TrainingAssetConfig(dg.Config):
    """The `sftkey train` config (model, data, train, arms, seeds) that the data and stage assets read."""

    training: dict[str, Any] = {}


class BenchmarkAssetConfig(dg.Config):
    """Which questions each model answers, how, and which lm-eval tasks run besides our scorer
    (the pipeline YAML's `benchmark:` section)."""

    dataset: str = "gsm8k"  # gsm8k, svamp, math500 or jsonl
    split: str = "test"  # held out: never the training split
    path: str | None = None  # explicit data file or folder
    limit: int | None = 50  # questions answered (a seeded subsample)
    seed: int = 0  # of the subsample, and of the carve of a single-split set (the training data's, when it is one)
    test_fraction: float = 0.3  # of a carved single-split set (the training data's, when it is one)
    max_new_tokens: int | None = None  # None: the data set's cap (sftkey.evaluate.DEFAULT_MAX_NEW_TOKENS)
    batch_size: int = 16
    lm_eval_tasks: list[str] = []  # lm-eval tasks of evals/run.py, e.g. gsm8k_tagged
    lm_eval_limit: int | None = None  # questions per lm-eval task (None: all)


class ComparisonAssetConfig(dg.Config):
    """Which arms x seeds are compared, and against which arm the tests run."""

    arms: list[str] = []
    seeds: list[int] = [0]
    baseline_arm: str = ""


class RegistryAssetConfig(dg.Config):
    """The registered model's name and which arm's model is the candidate."""

    model_name: str = "sftkey"
    candidate_arm: str = ""
    candidate_seed: int = 0


class CoverageCheckConfig(dg.Config):
    min_coverage: float = 0.9  # kept records over loaded records


class FormatCheckConfig(dg.Config):
    min_format_accuracy: float = 0.0


class GateCheckConfig(dg.Config):
    margin_points: float = 1.0  # accuracy points the candidate must gain over the champion
    alpha: float = 0.05
    min_accuracy: float = DEFAULT_MIN_ACCURACY  # strict accuracy a first champion needs


# ---------------------------------------------------------------------------------- the YAML file


@dataclass
class ChecksSection:
    """`checks:`: asset check thresholds."""

    min_annotation_coverage: float = field(default=0.9, metadata={"help": "kept records / loaded records"})
    min_format_accuracy: float = field(default=0.0, metadata={"help": "for every arm x seed"})


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


@dataclass
class DvcSection:
    """`dvc:`: the repo that versions the data sets and its remote."""

    repo: str | None = field(default=None, metadata={"help": "git + DVC repo folder; default work_dir/dvc/repo"})
    remote: str | None = field(default=None, metadata={"help": "folder or DVC remote URL; default work_dir/dvc/remote"})


@dataclass
class ComputeSection:
    """`compute:`: where training runs."""

    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu, cuda"})
    num_processes: int = field(default=1, metadata={"help": "> 1: stages run under `accelerate launch` via Dagster Pipes"})


@dataclass
class PipelineSections:
    """Everything in the file except `training:` (which `sftkey.train.config` reads)."""

    name: str = field(default="pipeline", metadata={"help": "names the MLflow parent runs"})
    work_dir: str = field(default=".sftkey-work", metadata={"help": "store, Dagster home, MLflow store, DVC repo"})
    benchmark: dict[str, Any] = field(default_factory=dict, metadata={"help": "BenchmarkAssetConfig fields"})
    checks: ChecksSection = field(default_factory=ChecksSection)
    promotion: PromotionSection = field(default_factory=PromotionSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    dvc: DvcSection = field(default_factory=DvcSection)
    compute: ComputeSection = field(default_factory=ComputeSection)


@dataclass
class PipelineConfig:
    sections: PipelineSections
    training: TrainConfig
    training_raw: dict  # the `training:` mapping as written (Dagster run config carries it)
    path: Path | None = None

    @property
    def work_dir(self) -> Path:
        return Path(self.sections.work_dir).resolve()

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
    def baseline_arm(self) -> str:
        return self.sections.promotion.baseline_arm or self.arms[0]


def load_pipeline_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read and check a pipeline YAML; `overrides` replace top-level sections (tests, `--work-dir`)."""
    path = Path(path)
    raw, root = read_yaml(path, "pipeline config (see configs/pipeline_demo.yaml for the format)")
    raw.update(overrides or {})
    return pipeline_config_from_dict(raw, ConfigSource(path, root, set(overrides or {})), path)


def pipeline_config_from_dict(raw: dict, source: ConfigSource | None = None, path: Path | None = None) -> PipelineConfig:
    source = source or ConfigSource(None, None, set())
    raw = dict(raw)
    if "training" not in raw:
        raise ConfigError(f"{source.where(())}: no `training:` section (an `sftkey train` config: model, data, train, arms, seeds)")
    training_raw = raw.pop("training") or {}
    sections = build_dataclass(PipelineSections, raw, (), source)
    training_node = _child(source.root, "training")
    training = config_from_dict(training_raw, ConfigSource(source.path, training_node, source.overridden))
    config = PipelineConfig(sections, training, training_raw, path)
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
    if config.sections.compute.num_processes < 1:
        raise fail(("compute", "num_processes"), f"must be >= 1, got {config.sections.compute.num_processes}")
    bench = benchmark_config(config, fail)
    if can_share_records(config.training.data, benchmark_data(bench)):
        data = config.training.data
        raise fail(("benchmark", "split"), f"the benchmark ({describe(benchmark_data(bench))}) can share questions "
                   f"with the training data ({describe(data)}); answer held-out questions (e.g. split: test)")


def _validate_promotion(promotion: PromotionSection, fail) -> None:
    """Gate settings that would let any candidate through (NaN or infinite values compare False)."""
    import math

    if not (math.isfinite(promotion.margin_points) and promotion.margin_points >= 0):
        raise fail(("promotion", "margin_points"), f"must be a finite number >= 0 (accuracy points the candidate "
                   f"must gain over the champion), got {promotion.margin_points}")
    if not 0 < promotion.alpha < 1:
        raise fail(("promotion", "alpha"), f"must be in (0, 1), got {promotion.alpha}")
    if not 0 <= promotion.min_accuracy <= 1:
        raise fail(("promotion", "min_accuracy"), f"must be in [0, 1] (strict accuracy the first champion needs), "
                   f"got {promotion.min_accuracy}")


def benchmark_config(config: PipelineConfig, fail=None) -> BenchmarkAssetConfig:
    """The `benchmark:` section as the asset's config; unknown keys and bad values name the key.

    A benchmark carved from the same single-split data set as the training data takes the training data's carve
    (seed, test fraction), whatever the section says: the held-out half, never questions the models trained on.
    """
    import dataclasses

    import pydantic

    fail = fail or (lambda keys, message: ConfigError(f"{'.'.join(keys)}: {message}"))
    raw = config.sections.benchmark
    known = list(BenchmarkAssetConfig.model_fields)
    for key in raw:
        if key not in known:
            raise fail(("benchmark", key), f"unknown key; known keys: {', '.join(known)}")
    try:
        bench = BenchmarkAssetConfig(**raw)
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        raise fail(("benchmark", *map(str, error["loc"])), error["msg"]) from None
    for key in BENCHMARK_COUNTS:
        value = getattr(bench, key)
        if value is not None and value < 1:
            raise fail(("benchmark", key), f"must be a positive count, got {value} (or leave it out for the default)")
    try:
        benchmark_data(bench)
    except DataError as e:  # unknown data set, test_fraction outside (0, 1)
        raise fail(("benchmark",), str(e)) from None
    training = DataConfig(**{f.name: getattr(config.training.data, f.name) for f in dataclasses.fields(DataConfig)})
    held_out = held_out_config(training, benchmark_data(bench))
    return bench.model_copy(update={"seed": held_out.seed, "test_fraction": held_out.test_fraction})


def benchmark_data(bench: BenchmarkAssetConfig) -> DataConfig:
    """The records a benchmark answers."""
    return DataConfig(bench.dataset, bench.split, path=bench.path, limit=bench.limit, seed=bench.seed,
                      test_fraction=bench.test_fraction)


# ---------------------------------------------------------------------------------- to Dagster


def default_tracking_uri(config: PipelineConfig) -> str:
    return config.sections.tracking.tracking_uri or f"sqlite:///{config.work_dir / 'mlflow' / 'mlflow.db'}"


def run_config(config: PipelineConfig) -> dict:
    """The Dagster run config of every asset and check (a run uses the entries of the steps it runs)."""
    training = {"config": {"training": config.training_raw}}
    checks, promotion = config.sections.checks, config.sections.promotion
    ops = {
        "raw_dataset": training,
        "annotated_dataset": training,
        "tokenized_dataset": training,
        "stage1_model": training,
        "stage2_model": training,
        "benchmark_scores": {"config": benchmark_config(config).model_dump()},
        "arm_comparison": {"config": {"arms": config.arms, "seeds": config.seeds, "baseline_arm": config.baseline_arm}},
        "registered_model": {"config": {"model_name": promotion.model_name, "candidate_arm": config.candidate_arm,
                                        "candidate_seed": config.seeds[0]}},
        "annotated_dataset_check_annotated_dataset_coverage": {"config": {"min_coverage": checks.min_annotation_coverage}},
        "benchmark_scores_check_benchmark_scores_format_accuracy": {"config": {"min_format_accuracy": checks.min_format_accuracy}},
        "registered_model_check_registered_model_promotion_gate": {"config": {"margin_points": promotion.margin_points,
                                                                              "alpha": promotion.alpha,
                                                                              "min_accuracy": promotion.min_accuracy}},
    }
    return {"ops": ops}


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
        "io_manager": dg.FilesystemIOManager(base_dir=str(run_dir / "io")),
        "store": ModelStore(root=str(work / "store"), run_dir=str(run_dir)),
        "tracking": MlflowResource(tracking_uri=tracking_uri or default_tracking_uri(config), experiment=sections.tracking.experiment,
                                   fallback_tracking_uri=sections.tracking.fallback_tracking_uri,
                                   ui_url=sections.tracking.ui_url, parent_run_id=parent_run_id),
        "dvc": DvcResource(repo=str(Path(sections.dvc.repo or work / "dvc" / "repo").resolve()),
                           remote=sections.dvc.remote or str(work / "dvc" / "remote")),
        "compute": ComputeResource(device=sections.compute.device, num_processes=sections.compute.num_processes),
    }
