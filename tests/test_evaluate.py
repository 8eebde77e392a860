"""The eval pipeline and its commands: files written as generated, resumable runs, clear errors, exact metrics."""

from __future__ import annotations

import json
import shutil

import pytest

from sftkey.cli import main
from sftkey.data import DataConfig
from sftkey.evaluate import (
    OUTPUTS,
    SUMMARY,
    EvalConfig,
    EvalError,
    evaluate,
    metrics,
    outcomes_from_rows,
    read_checkpoint_info,
    read_outputs,
    score_row,
    write_summary,
)
from sftkey.generate import Generation, GenerationConfig

QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7", "7"),
    ("A box holds 12 pens. How many pens in 3 boxes?", "12 * 3 = 36", "36"),
    ("Sara had 50 dollars and spent 18. How much is left?", "50 - 18 = 32", "32"),
]
ROW_KEYS = ["uid", "prompt", "output", "n_tokens", "stop_reason", "gold", "tagged", "format_ok", "strict_correct",
            "lenient_correct", "pred_strict", "pred_lenient", "reasoning_chars", "reason"]


@pytest.fixture
def checkpoint(tiny_model_dir, tmp_path):
    """A private copy of the tiny model: evaluations write into <checkpoint>/eval by default."""
    return shutil.copytree(tiny_model_dir, tmp_path / "run-a")


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": f"{r}\n#### {a}"}) + "\n" for q, r, a in QUESTIONS))
    return path


def config(checkpoint, data_file, **kw) -> EvalConfig:
    generation = GenerationConfig(max_new_tokens=kw.pop("max_new_tokens", 5), batch_size=2, progress=False)
    return EvalConfig(checkpoint=str(checkpoint), data=DataConfig("gsm8k", "test", path=str(data_file), limit=kw.pop("limit", None)),
                      generation=generation, **kw)


def test_eval_writes_scored_outputs_and_a_summary(checkpoint, data_file):
    summary = evaluate(config(checkpoint, data_file, limit=2))
    out = checkpoint / "eval" / "gsm8k-test-limit2"
    assert summary["out"] == str(out)
    rows = read_outputs(out / OUTPUTS)
    assert [list(r) for r in rows] == [ROW_KEYS] * 2
    assert sorted(r["uid"] for r in rows) == ["gsm8k-test-00000", "gsm8k-test-00001"]  # the seeded sample of 2
    for row in rows:  # the random tiny model repeats a newline up to the cap
        assert (row["output"], row["n_tokens"], row["stop_reason"]) == ("\n" * 5, 5, "length")
        assert row["reason"] == "no single closed Answer block"
        assert row["prompt"].startswith("<|im_start|>user\n") and row["prompt"].endswith("<|im_start|>assistant\n")
    assert {r["uid"]: r["gold"] for r in rows} == {"gsm8k-test-00000": "7", "gsm8k-test-00001": "36"}
    assert json.loads((out / SUMMARY).read_text()) == summary
    assert {k: summary[k] for k in ("arm", "seed", "dataset", "split", "limit", "tagged", "n", "n_questions", "complete", "excluded")} == {
        "arm": "run-a", "seed": 0, "dataset": "gsm8k", "split": "test", "limit": 2, "tagged": True,
        "n": 2, "n_questions": 2, "complete": True, "excluded": 0,
    }
    assert summary["metrics"] == {"strict_accuracy": 0.0, "lenient_accuracy": 0.0, "format_accuracy": 0.0, "composite": 0.0,
                                  "mean_reasoning_chars": 0.0, "length_cap_share": 1.0, "n": 2}
    assert summary["warnings"] == ["100% of the answers hit the cap of 5 new tokens (more than 5%): their accuracy "
                                   "is a floor; raise the cap (sftkey eval --max-new-tokens, pipeline "
                                   "benchmark.max_new_tokens)"]
    assert (summary["model"]["source"], summary["model"]["path"]) == ("folder", str(checkpoint))
    assert len(summary["model"]["weights_sha256"]) == 64
    # a base model (no sftkey.json): its training data is unknown, nothing is left out
    assert (summary["training_data"], summary["training_questions_excluded"], summary["stage_keys"]) == (None, 0, [])


def test_rerun_skips_answered_questions_and_drops_a_cut_off_line(checkpoint, data_file, tmp_path):
    out = tmp_path / "out"
    evaluate(config(checkpoint, data_file, out=str(out)))
    first = (out / OUTPUTS).read_text().splitlines()
    kept = json.loads(first[0]) | {"output": "KEPT: not generated again"}
    # a crash after the first row, in the middle of writing the second
    (out / OUTPUTS).write_text(json.dumps(kept) + "\n" + first[1][:40])
    summary = evaluate(config(checkpoint, data_file, out=str(out)))
    rows = read_outputs(out / OUTPUTS)
    assert rows[0] == kept
    assert sorted(map(json.dumps, rows[1:])) == sorted(first[1:])  # the other two, generated again, identically
    assert (summary["n"], summary["complete"]) == (3, True)


def test_rerun_with_other_settings_is_refused(checkpoint, data_file, tmp_path):
    out = tmp_path / "out"
    evaluate(config(checkpoint, data_file, out=str(out)))
    with pytest.raises(EvalError, match=r"holds outputs made with other settings \(max_new_tokens: 5 -> 6\); pass another --out"):
        evaluate(config(checkpoint, data_file, out=str(out), max_new_tokens=6))


def test_the_summary_hashes_the_parameters_as_scored_and_keeps_the_hash_on_a_complete_rerun(checkpoint, data_file,
                                                                                           tmp_path):
    from sftkey.models import load_model
    from sftkey.weights_digest import parameters_sha256

    fp32, bf16 = (parameters_sha256(load_model(checkpoint, dtype=d)) for d in ("float32", "bfloat16"))
    assert fp32 != bf16
    assert evaluate(config(checkpoint, data_file, out=str(tmp_path / "fp32")))["parameters_sha256"] == fp32
    assert evaluate(config(checkpoint, data_file, out=str(tmp_path / "bf16"), dtype="bfloat16"))["parameters_sha256"] == bf16
    # nothing left to answer: the hash is carried over, or computed for a summary written before it was recorded
    assert evaluate(config(checkpoint, data_file, out=str(tmp_path / "fp32")))["parameters_sha256"] == fp32
    path = tmp_path / "bf16" / SUMMARY
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "parameters_sha256"}))
    assert evaluate(config(checkpoint, data_file, out=str(tmp_path / "bf16"), dtype="bfloat16"))["parameters_sha256"] == bf16


@pytest.mark.parametrize("answered", [1, 3], ids=["part-answered", "all-answered"])
def test_a_rerun_on_weights_trained_again_under_the_same_path_is_refused(checkpoint, data_file, tmp_path, answered):
    """Outputs of the old weights must not be mixed with the new ones', nor reported as theirs."""
    import torch

    from sftkey.models import load_model, weights_identity

    out = tmp_path / "out"
    evaluate(config(checkpoint, data_file, out=str(out)))
    lines = (out / OUTPUTS).read_text().splitlines(keepends=True)
    (out / OUTPUTS).write_text("".join(lines[:answered]))
    before = weights_identity(checkpoint)["weights_sha256"]
    model = load_model(checkpoint)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(checkpoint)
    after = weights_identity(checkpoint)["weights_sha256"]
    assert before != after
    with pytest.raises(EvalError) as refused:
        evaluate(config(checkpoint, data_file, out=str(out)))
    assert str(refused.value) == (
        f"{out} holds outputs of other weights: {checkpoint.resolve()} held weights sha256 {before} when they were "
        f"made and holds {after} now (trained again?); pass another --out, or delete {out / OUTPUTS} and "
        f"{out / SUMMARY} to score these weights")
    assert (out / OUTPUTS).read_text() == "".join(lines[:answered])  # nothing of the old run was touched


def test_a_corrupt_line_inside_the_outputs_is_named(tmp_path):
    (tmp_path / OUTPUTS).write_text('{"uid": "a"}\nnot json\n{"uid": "b"}\n')
    with pytest.raises(EvalError, match=r"outputs.jsonl line 2: not valid JSON; delete that line"):
        read_outputs(tmp_path / OUTPUTS)


def test_checkpoint_without_weights_or_tokenizer_is_refused(checkpoint, data_file, tmp_path):
    with pytest.raises(EvalError, match="checkpoint: model 'nowhere/at/all': no such folder"):
        evaluate(config("nowhere/at/all", data_file))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).unlink()
    with pytest.raises(EvalError, match=r"has no tokenizer \(tokenizer.json or tokenizer_config.json\): save the tokenizer"):
        evaluate(config(checkpoint, data_file))
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(EvalError, match=r"has no \*.safetensors weights"):
        evaluate(config(checkpoint, data_file))


def test_data_without_gold_answers_is_refused(checkpoint, tmp_path):
    path = tmp_path / "no_gold.jsonl"
    path.write_text(json.dumps({"question": "What is 2+2?", "answer": "It is four."}) + "\n")
    with pytest.raises(EvalError, match=r"no question with a gold answer \(1 records, excluded: \{\"no '####' answer marker\": 1\}\)"):
        evaluate(EvalConfig(checkpoint=str(checkpoint), data=DataConfig("gsm8k", "test", path=str(path))))


# ---- training questions are never scored ----


SVAMP_ROWS = [{"ID": f"chal-{i}", "Body": f"Ann has {i} apples and buys {i + 2} more.", "Question": "How many now?",
               "Equation": f"( {i}.0 + {i + 2}.0 )", "Answer": float(2 * i + 2), "Type": "Addition"} for i in range(40)]


@pytest.fixture
def svamp_folder(tmp_path):
    """A data folder laid out as ../shared/data with a 40-problem SVAMP (carved 70/30 by seed)."""
    (tmp_path / "data" / "svamp").mkdir(parents=True)
    (tmp_path / "data" / "svamp" / "SVAMP.json").write_text(json.dumps(SVAMP_ROWS))
    return tmp_path / "data"


def trained_on(checkpoint, data: dict, init: str | None = None, stage_key: str = "key-1"):
    """Give `checkpoint` the sftkey.json the trainer writes, saying it trained on `data`."""
    meta = {"arm": "sft_tag", "seed": 0, "stage": "stage1", "step": 10, "stage_key": stage_key, "init": init,
            "config": {"arms": {"sft_tag": {"format": "tagged"}}, "data": data}}
    (checkpoint / "sftkey.json").write_text(json.dumps(meta))
    return checkpoint


def svamp_eval(checkpoint, folder, seed=0, **kw) -> EvalConfig:
    return EvalConfig(checkpoint=str(checkpoint), data=DataConfig("svamp", "test", path=str(folder), seed=seed),
                      generation=GenerationConfig(max_new_tokens=2, batch_size=8, progress=False), **kw)


def test_questions_the_checkpoint_trained_on_are_refused(checkpoint, svamp_folder, tmp_path):
    from sftkey.data import load_records

    train = DataConfig("svamp", "train", path=str(svamp_folder), seed=1)
    trained_on(checkpoint, vars(train))
    train_uids = {r.uid for r in load_records(train)[0]}
    test_uids = {r.uid for r in load_records(DataConfig("svamp", "test", path=str(svamp_folder)))[0]}
    shared = len(train_uids & test_uids)
    assert shared > 0  # the carve with seed 0 puts some of seed 1's training half into its test half
    message = (rf"trained on {shared} of the {len(test_uids)} questions of svamp test \(carve seed 0, test fraction "
               r"0.3; .*\) \(its training data: svamp train \(carve seed 1, test fraction 0.3; .*\)\)\. Score "
               r"held-out questions \(--split test --seed 1: the held-out half of the training carve\), or pass "
               r"--exclude-training-questions")
    with pytest.raises(EvalError, match=message):
        evaluate(svamp_eval(checkpoint, svamp_folder, out=str(tmp_path / "refused")))
    assert not (tmp_path / "refused").exists()  # refused before anything is written

    dropped = evaluate(svamp_eval(checkpoint, svamp_folder, out=str(tmp_path / "dropped"),
                                  exclude_training_questions=True))
    rows = read_outputs(tmp_path / "dropped" / OUTPUTS)
    assert {r["uid"] for r in rows} == test_uids - train_uids
    assert (dropped["training_questions_excluded"], dropped["n_questions"]) == (shared, len(test_uids) - shared)
    assert dropped["training_data"] == [f"svamp train (carve seed 1, test fraction 0.3; {svamp_folder})"]

    held_out = evaluate(svamp_eval(checkpoint, svamp_folder, seed=1, out=str(tmp_path / "held-out")))
    held_out_uids = {r["uid"] for r in read_outputs(tmp_path / "held-out" / OUTPUTS)}
    assert held_out_uids and not held_out_uids & train_uids and held_out["training_questions_excluded"] == 0


def test_training_data_of_earlier_stages_counts_too(checkpoint, svamp_folder, tmp_path):
    # stage 2 trained on GSM8K, starting from a stage 1 that trained on all of SVAMP: SVAMP questions are refused.
    stage1 = trained_on(shutil.copytree(checkpoint, tmp_path / "stage1"), vars(DataConfig("svamp", "all", path=str(svamp_folder))))
    trained_on(checkpoint, vars(DataConfig("gsm8k", "train")), init=str(stage1), stage_key="key-2")
    info = read_checkpoint_info(checkpoint)
    assert info.stage_keys == ("key-2", "key-1")
    assert [d.dataset for d in info.training_data] == ["gsm8k", "svamp"]
    with pytest.raises(EvalError, match=r"trained on \d+ of the \d+ questions of svamp test"):
        evaluate(svamp_eval(checkpoint, svamp_folder, seed=1))


def test_unreadable_training_data_is_an_error_not_a_pass(checkpoint, svamp_folder):
    trained_on(checkpoint, vars(DataConfig("svamp", "train", path=str(svamp_folder / "gone"), seed=1)))
    with pytest.raises(EvalError, match=r"cannot check which questions it trained on .*Make that training data readable"):
        evaluate(svamp_eval(checkpoint, svamp_folder))


def test_eval_command_refuses_and_excludes_training_questions(checkpoint, svamp_folder, tmp_path, capsys):
    trained_on(checkpoint, vars(DataConfig("svamp", "train", path=str(svamp_folder), seed=1)))
    argv = ["eval", "--checkpoint", str(checkpoint), "--dataset", "svamp", "--data-path", str(svamp_folder),
            "--max-new-tokens", "2", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "or pass --exclude-training-questions to drop them" in capsys.readouterr().err
    assert main([*argv, "--exclude-training-questions"]) == 0
    assert "questions left out: the checkpoint trained on them" in capsys.readouterr().out


def test_the_cap_defaults_to_the_data_sets(checkpoint, data_file, tmp_path, monkeypatch):
    import dataclasses

    from sftkey.data.registry import DATASETS

    # A small cap in the registry entry keeps the random model's generation short (the real caps: test_registry).
    monkeypatch.setitem(DATASETS, "gsm8k", dataclasses.replace(DATASETS["gsm8k"], max_new_tokens=3))
    summary = evaluate(EvalConfig(checkpoint=str(checkpoint), data=DataConfig("gsm8k", "test", path=str(data_file), limit=1),
                                  generation=GenerationConfig(batch_size=1, progress=False), out=str(tmp_path / "o")))
    assert summary["max_new_tokens"] == 3
    assert [r["n_tokens"] for r in read_outputs(tmp_path / "o" / OUTPUTS)] == [3]


def test_plain_arm_has_no_format_or_composite(checkpoint, data_file, capsys, tmp_path):
    summary = evaluate(config(checkpoint, data_file, tagged=False, out=str(tmp_path / "plain")))
    assert (summary["metrics"]["format_accuracy"], summary["metrics"]["composite"]) == (None, None)
    from sftkey.commands.eval import summary_lines

    assert "format n/a  composite n/a" in summary_lines(summary)[1]


def test_checkpoint_info_defaults_and_the_trainers_file(tmp_path):
    assert read_checkpoint_info(tmp_path).arm == tmp_path.name
    trainer_meta = {"arm": "SFT", "seed": 2, "stage": "sft", "step": 40, "config": {"arms": {"SFT": {"format": "plain"}}}}
    (tmp_path / "sftkey.json").write_text(json.dumps(trainer_meta))
    info = read_checkpoint_info(tmp_path)
    assert (info.arm, info.seed, info.tagged, info.stage, info.step) == ("SFT", 2, False, "sft", 40)
    (tmp_path / "sftkey.json").write_text("{oops")
    with pytest.raises(EvalError, match="sftkey.json: not valid JSON"):
        read_checkpoint_info(tmp_path)


def generation(uid: str, output: str, reason: str = "eos") -> Generation:
    return Generation(uid, "prompt", output, 10, reason)


def test_scores_and_metrics_of_fixed_outputs():
    rows = [
        score_row(generation("a", "<Thinking> 3 + 4 = 7 </Thinking> <Answer> 7 </Answer>"), "7", "gsm8k", True),
        score_row(generation("b", "<Thinking> 12 * 3 </Thinking> <Answer> 35 </Answer>"), "36", "gsm8k", True),
        score_row(generation("c", "12 * 3 = 36", "length"), "36", "gsm8k", True),
        score_row(generation("d", ""), "36", "gsm8k", True),
        score_row(generation("e", "答案是三十六"), "36", "gsm8k", True),  # another language, no digits
    ]
    assert [(r["strict_correct"], r["lenient_correct"], r["format_ok"]) for r in rows] == [
        (True, True, True), (False, False, True), (False, True, False), (False, False, False), (False, False, False)]
    assert [r["reason"] for r in rows] == ["", "numbers differ"] + ["no single closed Answer block"] * 3
    assert metrics(rows) == {"strict_accuracy": 0.2, "lenient_accuracy": 0.4, "format_accuracy": 0.4,
                             "composite": 0.7 * 0.2 + 0.3 * 0.4, "mean_reasoning_chars": (9 + 6 + 11 + 0 + 6) / 5,
                             "length_cap_share": 0.2, "n": 5}
    plain = score_row(generation("f", "12 * 3 = 36\n#### 36"), "36", "gsm8k", tagged=False)
    assert (plain["strict_correct"], plain["format_ok"], plain["pred_strict"]) == (True, False, "36")
    assert outcomes_from_rows(rows) == ({"a": True, "b": False, "c": False, "d": False, "e": False},
                                        {"a": True, "b": True, "c": False, "d": False, "e": False})
    assert outcomes_from_rows([plain]) == ({"f": True}, None)  # a plain arm has no format outcomes
    assert outcomes_from_rows([]) == ({}, None)


def test_outcomes_refuse_rows_that_cannot_say_whether_format_counts():
    tagged = score_row(generation("a", "<Answer> 7 </Answer>"), "7", "gsm8k", True)
    plain = score_row(generation("b", "#### 7"), "7", "gsm8k", False)
    with pytest.raises(EvalError, match="row of uid 'b': 'tagged' is False, expected true or false, the same in every "
                                        "row; delete outputs.jsonl and summary.json and evaluate again"):
        outcomes_from_rows([tagged, plain])
    older = {k: v for k, v in tagged.items() if k != "tagged"}  # a row written before the field existed
    with pytest.raises(EvalError, match="row of uid 'a': 'tagged' is None"):
        outcomes_from_rows([older])


def test_a_scorer_failure_is_recorded_as_wrong_not_raised(monkeypatch):
    def broken(*args, **kwargs):
        raise RecursionError("deep")

    monkeypatch.setattr("sftkey.score.score_output", broken)  # fault injection: the real scorer never raises
    row = score_row(generation("a", "<Answer> 7 </Answer>"), "7", "gsm8k", True)
    assert (row["strict_correct"], row["output"], row["reason"]) == (False, "<Answer> 7 </Answer>", "scoring error: RecursionError: deep")


# ---- the commands ----


def test_eval_command_prints_the_figures(checkpoint, data_file, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["eval", "--checkpoint", str(checkpoint), "--data-path", str(data_file), "--max-new-tokens", "3",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        "run-a (seed 0) on gsm8k-test: 3 of 3 questions scored, 0 records excluded",
        "strict 0.000  lenient 0.000  format 0.000  composite 0.000  reasoning 0 chars  length cap 1.000 (cap 3 tokens)",
        "warning: 100% of the answers hit the cap of 3 new tokens (more than 5%): their accuracy is a floor; raise "
        "the cap (sftkey eval --max-new-tokens, pipeline benchmark.max_new_tokens)",
        f"wrote {out}",
    ]
    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), "--data-path", str(data_file)]) == 2
    assert "sftkey eval: error: checkpoint: model" in capsys.readouterr().err


def test_help_says_what_each_command_does(capsys):
    for command, words in (("eval", "generate answers with a checkpoint and score them"),
                           ("compare", "compare arms x seeds: intervals, paired tests, verdicts, plots")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert words in capsys.readouterr().out


def fake_run(folder, arm, seed, correct, dataset="gsm8k", complete=True):
    """An eval output folder as `sftkey eval` writes it, with chosen correctness per question."""
    folder.mkdir(parents=True)
    rows = [score_row(generation(f"q{i}", f"<Thinking> x </Thinking> <Answer> {1 if ok else 2} </Answer>"), "1", dataset, True)
            for i, ok in enumerate(correct)]
    (folder / OUTPUTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"arm": arm, "seed": seed, "dataset": dataset, "split": "test", "data_version": "v1"}
    write_summary(folder, settings, rows, len(rows) + (0 if complete else 1), 0.0)
    return folder


def test_compare_command_groups_runs_by_arm_and_seed(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs / "base-0", "base", 0, [True, False, False, False])
    fake_run(runs / "base-1", "base", 1, [True, True, False, False])
    fake_run(runs / "key-0", "key", 0, [True, True, True, False])
    fake_run(runs / "key-1", "key", 1, [True, True, True, True])
    out = tmp_path / "report"
    assert main(["compare", str(runs), "--baseline", "base", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| base | 0.375 |" in printed and "| key | 0.875 |" in printed
    assert "- key vs base: +50.0 points" in printed
    assert "2 seeds: seed variance cannot be estimated (fewer than 3), so this verdict is about these trained " \
           "models only" in printed
    from sftkey.compare import REPORT_JSON

    report = json.loads((out / REPORT_JSON).read_text())
    assert [(a["arm"], a["seeds"], a["accuracy"], a["format_accuracy"]) for a in report["arms"]] == [
        ("base", [0, 1], 0.375, 1.0), ("key", [0, 1], 0.875, 1.0)]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_runs_it_cannot_pair(tmp_path, capsys):
    fake_run(tmp_path / "a", "base", 0, [True])
    fake_run(tmp_path / "b", "base", 0, [False])
    fake_run(tmp_path / "c", "key", 0, [True], dataset="svamp")
    fake_run(tmp_path / "d", "key", 1, [True], complete=False)
    cases = [
        (["a", "b"], "are both arm 'base' seed 0; pass only one of them"),
        (["a", "c"], "the runs scored different test sets or generated under different settings"),
        (["d"], "unfinished evaluation (1 of 2 questions); rerun its `sftkey eval` command"),
        (["a", "--baseline", "nope"], "--baseline 'nope' is not among the arms ['base']"),
        (["empty"], "no summary.json in it or below it"),
    ]
    (tmp_path / "empty").mkdir()
    for args, message in cases:
        paths = [str(tmp_path / a) if not a.startswith("-") and a != "nope" else a for a in args]
        assert main(["compare", *paths, "--out", str(tmp_path / "report")]) == 2
        assert message in capsys.readouterr().err
