"""The regression run: the pipeline on a fixed small config, its metrics held against a baseline.

Baselines: a committed JSON file (every arm) and, when the registry has one, the champion's metrics (the
candidate arm). A metric below its baseline minus its tolerance fails the run.

Baseline file:
    {"config": "configs/regress_cpu.yaml",
     "tolerance": {"format_accuracy": 0.1, ...},           # absolute; a missing metric gets DEFAULT_TOLERANCE
     "metrics": {"sft_tag": {"format_accuracy": 0.75, ...}, ...}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from orchestration.config import PipelineConfig
from orchestration.pipeline import PipelineResult
from sftkey.errors import UserError

REGRESSION_METRICS = ("strict_accuracy", "format_accuracy", "composite")  # higher is better, all three
DEFAULT_TOLERANCE = 0.0


class BaselineError(UserError, ValueError):
    """A baseline file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class MetricCheck:
    source: str  # "file" or "champion vN"
    arm: str
    metric: str
    baseline: float
    measured: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.measured >= self.baseline - self.tolerance


def measured_metrics(result: PipelineResult) -> dict[str, dict[str, float]]:
    """Per arm, each regression metric averaged over the arm's seeds."""
    by_arm: dict[str, list[dict]] = {}
    for record in result.comparison["records"].values():
        by_arm.setdefault(record["arm"], []).append(record["metrics"])
    return {arm: {m: mean(float(r[m]) for r in runs) for m in REGRESSION_METRICS} for arm, runs in by_arm.items()}


def read_baseline(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BaselineError(f"{path}: no baseline file; create it from a good run with "
                            f"`sftkey regress --config CONFIG --write-baseline {path}`")
    try:
        baseline = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BaselineError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(baseline.get("metrics"), dict):
        raise BaselineError(f"{path}: no `metrics` mapping (arm -> metric -> value)")
    return baseline


def write_baseline(path: Path, config: PipelineConfig, measured: dict, tolerance: dict[str, float]) -> Path:
    from sftkey.atomic import write_text

    payload = {"config": str(config.path or ""), "tolerance": tolerance,
               "metrics": {arm: {m: round(v, 6) for m, v in metrics.items()} for arm, metrics in measured.items()}}
    return write_text(Path(path), json.dumps(payload, indent=2) + "\n")


def champion_metrics(client, model_name: str) -> tuple[str, dict[str, dict[str, float]]] | None:
    """("champion vN", {arm: metrics}) from the champion version's `metric.*` tags; None without a champion."""
    from orchestration.registry import CHAMPION, version_by_alias

    champion = version_by_alias(client, model_name, CHAMPION)
    if champion is None:
        return None
    metrics = {name.removeprefix("metric."): float(value) for name, value in champion.tags.items()
               if name.removeprefix("metric.") in REGRESSION_METRICS}
    return f"champion v{champion.version}", {champion.tags.get("sftkey.arm", "?"): metrics}


def checks_against(source: str, baseline: dict[str, dict[str, float]], measured: dict[str, dict[str, float]],
                   tolerance: dict[str, float]) -> list[MetricCheck]:
    checks = []
    for arm, metrics in baseline.items():
        if arm not in measured:
            raise BaselineError(f"baseline ({source}) has arm {arm!r}, which this run does not train "
                                f"({', '.join(measured)}): regenerate the baseline with --write-baseline")
        for metric, value in metrics.items():
            if metric not in measured[arm]:
                raise BaselineError(f"baseline ({source}) metric {metric!r} is not one of {REGRESSION_METRICS}")
            checks.append(MetricCheck(source, arm, metric, float(value), measured[arm][metric],
                                      float(tolerance.get(metric, DEFAULT_TOLERANCE))))
    return checks


def report_lines(checks: list[MetricCheck]) -> list[str]:
    failed = [c for c in checks if not c.passed]
    lines = ["| baseline | arm | metric | baseline value | measured | tolerance | result |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {c.source} | {c.arm} | {c.metric} | {c.baseline:.4f} | {c.measured:.4f} | {c.tolerance:.4f} | "
              f"{'ok' if c.passed else 'REGRESSION'} |" for c in checks]
    if failed:
        lines.append(f"\nFAILED: {len(failed)} of {len(checks)} metrics fell below their baseline: "
                     + "; ".join(f"{c.arm} {c.metric} {c.measured:.4f} < {c.baseline:.4f} - {c.tolerance:.4f}"
                                 f" ({c.source})" for c in failed))
    else:
        lines.append(f"\nPASSED: all {len(checks)} metrics at or above their baseline.")
    return lines
