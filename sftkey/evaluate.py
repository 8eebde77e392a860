"""The evaluation pipeline: a checkpoint and a data set -> `outputs.jsonl` + `summary.json`.

Questions and gold answers are the data set's records after annotation (records that cannot be annotated
have no gold answer: they are excluded and counted). Each question is asked with the exact prompt training
uses (`format_prompt`). Outputs are scored and appended to `outputs.jsonl` batch by batch, and
`summary.json` is rewritten (atomically) after every batch, so a crash loses at most one batch and a rerun
with the same settings skips the questions already answered.
"""

from __future__ import annotations

import json
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sftkey.annotate import Annotated, AnnotationConfig, annotate, exclusion_counts
from sftkey.atomic import write_text
from sftkey.data import DataConfig, DataError, can_share_records, content_version, load_records, shared_uids
from sftkey.data.overlap import describe, is_carved
from sftkey.data.registry import dataset_spec
from sftkey.errors import UserError
from sftkey.generate import STOP_LENGTH, Generation, GenerationConfig
from sftkey.weights_digest import parameters_sha256

CHECKPOINT_META = "sftkey.json"  # written by the trainer next to the weights: arm, seed, stage, step, config
OUTPUTS = "outputs.jsonl"
SUMMARY = "summary.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Settings that decide what the outputs are: a rerun into the same folder must match them to resume.
RESUME_KEYS = (
    "checkpoint", "dataset", "split", "limit", "data_version", "tagged", "dtype", "max_new_tokens", "temperature",
    "sampling_seed", "exclude_training_questions",
)

LENGTH_CAP_WARNING_SHARE = 0.05  # more answers cut by the cap than this: the summary warns


class EvalError(UserError, ValueError):
    """Bad input to an evaluation; the message names the file or setting and the fix."""


@dataclass
class EvalConfig:
    """One evaluation: which checkpoint, which questions, how to generate, where to write."""

    checkpoint: str = field(default="default", metadata={"help": "model folder, `default` (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised) or `tiny`"})
    data: DataConfig = field(default_factory=lambda: DataConfig(split="test"))
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    out: str | None = field(
        default=None, metadata={"help": "output folder; default <checkpoint>/eval/<dataset>-<split>[-limitN]"}
    )
    tagged: bool | None = field(
        default=None, metadata={"help": "score the tagged format; None: from the checkpoint's sftkey.json"}
    )
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ...; None: cuda when available"})
    dtype: str | None = field(default=None, metadata={
        "help": "model dtype; None: float32 (bfloat16 changes some greedy answers: benchmarks/eval_precision.py)"})
    exclude_training_questions: bool = field(
        default=False, metadata={"help": "drop questions the checkpoint trained on (counted) instead of refusing"}
    )


def default_max_new_tokens(dataset: str) -> int:
    """The new-token cap of a data set when none is given: its registry entry's `max_new_tokens`."""
    return dataset_spec(dataset).max_new_tokens


@dataclass
class CheckpointInfo:
    """What the trainer recorded about a checkpoint (defaults when it recorded nothing).

    stage_keys: the identity of every stage that made it (its own and its ancestors' through `init`), so two
    checkpoints that share a trained stage can be paired by seed. training_data: the data configs those stages
    trained on; None when unknown (a model without sftkey.json, such as a base model).
    """

    arm: str
    seed: int = 0
    tagged: bool = True
    stage: str | None = None
    step: int | None = None
    data_version: str | None = None
    stage_keys: tuple[str, ...] = ()
    training_data: tuple[DataConfig, ...] | None = None


def read_checkpoint_info(folder: Path) -> CheckpointInfo:
    """`sftkey.json` of a checkpoint; without one: tagged, seed 0, arm = the folder name, training data unknown.

    The format is the one of the arm in the run config the trainer stored (`config.arms.<arm>.format`; it holds
    one arm, which for a reused stage is the arm that trained it).
    """
    folder = Path(folder)
    lineage = checkpoint_lineage(folder)
    if not lineage:
        return CheckpointInfo(arm=folder.name)
    meta = lineage[0]
    arms = (meta.get("config") or {}).get("arms") or {}
    response_format = next(iter(arms.values()), {}).get("format", "tagged")
    training_data = []
    for ancestor in lineage:
        data = training_data_config(ancestor)
        if data is not None and data not in training_data:
            training_data.append(data)
    return CheckpointInfo(
        arm=str(meta.get("arm") or folder.name),
        seed=int(meta.get("seed", 0)),
        tagged=response_format == "tagged",
        stage=meta.get("stage"),
        step=meta.get("step"),
        data_version=meta.get("data_version"),
        stage_keys=tuple(m["stage_key"] for m in lineage if m.get("stage_key")),
        training_data=tuple(training_data),
    )


def checkpoint_lineage(folder: Path) -> list[dict]:
    """`sftkey.json` of `folder`, then of the checkpoint it started from (`init`), and so on back to the base model."""
    lineage, seen = [], set()
    while folder is not None and folder.resolve() not in seen:
        seen.add(folder.resolve())
        path = folder / CHECKPOINT_META
        if not path.is_file():
            break
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvalError(f"{path}: not valid JSON ({e}); fix or delete the file (the defaults then apply)") from None
        if not isinstance(meta, dict):
            raise EvalError(f"{path}: expected a JSON object with arm, seed, stage, step")
        lineage.append(meta)
        folder = Path(meta["init"]) if meta.get("init") else None
    return lineage


def training_data_config(meta: dict) -> DataConfig | None:
    """The records a checkpoint's stage trained on, from the run config in its sftkey.json (None: not recorded)."""
    data = (meta.get("config") or {}).get("data")
    if not isinstance(data, dict):
        return None
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: v for k, v in data.items() if k in fields})


def check_checkpoint(name: str) -> Path:
    """The local folder of `name` with weights, config and tokenizer, or an error saying what is missing."""
    from sftkey.models import ModelResolveError, resolve_model

    refuse_uncommitted(Path(name))
    try:
        folder = resolve_model(name)
    except ModelResolveError as e:
        raise EvalError(f"checkpoint: {e}") from None
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise EvalError(
            f"checkpoint {str(folder)!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): save the tokenizer "
            "into the folder with the weights (tokenizer.save_pretrained(folder))"
        )
    return folder


def refuse_uncommitted(folder: Path) -> None:
    """Refuse a checkpoint the trainer did not finish: its temp folder (`.<name>.tmp`) or a folder of a run's
    `checkpoints/` without the sftkey.json it writes last. The message names the newest complete one beside it."""
    from sftkey.train.checkpoint import META_FILE, latest

    if folder.name.endswith(".tmp"):
        why = "is a checkpoint still being written, or left by a crash (its name ends with .tmp)"
    elif folder.parent.name == "checkpoints" and folder.is_dir() and not (folder / META_FILE).is_file():
        why = f"is an unfinished checkpoint (no {META_FILE}, which the trainer writes last)"
    else:
        return
    try:
        found = latest(folder.parent)
    except (KeyError, TypeError):  # a sftkey.json without the trainer's fields: name none rather than guess
        found = None
    fix = f"use the last complete checkpoint beside it, {found[0]}" if found else \
        "no complete checkpoint is beside it: resume the training run (sftkey train --resume)"
    raise EvalError(f"checkpoint {str(folder)!r} {why}; {fix}")


def gold_records(config: DataConfig, annotation: AnnotationConfig | None = None) -> tuple[list[Annotated], dict]:
    """The annotated records (question + gold answer) and facts about them for the summary."""
    records, source = load_records(config)
    annotated, exclusions = annotate(config.dataset, records, annotation)
    if not annotated:
        reasons = exclusion_counts(exclusions) or {"no records": 0}
        raise EvalError(
            f"{source}: no question with a gold answer ({len(records)} records, excluded: {reasons}); "
            "check --dataset and --data-path (jsonl: --answer-field or a `#### answer` line)"
        )
    facts = {
        "source": source,
        "data_version": content_version(records),
        "excluded": len(exclusions),
        "excluded_by_reason": exclusion_counts(exclusions),
    }
    return annotated, facts


def default_out(checkpoint: Path, data: DataConfig) -> Path:
    suffix = f"-limit{data.limit}" if data.limit else ""
    return checkpoint / "eval" / f"{data.dataset}-{data.split}{suffix}"


def read_outputs(path: Path) -> list[dict]:
    """Rows already written. A last line cut off by a crash is dropped (and removed from the file)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise EvalError(
                    f"{path} line {number}: not valid JSON; delete that line (its question is asked again) "
                    "or the file (all questions are asked again)"
                ) from None
            write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def score_row(generation: Generation, gold: str, dataset: str, tagged: bool) -> dict:
    """The output row: the generation, the gold answer, whether its format is judged and the score fields.
    Never raises."""
    from sftkey.score import score_output

    row = asdict(generation) | {"gold": gold, "tagged": tagged}
    try:
        return row | score_output(generation.output, gold, dataset, tagged)
    except Exception as e:  # a scorer bug must not cost the outputs of a long run: score as wrong, say why
        return row | {"format_ok": False, "strict_correct": False, "lenient_correct": False, "pred_strict": None,
                      "pred_lenient": None, "reasoning_chars": 0, "reason": f"scoring error: {type(e).__name__}: {e}"}


def outcomes_from_rows(rows: list[dict]) -> tuple[dict[str, bool], dict[str, bool] | None]:
    """(strict outcome by uid, format outcome by uid) of scored `outputs.jsonl` rows; formats are None when the
    rows are untagged (a plain arm has no format to judge)."""
    for row in rows:  # rows written before the field, or a mix of arms, cannot say whether format counts
        if not isinstance(row.get("tagged"), bool) or row["tagged"] != rows[0]["tagged"]:
            raise EvalError(f"{OUTPUTS} row of uid {row['uid']!r}: 'tagged' is {row.get('tagged')!r}, expected true or "
                            f"false, the same in every row; delete {OUTPUTS} and {SUMMARY} and evaluate again")
    strict = {row["uid"]: bool(row["strict_correct"]) for row in rows}
    formats = {row["uid"]: bool(row["format_ok"]) for row in rows} if rows and rows[0]["tagged"] else None
    return strict, formats


def metrics(rows: list[dict], tagged: bool = True) -> dict:
    """The summary metrics of scored rows (names without commas, see sftkey.score.METRIC_NAMES)."""
    from sftkey.score import summarize

    if not rows:
        return {}
    return summarize(rows, [r["stop_reason"] == STOP_LENGTH for r in rows], tagged=tagged)


def drop_training_questions(questions: list[Annotated], data: DataConfig, training: tuple[DataConfig, ...] | None,
                            checkpoint: Path, exclude: bool) -> tuple[list[Annotated], int]:
    """The questions the checkpoint did not train on, and how many were dropped (only with `exclude`).

    Refuses (EvalError) to score a question of the checkpoint's training data unless `exclude` is set.
    """
    trained: set[str] = set()
    for config in training or ():
        if not can_share_records(config, data):
            continue
        try:
            records, _ = load_records(config)
        except DataError as e:
            raise EvalError(f"{checkpoint}: cannot check which questions it trained on ({describe(config)}): {e}. "
                            "Make that training data readable again (the same path or data folder)") from None
        overlap = set(shared_uids(config, records, data, questions))
        if overlap and not exclude:
            held_out = (f"--split test --seed {config.seed}: the held-out half of the training carve"
                        if is_carved(config) and config.dataset == data.dataset else "another split or data set")
            raise EvalError(
                f"{checkpoint} trained on {len(overlap)} of the {len(questions)} questions of {describe(data)} "
                f"(its training data: {describe(config)}). Score held-out questions ({held_out}), or pass "
                "--exclude-training-questions to drop them (counted in the summary)"
            )
        trained |= overlap
    return [q for q in questions if q.uid not in trained], len(trained)


def evaluate(config: EvalConfig) -> dict:
    """Run (or resume) one evaluation; returns the summary written to `<out>/summary.json`."""
    from sftkey.models import weights_identity

    started = time.perf_counter()
    folder = check_checkpoint(config.checkpoint)
    info = read_checkpoint_info(folder)
    tagged = info.tagged if config.tagged is None else config.tagged
    questions, facts = gold_records(config.data, config.annotation)
    questions, dropped = drop_training_questions(questions, config.data, info.training_data, folder,
                                                 config.exclude_training_questions)
    if not questions:
        raise EvalError(f"{folder}: every question of {describe(config.data)} is in its training data; "
                        "score held-out questions")
    generation = dataclasses.replace(
        config.generation, max_new_tokens=config.generation.max_new_tokens or default_max_new_tokens(config.data.dataset))
    out = Path(config.out) if config.out else default_out(folder, config.data)
    settings = {
        "arm": info.arm,
        "seed": info.seed,
        "stage": info.stage,
        "step": info.step,
        "checkpoint": str(folder.resolve()),
        "model": weights_identity(config.checkpoint, folder=folder),  # exactly which weights answered
        "out": str(out),
        "dataset": config.data.dataset,
        "split": config.data.split,
        "limit": config.data.limit,
        "tagged": tagged,
        "dtype": config.dtype or "float32",
        "max_new_tokens": generation.max_new_tokens,
        "temperature": generation.temperature,
        "sampling_seed": generation.seed,
        "backend": generation.backend,  # not in RESUME_KEYS: every backend gives the same greedy outputs
        "stage_keys": list(info.stage_keys),
        "training_data": None if info.training_data is None else [describe(d) for d in info.training_data],
        "exclude_training_questions": config.exclude_training_questions,
        "training_questions_excluded": dropped,
        **facts,
    }
    previous = check_resume(out, settings)

    asked = {q.uid for q in questions}
    rows = [r for r in read_outputs(out / OUTPUTS) if r["uid"] in asked]
    done = {r["uid"] for r in rows}
    todo = [q for q in questions if q.uid not in done]
    if todo:
        from sftkey.generate import generate_batches
        from sftkey.generate_backends import check_backend
        from sftkey.models import load_model, load_tokenizer
        from sftkey.tokenize import format_prompt

        check_backend(generation.backend, generation.temperature, resolve_device(config.device))  # before any output
        # The model loads before anything is written: a checkpoint that does not load leaves no output folder.
        tokenizer = load_tokenizer(folder)
        model = load_model(folder, dtype=config.dtype).to(resolve_device(config.device)).eval()
        settings["parameters_sha256"] = parameters_sha256(model)
        out.mkdir(parents=True, exist_ok=True)
        write_summary(out, settings, rows, len(questions), started)
        gold = {q.uid: q.answer for q in todo}
        prompts = [(q.uid, format_prompt(tokenizer, q.question)) for q in todo]
        with open(out / OUTPUTS, "a", encoding="utf-8") as f:
            for batch in generate_batches(model, tokenizer, prompts, generation):
                scored = [score_row(g, gold[g.uid], config.data.dataset, tagged) for g in batch]
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored))
                f.flush()
                rows.extend(scored)
                write_summary(out, settings, rows, len(questions), started)
    else:  # every answer is there: the hash of the weights that gave them (older summaries have none)
        settings["parameters_sha256"] = previous.get("parameters_sha256") or _scored_parameters_sha256(folder, config)
    return write_summary(out, settings, rows, len(questions), started)


def _scored_parameters_sha256(folder: Path, config: EvalConfig) -> str:
    """sftkey.weights_digest.parameters_sha256 of the checkpoint as evaluate loads it (its dtype, on the CPU)."""
    from sftkey.models import load_model

    return parameters_sha256(load_model(folder, dtype=config.dtype))


def check_resume(out: Path, settings: dict) -> dict:
    """Refuse to mix outputs made with other settings, or by other weights under the same checkpoint path (it was
    trained again), into this folder; returns the folder's summary ({} when there is none)."""
    path = out / SUMMARY
    if not path.exists():
        return {}
    previous = json.loads(path.read_text(encoding="utf-8"))
    changed = [k for k in RESUME_KEYS if previous.get(k) != settings[k]]
    if changed:
        detail = ", ".join(f"{k}: {previous.get(k)!r} -> {settings[k]!r}" for k in changed)
        raise EvalError(
            f"{out} holds outputs made with other settings ({detail}); pass another --out, "
            f"or delete {out / OUTPUTS} and {path} to start over"
        )
    before, now = (previous.get("model") or {}).get("weights_sha256"), settings["model"]["weights_sha256"]
    if before != now:
        raise EvalError(
            f"{out} holds outputs of other weights: {settings['checkpoint']} held weights sha256 {before} when they "
            f"were made and holds {now} now (trained again?); pass another --out, or delete {out / OUTPUTS} and "
            f"{path} to score these weights"
        )
    return previous


def write_summary(out: Path, settings: dict, rows: list[dict], n_questions: int, started: float) -> dict:
    values = metrics(rows, settings.get("tagged", True))
    summary = settings | {
        "n": len(rows),
        "n_questions": n_questions,
        "complete": len(rows) == n_questions,
        "metrics": values,
        "warnings": summary_warnings(values, settings.get("max_new_tokens")),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_text(out / SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def summary_warnings(values: dict, max_new_tokens: int | None) -> list[str]:
    """What a reader of the numbers must know: answers cut by the length cap (more than LENGTH_CAP_WARNING_SHARE)."""
    share = values.get("length_cap_share", 0.0)
    if share > LENGTH_CAP_WARNING_SHARE:
        return [f"{share:.0%} of the answers hit the cap of {max_new_tokens} new tokens (more than "
                f"{LENGTH_CAP_WARNING_SHARE:.0%}): their accuracy is a floor; raise the cap (sftkey eval --max-new-tokens, "
                "pipeline benchmark.max_new_tokens)"]
    return []


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")
