"""`sftkey eval` and the lm-eval task agree, example by example, on the same model and questions (offline)."""

from __future__ import annotations

import pytest

from evals.run import BenchConfig, flat_metrics, run, strict_answers, strict_correct
from sftkey.data import DataConfig
from sftkey.evaluate import OUTPUTS, EvalConfig, evaluate, read_outputs
from sftkey.generate import GenerationConfig

MAX_NEW_TOKENS = 30  # the `1,250` response is 30 tokens before its eos: complete, but stopped by the cap

# What the memorised model gets right (see conftest.MEMORISED): the wrong gold and the plain answer are wrong under
# the strict reading; `$32`, `1,250` and `5.0` are right by either scorer. The unseen question (UNSEEN_UID) gets
# junk whose length and stop reason depend on the CPU's float rounding (Intel and AMD differ): never pinned.
EXPECTED_STRICT = {
    "gsm8k-test-00000": False,
    "gsm8k-test-00001": True,
    "gsm8k-test-00002": True,
    "gsm8k-test-00003": True,
    "gsm8k-test-00004": False,
    "gsm8k-test-00005": True,
}
UNSEEN_UID = "gsm8k-test-00006"


@pytest.fixture(scope="module")
def sftkey_run(memorised_checkpoint, memorised_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "gsm8k-test"
    config = EvalConfig(
        checkpoint=str(memorised_checkpoint),
        data=DataConfig("gsm8k", "test", path=str(memorised_data)),
        generation=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, batch_size=4, progress=False),
        out=str(out),
    )
    summary = evaluate(config)
    return summary, {row["uid"]: row for row in read_outputs(out / OUTPUTS)}


@pytest.fixture(scope="module")
def lm_eval_run(memorised_checkpoint, memorised_data):
    config = BenchConfig(
        checkpoint=str(memorised_checkpoint), tasks=["gsm8k_tagged"], data_path=str(memorised_data),
        batch_size=4, max_new_tokens=MAX_NEW_TOKENS, device="cpu", log_samples=True,
    )
    return run(config)


def test_sftkey_eval_scores_the_memorised_answers(sftkey_run):
    from sftkey.score import score_output

    summary, rows = sftkey_run
    rows = dict(rows)  # the fixture is shared with the agreement test
    unseen = rows.pop(UNSEEN_UID)
    assert {uid: row["strict_correct"] for uid, row in rows.items()} == EXPECTED_STRICT
    assert (summary["arm"], summary["seed"], summary["n"], summary["complete"]) == ("memorised", 3, 7, True)
    # The unseen row is scored like any other, whatever junk this CPU produced; its share enters the metrics.
    assert {k: unseen[k] for k in ("strict_correct", "lenient_correct", "format_ok")} == {
        k: v for k, v in score_output(unseen["output"], "999", "gsm8k").items()
        if k in ("strict_correct", "lenient_correct", "format_ok")}
    strict, lenient, fmt = (4 + unseen["strict_correct"], 5 + unseen["lenient_correct"], 5 + unseen["format_ok"])
    assert summary["metrics"] == {
        "strict_accuracy": strict / 7,
        "lenient_accuracy": lenient / 7,  # the plain `#### 45` answer counts as its last number
        "format_accuracy": fmt / 7,
        "composite": 0.7 * strict / 7 + 0.3 * fmt / 7,
        "mean_reasoning_chars": (sum(row["reasoning_chars"] for row in rows.values()) + unseen["reasoning_chars"]) / 7,
        "length_cap_share": (1 + (unseen["stop_reason"] == "length")) / 7,  # `1,250` is cut by the cap
        "n": 7,
    }
    capped = rows["gsm8k-test-00003"]
    assert capped["output"] == "<Thinking> 1000 + 250 = 1250 </Thinking> <Answer> 1,250 </Answer>"
    assert (capped["stop_reason"], capped["n_tokens"], capped["reasoning_chars"]) == ("length", MAX_NEW_TOKENS, 17)
    plain = rows["gsm8k-test-00004"]
    assert (plain["output"], plain["stop_reason"], plain["n_tokens"]) == ("5 * 9 = 45\n#### 45", "eos", 14)
    assert (plain["format_ok"], plain["pred_strict"], plain["pred_lenient"]) == (False, None, "45")


def test_lm_eval_task_agrees_with_sftkey_on_every_example(sftkey_run, lm_eval_run):
    summary, rows = sftkey_run
    assert strict_correct(lm_eval_run, "gsm8k_tagged") == {uid: row["strict_correct"] for uid, row in rows.items()}
    assert {uid: ok for uid, ok in strict_correct(lm_eval_run, "gsm8k_tagged").items() if uid != UNSEEN_UID} == \
        EXPECTED_STRICT
    assert set(EXPECTED_STRICT.values()) == {True, False}  # verdicts that can disagree, both ways
    samples = [s for s in lm_eval_run["samples"]["gsm8k_tagged"] if s["filter"] == "strict-match"]
    assert len(samples) == 7
    for sample in samples:
        row = rows[sample["doc"]["uid"]]
        assert sample["arguments"][0][0] == row["prompt"]  # the same chat prompt
        assert sample["target"] == row["gold"]
        assert sample["resps"][0][0] == row["output"]  # the same greedy generation
    # the same answer read from each response (None: no single closed Answer block)
    assert strict_answers(lm_eval_run, "gsm8k_tagged") == {uid: row["pred_strict"] for uid, row in rows.items()}
    metrics = flat_metrics(lm_eval_run)
    assert metrics["gsm8k_tagged/exact_match_strict-match"] == summary["metrics"]["strict_accuracy"]
    flexible = {s["doc"]["uid"]: bool(s["exact_match"]) for s in lm_eval_run["samples"]["gsm8k_tagged"]
                if s["filter"] == "flexible-extract"}
    assert {uid: ok for uid, ok in flexible.items() if uid != UNSEEN_UID} == {uid: uid != "gsm8k-test-00000"
                                                                                 for uid in EXPECTED_STRICT}
    assert metrics["gsm8k_tagged/exact_match_flexible-extract"] == sum(flexible.values()) / 7
