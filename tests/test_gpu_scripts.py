"""benchmarks/gpu/: the prepared GPU session refuses what would waste a lent machine's minutes: an unknown part,
a missing .gpu/ folder (pack.sh not run or not carried), a pack from folders that lack the model or the data."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "benchmarks" / "gpu"


def run(script: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU / script), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT": "/nonexistent-unused"})


def test_session_refuses_an_unknown_part_before_anything_runs():
    for args in ((), ("bogus",)):
        done = run("session.sh", *args)
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr == f"session.sh: give train or generate, not '{''.join(args)}'\n"


def test_session_refuses_without_the_packed_folder(tmp_path):
    copy = tmp_path / "repo"  # a checkout without .gpu/
    (copy / "benchmarks" / "gpu").mkdir(parents=True)
    (copy / "benchmarks" / "gpu" / "session.sh").write_text((GPU / "session.sh").read_text())
    done = subprocess.run(["bash", str(copy / "benchmarks" / "gpu" / "session.sh"), "train"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "OUT": str(tmp_path / "out")})
    assert done.returncode == 2
    assert done.stderr == "no .gpu/: run benchmarks/gpu/pack.sh and carry .gpu\n"


def test_pack_names_the_missing_file_and_writes_nothing(tmp_path):
    model, data = tmp_path / "model", tmp_path / "gsm8k"
    model.mkdir()
    data.mkdir()
    (model / "config.json").write_text("{}")
    before = (REPO / ".gpu").exists() and sorted(p.name for p in (REPO / ".gpu").rglob("*"))
    done = run("pack.sh", str(model), str(data))
    assert done.returncode == 2
    assert done.stderr == f"pack.sh: {model}/tokenizer.json is missing (give the model folder and the GSM8K folder)\n"
    assert ((REPO / ".gpu").exists() and sorted(p.name for p in (REPO / ".gpu").rglob("*"))) == before
