"""`sftkey train` on a CPU: independent arm x seed runs in single-thread processes, one per core; a run that shares
another's first stage starts after it. The runner is checked with real child processes that record when they ran;
the slow test trains three tiny arms two at a time and gets the weights of one process running them in turn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import sftkey.train.parallel_runs as parallel_runs
from sftkey.train.parallel_runs import cpu_processes, first_stage_owners, run_in_processes

from test_train_crash import REPO, write_config


def test_a_run_sharing_its_first_stage_is_owned_by_the_first_such_run_of_its_seed(make_config):
    config = make_config({"seeds": [0, 1], "arms": {
        "sft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 3}]},
        "key_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "key", "steps": 3}]},
        "sftkey_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 3},
                                                     {"name": "stage2", "loss": "key", "steps": 3}]}}})
    assert first_stage_owners(config, list(config.arms), [0, 1]) == {("sftkey_tag", 0): ("sft_tag", 0),
                                                                      ("sftkey_tag", 1): ("sft_tag", 1)}
    assert first_stage_owners(config, ["sftkey_tag", "sft_tag"], [0]) == {("sft_tag", 0): ("sftkey_tag", 0)}


@pytest.mark.parametrize("cores,memory_gb,independent,processes", [
    (2, 24, 3, 2), (2, 24, 1, 1), (16, 128, 21, 16), (8, 8, 4, 1), (1, 64, 4, 1)])
def test_one_process_per_core_bounded_by_runs_and_memory(monkeypatch, cores, memory_gb, independent, processes):
    monkeypatch.setattr(parallel_runs, "cpu_cores", lambda: cores)
    monkeypatch.setattr(parallel_runs, "memory_gb", lambda: memory_gb)
    monkeypatch.delenv(parallel_runs.PROCESSES_ENV, raising=False)
    assert cpu_processes(independent) == processes


def recorder(folder, seconds: float, exit_code: dict | None = None):
    """A command that writes its start and end times to folder/<arm>-<seed>, sleeps, prints a line and exits."""
    def command(cell):
        code = (exit_code or {}).get(cell, 0)
        script = (f"import time, sys; t = time.time(); time.sleep({seconds}); "
                  f"open({str(folder / f'{cell[0]}-{cell[1]}')!r}, 'w').write(f'{{t}} {{time.time()}}'); "
                  f"print('{cell[0]} seed {cell[1]}: done'); sys.exit({code})")
        return [sys.executable, "-c", script]
    return command


def intervals(folder) -> dict[str, tuple[float, float]]:
    return {p.name: tuple(map(float, p.read_text().split())) for p in folder.iterdir() if p.is_file()}


def test_two_at_once_and_a_dependent_run_after_its_owner(tmp_path):
    cells = [("sft_tag", 0), ("key_tag", 0), ("sftkey_tag", 0)]
    said = []
    code = run_in_processes(recorder(tmp_path, 1.0), cells, {("sftkey_tag", 0): ("sft_tag", 0)}, 2,
                            lambda cell: tmp_path / "logs" / f"{cell[0]}.log", said.append)
    assert code == 0
    ran = intervals(tmp_path)
    assert sorted(ran) == ["key_tag-0", "sft_tag-0", "sftkey_tag-0"]
    assert ran["sft_tag-0"][0] < ran["key_tag-0"][1] and ran["key_tag-0"][0] < ran["sft_tag-0"][1]  # side by side
    assert ran["sftkey_tag-0"][0] >= ran["sft_tag-0"][1]  # after its owner
    done = [line for line in said if line.endswith(": done")]
    assert sorted(done[:2]) == ["key_tag seed 0: done", "sft_tag seed 0: done"] and done[2:] == ["sftkey_tag seed 0: done"]


def test_a_failed_run_starts_nothing_more_and_its_exit_code_is_returned(tmp_path):
    cells = [("a", 0), ("b", 0), ("c", 0)]
    said = []
    code = run_in_processes(recorder(tmp_path, 0.5, {("a", 0): 2}), cells, {}, 1,
                            lambda cell: tmp_path / "logs" / f"{cell[0]}.log", said.append)
    assert code == 2
    assert sorted(intervals(tmp_path)) == ["a-0"]  # b and c never started
    assert said[1:] == ["a seed 0: failed (exit 2): a seed 0: done", "not started after the failure: b seed 0, c seed 0"]


def test_an_owner_left_out_of_the_selection_is_not_waited_for(tmp_path):
    code = run_in_processes(recorder(tmp_path, 0.1), [("sftkey_tag", 0)], {("sftkey_tag", 0): ("sft_tag", 0)}, 2,
                            lambda cell: tmp_path / "logs" / f"{cell[0]}.log", lambda line: None)
    assert code == 0 and sorted(intervals(tmp_path)) == ["sftkey_tag-0"]


def test_jobs_below_one_is_refused_in_one_line(tiny_model_dir, tmp_path):
    arms = {"sft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 2}]}}
    config = write_config(tmp_path, tiny_model_dir, tmp_path / "runs", arms)
    proc = subprocess.run([sys.executable, "-m", "sftkey.cli", "train", "--config", str(config), "--jobs", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == (
        "sftkey train: error: --jobs 0: give 1 or more runs at once")


@pytest.mark.slow  # three `sftkey train` processes and one more for the reference: ~1-2 min
def test_two_processes_train_three_arms_to_the_weights_of_one_process(tiny_model_dir, tmp_path):
    arms = {"sft_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 4}]},
            "key_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "key", "steps": 4}]},
            "sftkey_tag": {"format": "tagged", "stages": [{"name": "stage1", "loss": "sft", "steps": 4},
                                                         {"name": "stage2", "loss": "key", "steps": 2}]}}
    outputs = {}
    for jobs in (1, 2):
        config = write_config(tmp_path, tiny_model_dir, tmp_path / f"jobs{jobs}", arms, {"precision": "fp32"})
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "sftkey.cli", "train", "--config", str(config), "--jobs",
                               str(jobs)], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[jobs] = (proc.stdout, time.monotonic() - started)
    stdout = outputs[2][0].splitlines()
    assert stdout[0] == f"sftkey train: 3 runs, 2 at once (single-thread processes; logs in {tmp_path / 'jobs2' / 'logs'})"
    assert sorted(line.split(":")[0] for line in stdout if line.endswith(" s)")) == [
        "key_tag seed 0", "sft_tag seed 0", "sftkey_tag seed 0"]
    for arm, stage in (("sft_tag", "stage1"), ("key_tag", "stage1"), ("sftkey_tag", "stage2")):
        one, two = (load_file(str(tmp_path / f"jobs{j}" / arm / "seed0" / "checkpoints" / f"{stage}-final" /
                                  "model.safetensors")) for j in (1, 2))
        assert [name for name in one if not torch.equal(one[name], two[name])] == [], arm
    reused = (tmp_path / "jobs2" / "sftkey_tag" / "seed0" / "run.json").read_text()
    assert "reused_from" in reused  # its stage 1 is sft_tag's, not trained a second time


RUNNER = """
import sys
from pathlib import Path
from sftkey.train.parallel_runs import run_in_processes
folder = Path(sys.argv[1])
child = (
    "import signal, sys, time\\n"
    "from pathlib import Path\\n"
    "out = Path(sys.argv[1])\\n"
    "def got(signum, frame):\\n"
    "    with open(out, 'a') as f: f.write(signal.Signals(signum).name + '\\\\n')\\n"
    "signal.signal(signal.SIGINT, got); signal.signal(signal.SIGTERM, got)\\n"
    "out.with_suffix('.ready').touch()\\n"
    "deadline = time.time() + 60\\n"
    "while not out.exists() and time.time() < deadline: time.sleep(0.01)\\n"
    "time.sleep(0.5)\\n"  # a second signal in this time (a run's cleanup) would be written too
    "sys.exit(130)\\n"
)
code = run_in_processes(lambda cell: [sys.executable, "-c", child, str(folder / cell[0])], [("a", 0), ("b", 0)], {}, 2,
                        lambda cell: folder / "logs" / f"{cell[0]}.log", lambda line: None)
sys.exit(code)
"""


@pytest.mark.parametrize("signum,code,group", [(signal.SIGINT, 130, True), (signal.SIGINT, 130, False),
                                               (signal.SIGTERM, 143, False)], ids=["Ctrl-C", "SIGINT", "SIGTERM"])
def test_a_signal_to_the_runner_reaches_each_run_once_and_sets_the_exit_code(tmp_path, signum, code, group):
    """SIGINT/SIGTERM to the runner, or Ctrl-C to its terminal's whole process group: each run handles the signal
    once and the runner exits 130/143 after them. (The runs have sessions of their own so that a group-wide Ctrl-C
    does not reach them twice; two SIGINTs microseconds apart usually coalesce, so this cannot show that part.)"""
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path)], cwd=REPO, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not ((tmp_path / "a.ready").exists() and (tmp_path / "b.ready").exists()):
        assert runner.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    if group:
        os.killpg(runner.pid, signum)  # as a terminal does
    else:
        runner.send_signal(signum)
    assert runner.wait(timeout=60) == code
    name = signal.Signals(signum).name
    assert [(tmp_path / arm).read_text() for arm in ("a", "b")] == [f"{name}\n", f"{name}\n"]  # once each
