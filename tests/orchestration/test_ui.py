"""`sftkey ui` for real: both servers start on 127.0.0.1 over the smoke pipeline's stores, a headless Chromium loads
the Dagster asset graph and an MLflow run page (screenshots kept), and Ctrl-C (SIGINT) stops both.

Slow (two servers and a browser, about a minute). Screenshots go to $SFTKEY_SCREENSHOTS, else the test's tmp folder.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000", "--virtual-time-budget=20000", "--hide-scrollbars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium(url: str, profile: Path, *action: str) -> str:
    result = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *action, url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


UI_COMMAND = """
import argparse, sys
from orchestration.commands import ui
parser = argparse.ArgumentParser()
ui.add_arguments(parser)
sys.exit(ui.run(parser.parse_args(sys.argv[1:])))
"""


@pytest.mark.slow
def test_both_uis_load_in_a_browser_and_stop_on_ctrl_c(smoke_run, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)")
    from orchestration.config import resources
    from orchestration.registry import walk_lineage

    shots = Path(os.environ.get("SFTKEY_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    dagster_port, mlflow_port = free_port(), free_port()
    env = {**os.environ, "DAGSTER_HOME": str(Path(smoke_run.config.work_dir) / "dagster")}
    # `sftkey ui` itself, as a user starts it; SIGINT below is the user's Ctrl-C.
    command = subprocess.Popen(
        [sys.executable, "-c", UI_COMMAND, "--config", str(smoke_run.config_path), "--dagster-port", str(dagster_port),
         "--mlflow-port", str(mlflow_port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        printed = [command.stdout.readline() for _ in range(3)]
        assert printed[0] == f"Dagster UI: http://127.0.0.1:{dagster_port}/asset-groups (asset graph), runs under /runs\n"
        assert printed[1].startswith(f"MLflow UI:  http://127.0.0.1:{mlflow_port} ")

        graph_url = f"http://127.0.0.1:{dagster_port}/asset-groups"
        dom = chromium(graph_url, tmp_path / "profile-dagster", "--dump-dom")
        for asset in ("raw_dataset", "stage2_model", "registered_model"):
            assert asset in dom, f"{asset} not on the asset graph page"
        chromium(graph_url, tmp_path / "profile-dagster", f"--screenshot={shots / 'dagster_asset_graph.png'}")

        tracking = resources(smoke_run.config)["tracking"]
        run_id = walk_lineage(tracking.client(), "sftkey-smoke", "1").run_id  # the registered model's run
        run_url = f"http://127.0.0.1:{mlflow_port}/#/experiments/{tracking.experiment_id()}/runs/{run_id}"
        dom = chromium(run_url, tmp_path / "profile-mlflow", "--dump-dom")
        assert "stage2_model[sftkey_tag|0]" in dom  # the run's name
        assert smoke_run.result.pipeline_run in dom  # its parent run, linked
        chromium(run_url, tmp_path / "profile-mlflow", f"--screenshot={shots / 'mlflow_run.png'}")
    finally:
        command.send_signal(signal.SIGINT)
        rest, _ = command.communicate(timeout=60)
    assert command.returncode == 0, rest
    assert rest.endswith("stopping ...\n")
    assert port_is_free(dagster_port) and port_is_free(mlflow_port)
    for name in ("dagster_asset_graph.png", "mlflow_run.png"):
        assert (shots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (shots / name).stat().st_size > 20_000  # a rendered page, not a blank one


SERVER_UNDER_PARENT = """
import os, subprocess, sys, time, urllib.request
from orchestration.guard import guarded, parent_death_preexec
port = sys.argv[1]
# the port is held by a grandchild, as uvicorn under `mlflow server` or the webserver under `dagster dev` hold theirs
server = [sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-m', 'http.server', "
          "sys.argv[1], '--bind', '127.0.0.1'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)", port]
subprocess.Popen(guarded(server), preexec_fn=parent_death_preexec(os.getpid()))
for _ in range(100):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
print("up", flush=True)
time.sleep(600)
"""


def wait_until_free(port: int, timeout_s: float) -> float:
    started = time.monotonic()
    while not port_is_free(port) and time.monotonic() - started < timeout_s:
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_guarded_server_and_its_children_die_with_their_parent(signum):
    port = free_port()
    parent = subprocess.Popen([sys.executable, "-c", SERVER_UNDER_PARENT, str(port)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert parent.stdout.readline() == "up\n"
        assert not port_is_free(port)
        parent.send_signal(signum)
        parent.wait(10)
        assert wait_until_free(port, 10) < 10
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.slow
def test_kill_9_of_sftkey_ui_frees_both_ports(tiny_model_dir, tmp_path):
    from tests.orchestration.conftest import smoke_raw, write_config

    config = write_config(smoke_raw(tiny_model_dir, tmp_path / "work"), tmp_path / "pipeline.yaml")
    dagster_port, mlflow_port = free_port(), free_port()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "work" / "dagster")}
    command = subprocess.Popen(
        [sys.executable, "-c", UI_COMMAND, "--config", str(config), "--dagster-port", str(dagster_port),
         "--mlflow-port", str(mlflow_port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=Path(__file__).resolve().parents[2])
    try:
        assert command.stdout.readline().startswith("Dagster UI: ")  # printed once both answer
        assert not port_is_free(dagster_port) and not port_is_free(mlflow_port)
        command.kill()  # kill -9: no handler of `sftkey ui` runs
        command.wait(10)
        assert wait_until_free(dagster_port, 30) < 30
        assert wait_until_free(mlflow_port, 30) < 30
    finally:
        command.kill()
        command.wait()


@pytest.mark.slow
def test_a_taken_port_is_one_line_and_the_other_server_is_stopped(tiny_model_dir, tmp_path):
    from tests.orchestration.conftest import smoke_raw, write_config

    config = write_config(smoke_raw(tiny_model_dir, tmp_path / "work"), tmp_path / "pipeline.yaml")
    dagster_port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "work" / "dagster")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        mlflow_port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "sftkey.cli", "ui", "--config", str(config), "--dagster-port", str(dagster_port),
             "--mlflow-port", str(mlflow_port)], env=env, capture_output=True, text=True, timeout=300,
            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    code, rest = line.removeprefix("sftkey ui: error: mlflow exited with code ").split(" ", 1)
    assert code.isdigit()  # mlflow 3 exits 0 when its port is taken
    assert rest == (f"while starting (is http://127.0.0.1:{mlflow_port} taken? pick another port with --mlflow-port); "
                    f"see {tmp_path / 'work' / 'ui-logs' / 'mlflow.log'}")
    assert wait_until_free(dagster_port, 10) < 10
