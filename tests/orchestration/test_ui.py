"""`sftkey ui` for real: both servers start on 127.0.0.1 over the smoke pipeline's stores, a headless Chromium loads
the Dagster asset graph and an MLflow run page (screenshots kept), and Ctrl-C (SIGINT) stops both.

Slow (two servers and a browser, about a minute). Screenshots go to $SFTKEY_SCREENSHOTS, else the test's tmp folder.
"""

import os
import signal
import socket
import subprocess
import sys
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
