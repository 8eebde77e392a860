"""The regression run: the pipeline on a fixed small config, its metrics held against a baseline.

Baselines: a committed JSON file (every arm) and, when the registry has one, the champion's metrics (the
candidate arm). A metric below its baseline minus its tolerance fails the run.

Baseline file:
    {"config": "configs/regress_cpu.yaml",
     "tolerance": {"format_accuracy": 0.1, ...},           # absolute; a missing metric gets DEFAULT_TOLERANCE
     "metrics": {"sft_tag": {"format_accuracy": 0.75, ...}, ...}}

A baseline that cannot fail is refused, read or written: no arms, an arm with no metrics, a value or tolerance
that is not a finite number >= 0, or a tolerance >= its baseline value (measured >= 0 always passes it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from orchestration.config import PipelineConfig
from orchestration.pipeline import PipelineResult
from sftkey.errors import UserError

REGRESSION_METRICS = ("strict_accuracy", "format_accuracy", "composite")  # higher is better, all three, in [0, 1]
DEFAULT_TOLERANCE = 0.0
REWRITE_FIX = "record it again from a good run with `sftkey regress --config CONFIG --write-baseline FILE`"
CHAMPION_FIX = "check the champion's model metrics in MLflow, or compare with the baseline file only (--no-champion)"


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
    """The baseline file, refused (BaselineError naming the file, arm and metric) when it cannot fail."""
    baseline = _read_json(Path(path))
    tolerance = checked_tolerance(str(path), baseline.get("tolerance"), REWRITE_FIX)
    checked_metrics(str(path), baseline.get("metrics"), tolerance, REWRITE_FIX)
    return baseline


def read_tolerance(path: Path) -> dict[str, float]:
    """The tolerances of an existing baseline file, kept when --write-baseline records new values over it."""
    return checked_tolerance(str(path), _read_json(Path(path)).get("tolerance"), "fix or remove the tolerance")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise BaselineError(f"{path}: no baseline file; create it from a good run with "
                            f"`sftkey regress --config CONFIG --write-baseline {path}`")
    try:
        baseline = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise BaselineError(f"{path}: not UTF-8 text (byte {e.start}); {REWRITE_FIX}") from None
    except json.JSONDecodeError as e:
        raise BaselineError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(baseline, dict):
        raise BaselineError(f"{path}: a JSON object with `tolerance` and `metrics` expected, got "
                            f"{type(baseline).__name__}; {REWRITE_FIX}")
    return baseline


def _number(where: str, what: str, value, fix: str) -> float:
    """A finite number >= 0 (JSON true/false are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BaselineError(f"{where}: {what} is {json.dumps(value)}, not a finite number >= 0; {fix}")
    return float(value)


def checked_tolerance(where: str, tolerance, fix: str) -> dict[str, float]:
    """metric -> absolute tolerance; refuses unknown metrics and values that are not finite numbers >= 0."""
    if tolerance is None:
        return {}
    if not isinstance(tolerance, dict):
        raise BaselineError(f"{where}: `tolerance` must map metric -> number, got {json.dumps(tolerance)}; {fix}")
    for metric in tolerance:
        if metric not in REGRESSION_METRICS:
            raise BaselineError(f"{where}: tolerance of {metric!r}, which is not one of "
                                f"{', '.join(REGRESSION_METRICS)}; remove it or name a regression metric")
    return {metric: _number(where, f"tolerance {metric!r}", value, fix) for metric, value in tolerance.items()}


def checked_metrics(where: str, metrics, tolerance: dict[str, float], fix: str) -> dict[str, dict[str, float]]:
    """arm -> metric -> value, refused when it cannot fail: no arms, an arm with no metrics, a value that is not a
    finite number in [0, 1], or a value at or below its tolerance (measured >= 0 >= value - tolerance always)."""
    if not isinstance(metrics, dict) or not metrics:
        raise BaselineError(f"{where}: no arms under `metrics`, so nothing would be checked; {fix}")
    checked: dict[str, dict[str, float]] = {}
    for arm, values in metrics.items():
        if not isinstance(values, dict) or not values:
            raise BaselineError(f"{where}: arm {arm!r} has no metrics, so nothing of it would be checked; {fix}")
        checked[arm] = {}
        for metric, raw in values.items():
            if metric not in REGRESSION_METRICS:
                raise BaselineError(f"{where}: arm {arm!r} metric {metric!r} is not one of "
                                    f"{', '.join(REGRESSION_METRICS)}; {fix}")
            value = _number(where, f"arm {arm!r} metric {metric!r}", raw, fix)
            if value > 1:
                raise BaselineError(f"{where}: arm {arm!r} metric {metric!r} is {value:g}, above 1 (a share); {fix}")
            allowed = tolerance.get(metric, DEFAULT_TOLERANCE)
            if allowed >= value:
                raise BaselineError(
                    f"{where}: arm {arm!r} metric {metric!r} has tolerance {allowed:g} >= its baseline {value:g}, so "
                    f"it can never regress; set its tolerance below {value:g}, or record the baseline from a run "
                    f"that scores clearly above {allowed:g}")
            checked[arm][metric] = value
    return checked


def write_baseline(path: Path, config: PipelineConfig, measured: dict, tolerance: dict[str, float]) -> Path:
    """Record `measured` as the baseline at `path`, refused (nothing written) when that baseline could not fail."""
    from sftkey.atomic import write_text

    metrics = {arm: {m: round(v, 6) for m, v in values.items()} for arm, values in measured.items()}
    checked_metrics(f"{path} (not written)", metrics, tolerance,
                    "train a run that scores above the tolerances, or lower them in the baseline file")
    payload = {"config": str(config.path or ""), "tolerance": tolerance, "metrics": metrics}
    return write_text(Path(path), json.dumps(payload, indent=2) + "\n")


def champion_metrics(client, model_name: str) -> tuple[str, dict[str, dict[str, float]]] | None:
    """("champion vN", {arm: metrics}) from the metrics of the champion version's logged model; None without a
    champion."""
    from orchestration.registry import CHAMPION, version_by_alias, version_metrics

    champion = version_by_alias(client, model_name, CHAMPION)
    if champion is None:
        return None
    source = f"champion v{champion.version}"
    metrics = {name: value for name, value in version_metrics(client, champion).items() if name in REGRESSION_METRICS}
    if not metrics:
        raise BaselineError(f"{source} of {model_name!r} has none of the metrics {', '.join(REGRESSION_METRICS)}; "
                            f"{CHAMPION_FIX}")
    return source, {champion.tags.get("sftkey.arm", "?"): metrics}


def regressible(baseline: dict[str, dict[str, float]], tolerance: dict[str, float]) -> tuple[dict, list[str]]:
    """The champion's metrics that can regress (value above its tolerance), and a note for each one left out: a
    champion at 0 strict accuracy is no reason to refuse the run, and no check that can never fail is made."""
    kept: dict[str, dict[str, float]] = {}
    skipped = []
    for arm, metrics in baseline.items():
        if not metrics:
            skipped.append(f"{arm}: no metric tags")
        for metric, value in metrics.items():
            allowed = tolerance.get(metric, DEFAULT_TOLERANCE)
            if isinstance(value, float) and math.isfinite(value) and 0 <= value <= allowed:
                skipped.append(f"{arm} {metric} {value:.4f} <= tolerance {allowed:.4f}")
            else:
                kept.setdefault(arm, {})[metric] = value
    return kept, skipped


def require_every_arm(source: str, baseline: dict, arms: list[str]) -> None:
    """Refuse a baseline file that misses an arm the config trains: that arm would go unchecked."""
    missing = [arm for arm in arms if baseline and arm not in baseline]
    if missing:
        raise BaselineError(f"{source}: no baseline for arm {', '.join(map(repr, missing))}, which the config trains; "
                            f"{REWRITE_FIX}")


def checks_against(source: str, baseline: dict[str, dict[str, float]], measured: dict[str, dict[str, float]],
                   tolerance: dict[str, float], fix: str = REWRITE_FIX) -> list[MetricCheck]:
    """One check per baseline arm and metric; a baseline that cannot fail is refused (see checked_metrics)."""
    tolerance = checked_tolerance(source, tolerance, fix)
    baseline = checked_metrics(source, baseline, tolerance, fix)
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
