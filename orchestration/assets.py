"""The asset graph: raw_dataset -> annotated_dataset -> tokenized_dataset -> (per arm x seed) stage1_model ->
stage2_model -> benchmark_scores -> arm_comparison -> registered_model -> champion_model.

Assets are thin: the work is the library's (sftkey.data, annotate, prepare, train, evaluate, compare). Each
materialization is one MLflow run under the pipeline's parent run; what a person reads in the Dagster UI is
in the materialization metadata. Values passed between assets are small dicts of paths and versions.
"""


import dataclasses
import json
import re
import warnings
from pathlib import Path

import dagster as dg

from orchestration.config import BenchmarkSection, PipelineSettings
from orchestration.devices import step_devices
from orchestration.dvc_data import DvcResource
from orchestration.resources import ComputeResource, ModelStore, content_key
from orchestration.tracking import MlflowResource
from sftkey.atomic import write_text

# Outputs carry data versions (content keys) so the UI can tell a stale asset; the parameter is beta in 1.13.
warnings.filterwarnings("ignore", message="Parameter `data_version` of initializer `Output.__init__`",
                        category=dg.BetaWarning)

GROUP = "sftkey"  # one group: the UI draws the whole graph expanded (it folds each of several groups)
CELL_ASSETS = ("stage1_model", "stage2_model", "benchmark_scores")  # one of each per arm x seed cell


def _jsonl(path: Path, rows) -> Path:
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _read_jsonl(path: Path, cls) -> list:
    return [cls(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- data


@dg.asset(group_name=GROUP, code_version="1")
def raw_dataset(context: dg.AssetExecutionContext, settings: PipelineSettings, store: ModelStore,
                dvc: DvcResource, tracking: MlflowResource) -> dg.Output[dict]:
    """The training records, DVC-tracked (one revision per content version) with their content version."""
    from sftkey.data import content_version, load_records

    data = settings.config.training_data()
    with tracking.asset_run(context) as run:
        records, source = load_records(data)
        version = content_version(records)
        with store.claim("raw", version) as folder:
            file = folder / "records.jsonl"
            if not file.exists():
                _jsonl(file, (dataclasses.asdict(r) for r in records))
        name = f"{data.dataset}-{data.split}"
        tracked = dvc.track(file, f"raw/{name}.jsonl", f"raw {name} {version[:12]} ({len(records)} records)")
        value = {"dataset": data.dataset, "split": data.split, "source": source, "records": len(records),
                 "data_version": version, "dvc_path": tracked.path, "dvc_rev": tracked.rev, "dvc_md5": tracked.md5,
                 "dvc_repo": str(dvc.root())}
        run.log_params({"data": dataclasses.asdict(data)})
        run.log_input(name, version, f"{tracked.path}@{tracked.rev}", "training")
        run.set_tags({"sftkey.data_version": version, "sftkey.dvc_rev": tracked.rev})
        run.log_metrics({"records": len(records)})
    return dg.Output(value, data_version=dg.DataVersion(version), metadata={
        "records": len(records), "source": source, "data_version": version,
        "dvc": f"{tracked.path} @ {tracked.rev[:12]} (md5 {tracked.md5})",
        "mlflow_run": dg.MetadataValue.url(tracking.run_url(run.run_id)),
    })


@dg.asset(group_name=GROUP, code_version="1")
def annotated_dataset(context: dg.AssetExecutionContext, settings: PipelineSettings, raw_dataset: dict,
                      store: ModelStore, dvc: DvcResource, tracking: MlflowResource) -> dg.Output[dict]:
    """Records split into reasoning and answer, read from the DVC revision raw_dataset made; the exclusion report.
    tokenized_dataset reads the records from the folder this writes."""
    from sftkey.annotate import annotate, exclusion_counts
    from sftkey.data import Record

    annotation = settings.config.training.data.annotation
    with tracking.asset_run(context) as run:
        text = dvc.read_text(raw_dataset["dvc_path"], raw_dataset["dvc_rev"])
        records = [Record(**json.loads(line)) for line in text.splitlines() if line.strip()]
        kept, excluded = annotate(raw_dataset["dataset"], records, annotation)
        key = content_key(raw_dataset["data_version"], dataclasses.asdict(annotation))
        with store.claim("annotated", key) as folder:
            _jsonl(folder / "records.jsonl", (dataclasses.asdict(a) for a in kept))
            _jsonl(folder / "exclusions.jsonl", (dataclasses.asdict(e) for e in excluded))
        coverage = len(kept) / len(records) if records else 0.0
        reasons = exclusion_counts(excluded)
        run.log_params({"annotation": dataclasses.asdict(annotation)})
        run.set_tags({"sftkey.data_version": raw_dataset["data_version"], "sftkey.dvc_rev": raw_dataset["dvc_rev"]})
        run.log_metrics({"kept": len(kept), "excluded": len(excluded), "coverage": coverage})
        run.log_artifact(folder / "exclusions.jsonl")
    value = {"folder": str(folder), "key": key, "records": len(records), "kept": len(kept),
             "excluded": len(excluded), "coverage": coverage, "exclusions_by_reason": reasons,
             **{k: raw_dataset[k] for k in ("dataset", "split", "source", "data_version", "dvc_rev")}}
    return dg.Output(value, data_version=dg.DataVersion(key), metadata={
        "records": len(records), "kept": len(kept), "excluded": len(excluded), "coverage": coverage,
        "exclusions": dg.MetadataValue.md(_md_table(["reason", "records"], [[r, n] for r, n in reasons.items()])
                                          if reasons else "no exclusions"),
        "mlflow_run": dg.MetadataValue.url(tracking.run_url(run.run_id)),
    })


@dg.asset(group_name=GROUP, code_version="1")
def tokenized_dataset(context: dg.AssetExecutionContext, settings: PipelineSettings, annotated_dataset: dict,
                      store: ModelStore, dvc: DvcResource, tracking: MlflowResource) -> dg.Output[dict]:
    """annotated_dataset's records tokenized and role-tagged in each response format the arms use, DVC-tracked."""
    from sftkey.annotate import Annotated, Exclusion
    from sftkey.models import identity_params, load_tokenizer, resolve_base_model
    from sftkey.prepare import tokenize_records, write_prepared

    training = settings.config.training
    annotated = Path(annotated_dataset["folder"])
    records = _read_jsonl(annotated / "records.jsonl", Annotated)
    exclusions = _read_jsonl(annotated / "exclusions.jsonl", Exclusion)
    formats = sorted({arm.format for arm in training.arms.values()})
    base = resolve_base_model(training.model, training.model_fallback)
    tokenizer = load_tokenizer(base.folder)
    prepared_by_format, rows = {}, []
    with tracking.asset_run(context) as run:
        for fmt in formats:
            prepare_config = training.data.prepare_config(fmt == "tagged")
            key = content_key(annotated_dataset["key"], dataclasses.asdict(prepare_config), str(base.folder))
            with store.claim("prepared", key) as folder:
                if not (folder / "meta.json").exists():
                    write_prepared(tokenize_records(records, exclusions, prepare_config, tokenizer,
                                                    annotated_dataset["data_version"], annotated_dataset["source"]),
                                   folder)
                meta = json.loads((folder / "meta.json").read_text())
            name = f"{annotated_dataset['dataset']}-{annotated_dataset['split']}-{fmt}"
            tracked = dvc.track(folder, f"prepared/{name}", f"prepared {name} {key}")
            kept = meta["counts"]["kept"]
            prepared_by_format[fmt] = {"folder": str(folder), "key": key, "dvc_path": tracked.path,
                                       "dvc_rev": tracked.rev, "kept": kept, "annotated": len(records),
                                       "too_long": len(records) - kept, "tokens_by_role": meta["tokens_by_role"],
                                       "answer_token_share": meta["answer_token_share"]}
            rows.append([fmt, kept, meta["counts"]["excluded"], f"{meta['answer_token_share']:.2%}", tracked.rev[:12]])
            run.log_metrics({f"{fmt}.kept": kept, f"{fmt}.answer_token_share": meta["answer_token_share"]})
        run.log_params({"model": training.model, "max_length": training.data.max_length, "formats": formats}
                       | identity_params(base.identity))
        run.set_tags({"sftkey.data_version": annotated_dataset["data_version"],
                      "sftkey.dvc_rev": annotated_dataset["dvc_rev"]})
    value = {"data_version": annotated_dataset["data_version"], "dvc_rev": annotated_dataset["dvc_rev"],
             "formats": prepared_by_format, "base_model": base.identity}
    return dg.Output(value, data_version=dg.DataVersion(content_key(prepared_by_format)), metadata={
        "model": f"{base.identity['description']} (weights sha256 {base.identity['weights_sha256'][:16]})",
        "formats": dg.MetadataValue.md(_md_table(["format", "kept", "excluded", "answer-token share", "DVC rev"], rows)),
        "mlflow_run": dg.MetadataValue.url(tracking.run_url(run.run_id)),
    })


# ---------------------------------------------------------------------------------- training


def cell_name(arm: str) -> str:
    """An arm name as a Dagster name (letters, digits, '_'): arm names may also hold '.' and '-'."""
    return re.sub(r"[^A-Za-z0-9_]", "_", arm)


def cell_key(arm: str, seed: int, asset: str) -> dg.AssetKey:
    """The key of one arm x seed cell's asset, e.g. sftkey_tag/seed0/stage2_model."""
    return dg.AssetKey([cell_name(arm), f"seed{seed}", asset])


def arm_of(training, arm: str, seed: int):
    if arm not in training.arms:
        raise ValueError(f"arm {arm!r} is not an arm of the config ({', '.join(training.arms)}): "
                         "materialize this config's cells")
    if seed not in training.seeds:
        raise ValueError(f"seed {seed} is not a seed of the config ({training.seeds})")
    return training.arms[arm]


def candidate_model_name(settings: PipelineSettings, arm: str, seed: int) -> str | None:
    """The MLflow model name of the cell's final model when it is the registry candidate; None otherwise
    (only the candidate is logged as a model: the others' weights stay in the store)."""
    config = settings.config
    return f"{arm}-seed{seed}" if (arm, seed) == (config.candidate_arm, config.candidate_seed) else None


def train_stage(context: dg.AssetExecutionContext, arm: str, seed: int, settings: PipelineSettings, tokenized: dict,
                stage_index: int, init: str, store: ModelStore, compute: ComputeResource, tracking: MlflowResource,
                model_name: str | None) -> dg.Output[dict]:
    """Stage `stage_index` of the cell's arm from `init`, in a folder named by the stage's key: a finished
    stage is reused, an interrupted one resumes from its newest checkpoint, a new one trains. The key holds the
    hash of the base weights as resolved now (with `model_fallback`), as the trainer's does. `model_name`: log
    the result as that MLflow model."""
    from orchestration.telemetry import log_missing_steps, reuse_tags, stage_telemetry
    from sftkey.models import identity_params, resolve_base_model
    from sftkey.train.config import stage_key, training_view
    from sftkey.train.layout import finished_stage, stage_metrics

    training = settings.config.training
    arm_config = arm_of(training, arm, seed)
    stage = arm_config.stages[stage_index]
    data_version = tokenized["data_version"]
    base = resolve_base_model(training.model, training.model_fallback).identity
    key = stage_key(training, arm, seed, stage_index, data_version, base["weights_sha256"])
    tags = {"sftkey.arm": arm, "sftkey.seed": str(seed), "sftkey.stage": stage.name, "sftkey.stage_key": key,
            "sftkey.data_version": data_version, "sftkey.dvc_rev": tokenized["dvc_rev"]}
    with tracking.asset_run(context, tags=tags, cell=f"{arm}|{seed}") as run:
        run.log_params(training_view(training, arm, seed) | {"init": init, "stage_index": stage_index}
                       | identity_params(base))
        run.log_input(f"{training.data.dataset}-{training.data.split}", data_version,
                      tokenized["formats"][arm_config.format]["folder"], "training")
        with store.claim("models", key[:20]) as folder:
            checkpoint = finished_stage(folder, seed, key)
            status = "reused"
            if checkpoint is None:
                status = "trained"
                staged = dataclasses.replace(training, output_dir=str(folder))
                telemetry = stage_telemetry(context, run, f"{arm} seed {seed} {stage.name}")  # metrics live, per step
                checkpoint = compute.run_stage(context, staged, arm, seed, stage_index, init,
                                               tokenized["formats"][arm_config.format]["folder"],
                                               tracker=telemetry.tracker, env=telemetry.env)
        rows = stage_metrics(checkpoint, stage.name)
        # what MLflow has not seen live (a reused stage, the steps before a resume) at the times they were trained
        log_missing_steps(run, rows)
        run.set_tags(reuse_tags(run, status, key))
        model_uri = logged_model_uri(run, checkpoint, model_name, settings.config.benchmark, store,
                                     tracking) if model_name else None
    losses = [(row["step"], row["loss"]) for row in rows]
    answer_losses = [(row["step"], row["loss_answer"]) for row in rows if "loss_answer" in row]
    value = {"arm": arm, "seed": seed, "stage": stage.name, "stage_index": stage_index, "key": key,
             "checkpoint": str(checkpoint), "status": status, "losses": losses, "answer_losses": answer_losses,
             "answer_curve": answer_losses, "data_version": data_version, "dvc_rev": tokenized["dvc_rev"],
             "mlflow_run_id": run.run_id, "model_uri": model_uri, "base_model": base}
    return dg.Output(value, data_version=dg.DataVersion(key[:20]), metadata={
        "status": status, "stage": stage.name, "loss": stage.loss, "steps": len(rows),
        "final_loss": losses[-1][1] if losses else float("nan"), "checkpoint": dg.MetadataValue.path(str(checkpoint)),
        "mlflow_run": dg.MetadataValue.url(tracking.run_url(run.run_id)),
    })


def logged_model_uri(run, checkpoint: Path, name: str, bench: BenchmarkSection, store: ModelStore,
                     tracking: MlflowResource) -> str:
    """Log the checkpoint as the MLflow model `name`, served as the benchmark scores it: weights in benchmark.dtype,
    greedy, with the benchmark's new-token cap. Once per checkpoint, name, those settings and tracking store: a
    reused checkpoint points at the model logged before instead of copying its weights again."""
    from sftkey.evaluate import default_max_new_tokens

    dtype, cap = bench.dtype, bench.max_new_tokens or default_max_new_tokens(bench.dataset)
    key = content_key(str(checkpoint), name, dtype, cap, tracking.resolve_uri(), checkpoint_weights_sha256(checkpoint))
    with store.claim("logged_models", key) as folder:
        record = folder / "model.json"
        if record.exists():
            logged = json.loads(record.read_text())
            run.set_tags({"sftkey.model_logged_in_run": logged["run_id"]})
            return logged["model_uri"]
        uri = run.log_model(checkpoint, name, dtype, max_new_tokens=cap)
        write_text(record, json.dumps({"model_uri": uri, "run_id": run.run_id}) + "\n")
    return uri


def passed_through(context: dg.AssetExecutionContext, settings: PipelineSettings, stage1: dict, store: ModelStore,
                   tracking: MlflowResource) -> dg.Output[dict]:
    """stage2_model of a one-stage arm: its stage-1 model (logged to MLflow when it is the candidate)."""
    from sftkey.models import identity_params
    from sftkey.train.checkpoint import read_meta
    from sftkey.train.config import training_view

    arm, seed = stage1["arm"], stage1["seed"]
    why = f"arm {arm} has one stage: its stage2_model is its stage-1 model"
    context.log.info(why)
    tags = {"sftkey.arm": arm, "sftkey.seed": str(seed), "sftkey.stage": stage1["stage"],
            "sftkey.stage_key": stage1["key"], "sftkey.data_version": stage1["data_version"],
            "sftkey.dvc_rev": stage1["dvc_rev"]}
    name = candidate_model_name(settings, arm, seed)
    with tracking.asset_run(context, tags=tags, cell=f"{arm}|{seed}") as run:
        base = (read_meta(Path(stage1["checkpoint"])) or {}).get("base_model") or {}  # what it was trained from
        run.log_params(training_view(settings.config.training, arm, seed)
                       | {"init": stage1["checkpoint"], "skipped": True} | identity_params(base))
        model_uri = logged_model_uri(run, Path(stage1["checkpoint"]), name, settings.config.benchmark, store,
                                     tracking) if name else None
    value = dict(stage1, status="skipped", losses=[], answer_losses=[], mlflow_run_id=run.run_id, model_uri=model_uri)
    return dg.Output(value, data_version=dg.DataVersion(stage1["key"][:20]), metadata={
        "status": "skipped", "why": why, "checkpoint": dg.MetadataValue.path(stage1["checkpoint"]),
        "mlflow_run": dg.MetadataValue.url(tracking.run_url(run.run_id)),
    })


# ---------------------------------------------------------------------------------- benchmark and reports


def cell_record_path(store: ModelStore, arm: str, seed: int) -> Path:
    """Where benchmark_scores leaves one arm x seed's outcomes for arm_comparison, inside this pipeline run."""
    return store.run_folder("scores", arm) / f"seed{seed}.json"


def score_cell(context: dg.AssetExecutionContext, arm: str, seed: int, settings: PipelineSettings,
               stage2_model: dict, store: ModelStore, compute: ComputeResource, tracking: MlflowResource) -> dg.Output[dict]:
    """benchmark_scores of a cell: the arm's final model answers the held-out questions: our scorer (strict, lenient, format) and the
    lm-eval tasks. Outputs are resumable: a crash mid-benchmark continues where it stopped."""
    from orchestration.registry import benchmark_dataset, benchmark_identity
    from sftkey.evaluate import OUTPUTS, SUMMARY, EvalConfig, evaluate, outcomes_from_rows
    from sftkey.generate import GenerationConfig

    bench = settings.config.benchmark
    key = score_key(stage2_model, dataclasses.asdict(bench))
    generation = GenerationConfig(max_new_tokens=bench.max_new_tokens, batch_size=bench.batch_size, progress=False,
                                  backend=bench.backend)
    tags = {"sftkey.arm": arm, "sftkey.seed": str(seed)}
    with tracking.asset_run(context, tags=tags, cell=f"{arm}|{seed}") as run:
        run.log_params({"benchmark": dataclasses.asdict(bench), "checkpoint": stage2_model["checkpoint"]})
        with store.claim("scores", key) as folder:
            summary = evaluate(EvalConfig(checkpoint=stage2_model["checkpoint"], data=bench.data(), dtype=bench.dtype,
                                          generation=generation, out=str(folder), device=compute.resolved_device()))
            rows = [json.loads(line) for line in (folder / OUTPUTS).read_text(encoding="utf-8").splitlines()]
            metrics = dict(summary["metrics"])
            if bench.lm_eval_tasks:
                metrics.update(lm_eval_metrics(bench, stage2_model["checkpoint"], compute, folder))
        outcomes, formats = outcomes_from_rows(rows)
        evaluation_data = benchmark_dataset(benchmark_identity(summary))
        if evaluation_data:  # named and versioned as the registered version's metrics refer to it
            run.log_input(*evaluation_data, str(folder / OUTPUTS), "evaluation")
        write_text(folder / "outcomes.json", json.dumps(outcomes, indent=1, sort_keys=True) + "\n")
        run.log_metrics({name: value for name, value in metrics.items() if value is not None})  # n/a: not logged
        run.log_artifact(folder / "outcomes.json")
        run.log_artifact(folder / SUMMARY)
        run.log_artifact(folder / OUTPUTS)
        run.set_tags({"sftkey.data_version": stage2_model["data_version"], "sftkey.dvc_rev": stage2_model["dvc_rev"]})
    record = {"arm": arm, "seed": seed, "metrics": metrics, "outcomes": outcomes, "format_ok": formats,
              "stage_keys": summary["stage_keys"], "warnings": summary["warnings"],
              "max_new_tokens": summary["max_new_tokens"],
              "folder": str(folder), "benchmark_run_id": run.run_id, "model_uri": stage2_model.get("model_uri"),
              "model_run_id": stage2_model.get("mlflow_run_id"), "checkpoint": stage2_model["checkpoint"],
              "data_version": stage2_model["data_version"], "dvc_rev": stage2_model["dvc_rev"],
              "losses": stage2_model.get("answer_curve", [])}
    write_text(cell_record_path(store, arm, seed), json.dumps(record, indent=1) + "\n")
    samples = rows[:3]
    return dg.Output(record, metadata={
        **{name: float(value) for name, value in metrics.items() if isinstance(value, (int, float))},
        "sample_outputs": dg.MetadataValue.md("\n\n".join(
            f"**{r['uid']}** (gold {r['gold']}, strict {'✓' if r['strict_correct'] else '✗'}):\n\n```\n{r['output'][:600]}\n```"
            for r in samples)),
        "mlflow_run": dg.MetadataValue.url(tracking.run_url(run.run_id)),
    })


def local_devices(compute: ComputeResource) -> int:
    """Devices of this machine a training stage holds: none when a cluster places it (k8s assigns the pod's GPUs)."""
    return 0 if compute.launcher == "k8s" else compute.num_processes


def cell_assets(arm: str, seed: int, pool: str | None = None,
                after: dg.AssetKey | None = None) -> list[dg.AssetsDefinition]:
    """stage1_model -> stage2_model -> benchmark_scores of one arm x seed cell. The cells of a config are
    independent steps of one run, so Dagster runs as many at once as the device pool `pool` allows; `after`: the
    stage-1 asset of another cell that trains the same first stage (this cell's stage 1 then reuses it)."""
    def define(asset: str, ins: dict[str, dg.AssetKey], description: str, deps=()):
        return dg.asset(key=cell_key(arm, seed, asset), ins={name: dg.AssetIn(key=key) for name, key in ins.items()},
                        deps=list(deps), group_name=GROUP, code_version="1", pool=pool, description=description,
                        tags={"sftkey/arm": cell_name(arm), "sftkey/seed": str(seed)})

    @define("stage1_model", {"tokenized_dataset": dg.AssetKey("tokenized_dataset")},
            "The arm's first stage from the base model (SFT-Tag: SFT on the tagged response; Key-Tag: answer only).",
            deps=[after] if after is not None else ())
    def stage1_model(context: dg.AssetExecutionContext, settings: PipelineSettings, tokenized_dataset: dict,
                     store: ModelStore, compute: ComputeResource, tracking: MlflowResource) -> dg.Output[dict]:
        with step_devices(store.root, compute.device, local_devices(compute)):
            return train_stage(context, arm, seed, settings, tokenized_dataset, 0, settings.config.training.model,
                               store, compute, tracking, model_name=None)

    @define("stage2_model", {"tokenized_dataset": dg.AssetKey("tokenized_dataset"),
                             "stage1_model": cell_key(arm, seed, "stage1_model")},
            "The arm's second stage from its stage-1 weights (SFTKey-Tag: loss on the answer span only); an arm "
            "with one stage passes its stage-1 model through. The registry candidate's final model is logged to "
            "MLflow here.")
    def stage2_model(context: dg.AssetExecutionContext, settings: PipelineSettings, tokenized_dataset: dict,
                     stage1_model: dict, store: ModelStore, compute: ComputeResource,
                     tracking: MlflowResource) -> dg.Output[dict]:
        if len(arm_of(settings.config.training, arm, seed).stages) < 2:
            return passed_through(context, settings, stage1_model, store, tracking)
        with step_devices(store.root, compute.device, local_devices(compute)):
            output = train_stage(context, arm, seed, settings, tokenized_dataset, 1, stage1_model["checkpoint"],
                                 store, compute, tracking, model_name=candidate_model_name(settings, arm, seed))
        output.value["answer_curve"] = stage1_model["answer_losses"] + output.value["answer_losses"]  # both stages
        return output

    @define("benchmark_scores", {"stage2_model": cell_key(arm, seed, "stage2_model")},
            "The arm's final model answers the held-out questions: our scorer (strict, lenient, format) and the "
            "lm-eval tasks. Outputs are resumable: a crash mid-benchmark continues where it stopped.")
    def benchmark_scores(context: dg.AssetExecutionContext, settings: PipelineSettings, stage2_model: dict,
                         store: ModelStore, compute: ComputeResource, tracking: MlflowResource) -> dg.Output[dict]:
        with step_devices(store.root, compute.device, 1):  # generation runs here, on one device
            return score_cell(context, arm, seed, settings, stage2_model, store, compute, tracking)

    return [stage1_model, stage2_model, benchmark_scores]


def checkpoint_weights_sha256(checkpoint: str | Path) -> str:
    """sha256 of the checkpoint's *.safetensors files as they are now (cached by path, size, mtime and inode)."""
    from sftkey.models import weights_identity

    return weights_identity(str(checkpoint), folder=Path(checkpoint))["weights_sha256"]


def score_key(model: dict, bench: dict) -> str:
    """The scores folder's name: the stage key, the benchmark settings and the weights actually scored (and, as
    every content key, the code version), so weights swapped in a warm work dir are scored again."""
    return content_key(model["key"], bench, checkpoint_weights_sha256(model["checkpoint"]))


def lm_eval_metrics(bench: BenchmarkSection, checkpoint: str, compute: ComputeResource, folder: Path) -> dict:
    """lm-eval's metrics for the configured tasks, cached in the scores folder (lm-eval cannot resume)."""
    from evals.run import BenchConfig, flat_metrics, run

    cache = folder / "lm_eval.json"
    if cache.exists():
        return json.loads(cache.read_text())
    config = BenchConfig(checkpoint=checkpoint, tasks=list(bench.lm_eval_tasks), split=bench.split,
                         limit=bench.lm_eval_limit, batch_size=bench.batch_size,
                         max_new_tokens=bench.max_new_tokens, device=compute.resolved_device(), dtype=bench.dtype)
    metrics = flat_metrics(run(config))
    write_text(cache, json.dumps(metrics, indent=1) + "\n")
    return metrics


def plot_markdown(plots: list[Path], out: Path, run_id: str, tracking: MlflowResource) -> str:
    """The plots as images served by the MLflow UI (`sftkey ui`): Dagster shows markdown longer than 1000
    characters only behind a button, so inline data: images (any real PNG) never appear on the asset page."""
    base = tracking.ui_url.rstrip("/")
    return "\n\n".join(f"![{p.stem}]({base}/get-artifact?path={p.relative_to(out).as_posix()}&run_uuid={run_id})"
                         for p in plots)


def cell_records(store: ModelStore, arms: list[str], seeds: list[int]) -> dict[tuple[str, int], dict]:
    """benchmark_scores' record of every arm x seed of this pipeline run."""
    records = {}
    for arm in arms:
        for seed in seeds:
            path = cell_record_path(store, arm, seed)
            if not path.exists():
                raise FileNotFoundError(f"no benchmark_scores for arm {arm!r} seed {seed} in this pipeline run "
                                        f"({path}): materialize {cell_key(arm, seed, 'benchmark_scores').to_user_string()} first")
            records[(arm, seed)] = json.loads(path.read_text())
    return records


def arm_comparison_asset(benchmark_keys: list[dg.AssetKey]) -> dg.AssetsDefinition:
    """arm_comparison after every cell's benchmark_scores (it reads their records from this run's folder)."""
    return dg.asset(name="arm_comparison", deps=benchmark_keys, group_name=GROUP, code_version="1")(arm_comparison)


def arm_comparison(context: dg.AssetExecutionContext, settings: PipelineSettings, store: ModelStore,
                   tracking: MlflowResource) -> dg.Output[dict]:
    """Every arm x seed of this pipeline run: accuracy with intervals, seed-aware tests against the baseline arm
    (arms sharing a stage with it paired by seed, Holm-corrected), the table as Markdown, plots."""
    from sftkey.compare import write_report

    config = settings.config
    arms, seeds, baseline = config.arms, config.seeds, config.baseline_arm
    records = cell_records(store, arms, seeds)
    correct = {arm: {seed: records[arm, seed]["outcomes"] for seed in seeds} for arm in arms}
    formats = {arm: {seed: records[arm, seed]["format_ok"] for seed in seeds} for arm in arms
               if all(records[arm, seed]["format_ok"] is not None for seed in seeds)}  # tagged arms only
    stage_keys = {(arm, seed): record["stage_keys"] for (arm, seed), record in records.items()}
    curves = {arm: [tuple(point) for point in records[arm, seeds[0]]["losses"]] for arm in arms}
    warnings = [f"{arm} seed {seed}: {w}" for (arm, seed), record in records.items() for w in record["warnings"]]
    out = store.run_folder("comparison")
    report = write_report(out, correct, formats, stage_keys, baseline,
                          curves=curves if all(curves.values()) else None, warnings=warnings)
    with tracking.asset_run(context) as run:
        run.log_params({"arms": arms, "seeds": seeds, "baseline_arm": baseline})
        for summary in report.summaries:
            run.log_metrics({f"{summary.arm}.accuracy": summary.accuracy} | (
                {} if summary.format_accuracy is None else {f"{summary.arm}.format_accuracy": summary.format_accuracy}))
        for comparison in report.comparisons:
            run.log_metrics({f"{comparison.arm}.difference_points": comparison.difference,
                             f"{comparison.arm}.p_value": comparison.p_value,
                             f"{comparison.arm}.p_holm": comparison.p_value if comparison.p_adjusted is None
                             else comparison.p_adjusted})
        for path in [*report.files, *report.plots]:  # answer_loss/<arm>.csv keeps its folder
            folder = path.parent.relative_to(out).as_posix()
            run.log_artifact(path, None if folder == "." else folder)
    value = {"table": report.table, "verdicts": [c.verdict() for c in report.comparisons], "folder": str(out),
             "records": {f"{arm}|{seed}": record for (arm, seed), record in records.items()},
             "mlflow_run_id": run.run_id}
    return dg.Output(value, metadata={
        "comparison": dg.MetadataValue.md(report.table),
        "plots": dg.MetadataValue.md(plot_markdown(report.plots, out, run.run_id, tracking)),
        **{f"{p.stem}_png": dg.MetadataValue.path(str(p)) for p in report.plots},
        "folder": dg.MetadataValue.path(str(out)),
        "mlflow_run": dg.MetadataValue.url(tracking.run_url(run.run_id)),
        "model_runs": dg.MetadataValue.md("\n".join(
            f"- {arm} seed {seed}: [model]({tracking.run_url(r['model_run_id'])}), "
            f"[benchmark]({tracking.run_url(r['benchmark_run_id'])})"
            for (arm, seed), r in records.items() if r.get("model_run_id"))),
    })


@dg.asset(group_name=GROUP, code_version="1")
def registered_model(context: dg.AssetExecutionContext, settings: PipelineSettings, arm_comparison: dict,
                     tracking: MlflowResource) -> dg.Output[dict]:
    """The candidate arm's model in the MLflow registry, aliased `challenger`: a new version, or the earlier one
    of the same weights scored on the same benchmark (a rerun adds none). Tagged with what the gate pairs on."""
    from orchestration.registry import (BENCHMARK_RUN_TAG, BENCHMARK_TAG, CHALLENGER, WEIGHTS_TAG,
                                        benchmark_identity, logged_weights_dtype, register_candidate,
                                        registration_tags)
    from orchestration.tracking import WEIGHTS_DTYPE_TAG
    from sftkey.evaluate import SUMMARY

    config = settings.config
    arm, seed, model_name = config.candidate_arm, config.candidate_seed, config.promotion.model_name
    record = arm_comparison["records"].get(f"{arm}|{seed}")
    if record is None:
        raise ValueError(f"candidate arm {arm!r} seed {seed} is not among the compared runs "
                         f"({', '.join(arm_comparison['records'])}): set promotion.candidate_arm")
    if not record.get("model_uri"):
        raise ValueError(f"arm {arm!r} seed {seed}: no logged model to register")
    summary = json.loads((Path(record["folder"]) / SUMMARY).read_text(encoding="utf-8"))
    with tracking.asset_run(context) as run:
        tags = {"sftkey.arm": arm, "sftkey.seed": seed,
                "sftkey.data_version": record["data_version"], "sftkey.dvc_rev": record["dvc_rev"],
                BENCHMARK_RUN_TAG: record["benchmark_run_id"], WEIGHTS_TAG: summary["model"]["weights_sha256"],
                BENCHMARK_TAG: json.dumps(benchmark_identity(summary), sort_keys=True),
                **registration_tags(tracking.parent_run_id)}
        weights_dtype = logged_weights_dtype(tracking.client(), record["model_uri"])
        if weights_dtype:  # the gate refuses a version without it
            tags[WEIGHTS_DTYPE_TAG] = weights_dtype
        version = register_candidate(tracking.client(), model_name, record["model_uri"],
                                     record["model_run_id"], tags, tracking.resolve_uri(), metrics=record["metrics"])
        reused = version.tags.get(BENCHMARK_RUN_TAG) != record["benchmark_run_id"]  # an earlier run's version
        run.log_params({"model_name": model_name, "version": version.version, **tags})
    value = {"name": model_name, "version": str(version.version), "arm": arm, "seed": seed,
             "metrics": record["metrics"], "reused": reused}
    return dg.Output(value, metadata={
        "model": f"{model_name} v{version.version} (@{CHALLENGER})"
                 + (" (reused: same weights, same benchmark)" if reused else ""),
        "model_run": dg.MetadataValue.url(tracking.run_url(record["model_run_id"])),
        "strict_accuracy": float(record["metrics"]["strict_accuracy"]),
    })


@dg.asset(group_name=GROUP, code_version="1")
def champion_model(context: dg.AssetExecutionContext, registered_model: dict,
                   tracking: MlflowResource) -> dg.Output[dict]:
    """Moves the `champion` alias to the candidate; runs only when the promotion gate passed, and moves it only
    if the champion is still the one the gate compared with (else the gate runs again against the new one)."""
    from orchestration.registry import CHAMPION, promote, version_by_alias

    name, version = registered_model["name"], registered_model["version"]
    decision = promote(tracking.client(), name, version, tracking.resolve_uri())
    champion = version_by_alias(tracking.client(), name, CHAMPION)
    value = dict(registered_model, promoted=decision.promote, reason=decision.reason)
    return dg.Output(value, metadata={
        "champion": f"{name} v{champion.version if champion else '?'} (@{CHAMPION})",
        "promoted": decision.promote, "reason": decision.reason})
