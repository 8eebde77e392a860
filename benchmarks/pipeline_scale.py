"""Scale-out of `sftkey pipeline`: wall time of the whole comparison with 1, 2 and 4 arm x seed cells running at
once (`compute.concurrency`), and the share of time the devices were busy.

Each concurrency runs `sftkey pipeline --config <cfg> --work-dir <fresh dir> --set compute.concurrency=N` as a
subprocess, evaluation and registry included, in a fresh work dir (nothing reused between runs). Busy share: on
CUDA, `nvidia-smi` sampled every 500 ms in the background (utilization.gpu: the share of each interval a kernel
ran), averaged over samples and GPUs; on CPU, the CPU seconds of the pipeline's process tree over wall x cores.

The default config, configs/gsm8k_smollm2_gpu.yaml, is an `sftkey train` config (7 arms x 3 seeds on the GSM8K
train split, whose path the data registry resolves); it is wrapped into a pipeline config that benchmarks on
GSM8K's test split. A pipeline config (with `training:`) is used as it is. Each of the 21 models answers
benchmark.limit test questions (50 by default; `--set benchmark.limit=1319` answers them all). On one H200:

    python benchmarks/pipeline_scale.py --config configs/gsm8k_smollm2_gpu.yaml --concurrency 1 2 4 \\
        --work-root /tmp/pipeline_scale --out benchmarks/pipeline_scale_h200.json

The first run also pays, once, for resolving the base model (a hub download, or converting the GGUF fallback):
run any short `sftkey train` of the config first to leave that out. Shrunk for a 2-core CPU (tiny model, two
arms, one seed, a few questions):

    python benchmarks/pipeline_scale.py --concurrency 1 2 --arms sft_tag sftkey_tag --seeds 0 \\
        --set training.model=tiny --set training.model_fallback=null --set training.data.limit=16 \\
        --set training.train.batch_size=8 --set benchmark.limit=8 --set benchmark.max_new_tokens=16 \\
        --set compute.device=cpu

`--dry-run` prints the commands (and where the config goes) without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "gsm8k_smollm2_gpu.yaml"
GPU_QUERY = ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"]
DONE_WITH_VERDICT = ("sftkey pipeline: promotion refused", "sftkey pipeline: checks failed")  # exit 1, yet complete


@dataclass
class Measurement:
    concurrency: int
    wall_s: float
    busy_share: float | None  # of the devices: the GPUs' mean utilization where sampled, else cpu_share
    cpu_share: float  # CPU seconds of the process tree / (wall x cores), on every machine
    gpu_shares: dict[int, float]  # per GPU index; {} on CPU
    returncode: int
    completed: bool  # the pipeline ran to its end (exit 0, or 1 with a promotion/check verdict)
    log: str


# --------------------------------------------------------------------------- pure helpers (tested)


def pipeline_config(raw: dict, arms: list[str] | None, seeds: list[int] | None) -> dict:
    """The pipeline config to run: a pipeline config as it is, or an `sftkey train` config wrapped with a benchmark
    on the held-out split of its data set; narrowed to `arms` and `seeds` when given."""
    out = json.loads(json.dumps(raw))
    if "training" not in out:
        dataset = (out.get("data") or {}).get("dataset", "gsm8k")
        out = {"name": "pipeline_scale", "training": out, "benchmark": {"dataset": dataset, "split": "test"}}
    training = out["training"]
    if arms:
        unknown = [a for a in arms if a not in training["arms"]]
        if unknown:
            raise SystemExit(f"--arms: {', '.join(unknown)} not in the config's arms ({', '.join(training['arms'])})")
        training["arms"] = {a: training["arms"][a] for a in arms}
    if seeds:
        training["seeds"] = list(seeds)
    return out


def pipeline_command(config: Path, work_dir: Path, concurrency: int, sets: list[str]) -> list[str]:
    extra = [arg for value in sets for arg in ("--set", value)]
    return [sys.executable, "-m", "sftkey.cli", "pipeline", "--config", str(config), "--work-dir", str(work_dir),
            "--set", f"compute.concurrency={concurrency}", *extra]


def parse_gpu_samples(lines: list[str]) -> dict[int, list[float]]:
    """`nvidia-smi --query-gpu=index,utilization.gpu --format=csv,noheader,nounits` lines -> percent samples per GPU;
    lines that are not two numbers (a "[N/A]", a cut last line) are skipped."""
    samples: dict[int, list[float]] = {}
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            continue
        try:
            index, percent = int(parts[0]), float(parts[1])
        except ValueError:
            continue
        samples.setdefault(index, []).append(percent)
    return samples


def gpu_shares(samples: dict[int, list[float]]) -> dict[int, float]:
    return {index: sum(values) / len(values) / 100.0 for index, values in sorted(samples.items()) if values}


def busy_share(samples: dict[int, list[float]]) -> float | None:
    """The mean busy share over GPUs (each GPU's mean utilization); None without samples."""
    shares = gpu_shares(samples)
    return sum(shares.values()) / len(shares) if shares else None


def cpu_share(cpu_seconds: float, wall_s: float, cores: int) -> float:
    return cpu_seconds / (wall_s * cores) if wall_s > 0 and cores > 0 else 0.0


def completed(returncode: int, output_tail: str) -> bool:
    return returncode == 0 or (returncode == 1 and any(v in output_tail for v in DONE_WITH_VERDICT))


def table(rows: list[Measurement]) -> str:
    """One line per concurrency: wall seconds, speedup over concurrency 1 (when it was measured), busy share."""
    base = next((r.wall_s for r in rows if r.concurrency == 1 and r.completed), None)
    lines = [f"{'N':>3}  {'wall s':>9}  {'speedup':>7}  {'busy':>5}  {'cpu':>5}  status",
             f"{'-' * 3}  {'-' * 9}  {'-' * 7}  {'-' * 5}  {'-' * 5}  {'-' * 6}"]
    for r in rows:
        speedup = f"{base / r.wall_s:.2f}x" if base and r.completed else "-"
        busy = f"{r.busy_share:.0%}" if r.busy_share is not None else "-"
        status = "ok" if r.completed else f"failed (exit {r.returncode})"
        lines.append(f"{r.concurrency:>3}  {r.wall_s:>9.1f}  {speedup:>7}  {busy:>5}  {r.cpu_share:>5.0%}  {status}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- measuring


class GpuSampler:
    """`nvidia-smi -lms 500` in the background while the pipeline runs; no-op where there is no nvidia-smi."""

    def __init__(self):
        self.lines: list[str] = []
        self.proc = None
        self.thread = None

    def __enter__(self) -> GpuSampler:
        if shutil.which(GPU_QUERY[0]):
            self.proc = subprocess.Popen(GPU_QUERY, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.thread.join(timeout=10)


def devices() -> str:
    """What the busy share is of, in words."""
    if shutil.which("nvidia-smi"):
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True).stdout.split("\n")
        names = [n.strip() for n in names if n.strip()]
        if names:
            return f"{len(names)} x {names[0]}"
    return f"CPU: {cores()} cores ({platform.processor() or platform.machine()})"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant of this process
    return usage.ru_utime + usage.ru_stime


def measure(command: list[str], folder: Path, concurrency: int, timeout_s: float | None) -> Measurement:
    log = folder / "pipeline.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cpu_before, began = children_cpu_seconds(), time.perf_counter()
    with GpuSampler() as sampler, open(log, "w") as out:
        try:
            returncode = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            returncode = 124
    wall = time.perf_counter() - began
    samples = parse_gpu_samples(sampler.lines)
    cpu = cpu_share(children_cpu_seconds() - cpu_before, wall, cores())
    tail = log.read_text(errors="replace")[-4000:]
    return Measurement(concurrency, round(wall, 1), busy_share(samples) if samples else cpu, cpu,
                       gpu_shares(samples), returncode, completed(returncode, tail), str(log))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="pipeline or `sftkey train` YAML (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4], help="cells at once, one run each")
    parser.add_argument("--arms", nargs="+", default=None, help="only these arms (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds (default: all)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every `sftkey pipeline` run, e.g. --set training.data.limit=16")
    parser.add_argument("--work-root", default=None,
                        help="one fresh work dir per run under it (default: a new /tmp folder)")
    parser.add_argument("--out", default=None, help="JSON of the results (default: <work-root>/pipeline_scale.json)")
    parser.add_argument("--timeout-s", type=float, default=None, help="stop a run after this long (counted as failed)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)

    root = Path(args.work_root or f"/tmp/pipeline_scale-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    config = pipeline_config(yaml.safe_load(Path(args.config).read_text()), args.arms, args.seeds)
    config_file = root / "pipeline.yaml"
    runs = [(n, root / f"concurrency{n}") for n in args.concurrency]
    commands = [(n, folder, pipeline_command(config_file, folder / "work", n, args.sets)) for n, folder in runs]
    if args.dry_run:
        print(f"# config {args.config} -> {config_file}")
        for _n, _folder, command in commands:
            print(" ".join(command))
        return 0
    busy = [folder for _n, folder in runs if folder.exists() and any(folder.iterdir())]
    if busy:
        raise SystemExit(f"{busy[0]} is not empty: give a fresh --work-root (every run starts from an empty store)")
    root.mkdir(parents=True, exist_ok=True)
    config_file.write_text(f"# written by benchmarks/pipeline_scale.py from {args.config}\n"
                           + yaml.safe_dump(config, sort_keys=False))
    results = []
    for n, folder, command in commands:
        folder.mkdir(parents=True, exist_ok=True)
        print(f"concurrency {n}: {' '.join(command)}", flush=True)
        results.append(measure(command, folder, n, args.timeout_s))
        print(f"concurrency {n}: {results[-1].wall_s:.1f} s, exit {results[-1].returncode}", flush=True)
    report = table(results)
    cells = len(config["training"]["arms"]) * len(config["training"].get("seeds", [0]))
    header = f"{args.config}: {cells} arm x seed cells on {devices()}"
    print(header + "\n" + report)
    out = Path(args.out or root / "pipeline_scale.json")
    out.write_text(json.dumps({"config": args.config, "cells": cells, "devices": devices(), "sets": args.sets,
                               "arms": list(config["training"]["arms"]), "seeds": config["training"].get("seeds"),
                               "runs": [asdict(r) for r in results], "table": report}, indent=2) + "\n")
    print(f"results: {out}")
    return 0 if all(r.completed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
