"""On the default model (SmolLM2-135M-Instruct) and 50 real GSM8K test questions, `sftkey eval` and the lm-eval
task agree on every example. About 6 minutes on 2 CPU cores, so opt-in: `pytest -m slow tests/evals`."""

from __future__ import annotations

import pytest

from evals.run import BenchConfig, flat_metrics, run, strict_correct
from sftkey.data import DataConfig
from sftkey.evaluate import OUTPUTS, EvalConfig, evaluate, read_outputs
from sftkey.generate import GenerationConfig

LIMIT = 50
BATCH = 25
CAP = 256  # below GSM8K's default 512: agreement needs the same cap on both sides, not a long one (time halves)


@pytest.mark.slow
def test_default_model_figures_match_lm_eval_on_50_gsm8k_questions(shared_data, tmp_path):
    from sftkey.models import default_model_dir, is_provisioned

    if not is_provisioned(default_model_dir()):
        pytest.skip(f"default model not cached at {default_model_dir()}; `sftkey prepare --model default` builds it")
    out = tmp_path / "eval"
    summary = evaluate(EvalConfig(
        checkpoint="default", data=DataConfig("gsm8k", "test", limit=LIMIT),
        generation=GenerationConfig(max_new_tokens=CAP, batch_size=BATCH, progress=False), out=str(out), device="cpu",
    ))
    rows = {row["uid"]: row for row in read_outputs(out / OUTPUTS)}
    results = run(BenchConfig(checkpoint="default", tasks=["gsm8k_tagged"], limit=LIMIT, batch_size=BATCH,
                              max_new_tokens=CAP, device="cpu", log_samples=True))
    assert strict_correct(results, "gsm8k_tagged") == {uid: row["strict_correct"] for uid, row in rows.items()}
    assert flat_metrics(results)["gsm8k_tagged/exact_match_strict-match"] == summary["metrics"]["strict_accuracy"]
