"""`sftkey ui`: the Dagster UI (asset graph, checks, runs) and the MLflow UI (runs, metrics, artifacts, registry)
on 127.0.0.1, both reading this project's stores; Ctrl-C stops both.

`dagster dev` ignores SIGTERM (it stops on SIGINT), and a child started from a script may inherit an ignored
SIGINT: each child gets the default SIGINT handler back before it starts. Each server runs under a guard
(orchestration/guard.py) that takes its whole process tree down when `sftkey ui` ends, even by kill -9.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from orchestration import guard
from orchestration.config import PipelineConfig, default_tracking_uri
from orchestration.instance import psycopg2_url
from orchestration.tracking import default_artifact_location
from sftkey.errors import UserError

DAGSTER_PORT = 3000
MLFLOW_PORT = 5000
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 90.0  # dagster dev on 2 cores: ~15 s; mlflow server: ~9 s
STOP_TIMEOUT_S = guard.STOP_TIMEOUT_S + 10.0  # the guard's own SIGINT-then-SIGKILL of its server comes first


class ServerFailed(UserError, RuntimeError):
    """A UI server exited or did not answer while starting; the message names its log."""

    exit_code = 1


class MissingPassword(UserError):
    """tracking.password_env names a variable that is not set."""


@dataclass
class Service:
    name: str
    url: str
    health_url: str
    process: subprocess.Popen


def mlflow_command(config: PipelineConfig, port: int) -> list[str] | None:
    """`mlflow server` over the pipeline's sqlite store, or over `tracking.server_backend_store_uri` (e.g.
    PostgreSQL) on the port of the http tracking_uri it serves, artifacts proxied through it (mlflow-artifacts:/);
    None when tracking points at a server that runs elsewhere."""
    tracking = config.sections.tracking
    uri = default_tracking_uri(config)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        backend, artifacts = uri, default_artifact_location(uri)
    elif tracking.server_backend_store_uri:
        backend, port = psycopg2_url(tracking.server_backend_store_uri), served_port(uri)  # where the pipeline looks
        artifacts = tracking.server_artifacts_destination or (config.work_dir / "mlflow" / "artifacts").as_uri()
    else:
        return None
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
            "--artifacts-destination", artifacts, "--serve-artifacts", "--host", HOST, "--port", str(port),
            "--workers", "1"]


def served_port(tracking_uri: str) -> int:
    parts = urllib.parse.urlsplit(tracking_uri)
    return parts.port or (443 if parts.scheme == "https" else 80)


def dagster_command(port: int) -> list[str]:
    return [sys.executable, "-m", "dagster", "dev", "-m", "orchestration.definitions", "-h", HOST, "-p", str(port)]


def service_env(config: PipelineConfig) -> dict[str, str]:
    from orchestration.definitions import CONFIG_ENV

    env = dict(os.environ)
    env.setdefault("DAGSTER_HOME", str(config.work_dir / "dagster"))
    env[CONFIG_ENV] = str(Path(config.path).resolve()) if config.path else env.get(CONFIG_ENV, "")
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: 0.6 GB and 9 s to start
    env.update(database_password(config))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    return env


def database_password(config: PipelineConfig) -> dict[str, str]:
    """PGPASSWORD (libpq reads it) for the MLflow server's database. (The Dagster instance's dagster.yaml names
    its own variable, which the UI processes inherit.)"""
    name = config.sections.tracking.password_env
    if name and name not in os.environ:
        raise MissingPassword(f"tracking.password_env: ${name} is not set; export it with the database's password")
    return {"PGPASSWORD": os.environ[name]} if name else {}


def start(config: PipelineConfig, dagster_port: int = DAGSTER_PORT, mlflow_port: int = MLFLOW_PORT,
          log_dir: Path | None = None) -> list[Service]:
    """Start both UIs (logs to `log_dir`, default `<work_dir>/ui-logs`) and wait until they answer."""
    from orchestration.pipeline import dagster_instance, set_pool_limit

    env = service_env(config)  # first: a missing password is named before anything opens a database
    set_pool_limit(dagster_instance(config), config)  # runs launched from the UI share the pipeline's device pool
    log_dir = Path(log_dir or config.work_dir / "ui-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    services = []
    commands = [("dagster", dagster_command(dagster_port), f"http://{HOST}:{dagster_port}", "/server_info")]
    if config.sections.tracking.server_backend_store_uri:  # the server answers where tracking_uri points
        mlflow_port = served_port(default_tracking_uri(config))
    mlflow = mlflow_command(config, mlflow_port)
    if mlflow:
        commands.append(("mlflow", mlflow, f"http://{HOST}:{mlflow_port}", "/health"))
    try:
        for name, command, url, health in commands:
            services.append(launch(name, command, url, health, env, log_dir))
        for service in services:
            wait_until_up(service, log_dir)
    except BaseException:
        stop(services)
        raise
    return services


def launch(name: str, command: list[str], url: str, health: str, env: dict[str, str], log_dir: Path) -> Service:
    """`command` under a guard that takes its process tree down with this process, logging to `log_dir`/NAME.log."""
    with open(log_dir / f"{name}.log", "ab") as log:
        process = subprocess.Popen(guard.guarded(command), env=env, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=guard.parent_death_preexec(os.getpid()),
                                   cwd=Path(__file__).resolve().parents[1])
    return Service(name, url, url + health, process)


def wait_until_up(service: Service, log_dir: Path, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise ServerFailed(f"{service.name} exited with code {service.process.returncode} while starting (is "
                               f"{service.url} taken? pick another port with --{service.name}-port); "
                               f"see {log_dir / (service.name + '.log')}")
        try:
            with urllib.request.urlopen(service.health_url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise ServerFailed(f"{service.name} did not answer on {service.url} within {timeout_s:.0f} s; "
                       f"see {log_dir / (service.name + '.log')} (is the port taken? pick another with --*-port)")


def stop(services: list[Service]) -> None:
    """SIGINT to each guard (it stops its server's process group), then wait; kill what is still there."""
    for service in services:
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for service in services:
        try:
            service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()


def serve(config: PipelineConfig, dagster_port: int = DAGSTER_PORT, mlflow_port: int = MLFLOW_PORT,
          echo=print) -> int:
    """Start both, print where they are, block until Ctrl-C (or SIGTERM), stop both."""
    # Started from a script in the background, this process may have SIGINT ignored: take Ctrl-C back, and
    # stop the same clean way on SIGTERM rather than leave both servers running.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    services = start(config, dagster_port, mlflow_port)
    echo(f"Dagster UI: http://{HOST}:{dagster_port}/asset-groups (asset graph), runs under /runs")
    mlflow = next((s for s in services if s.name == "mlflow"), None)
    echo(f"MLflow UI:  {mlflow.url if mlflow else config.sections.tracking.tracking_uri} "
         "(experiments, runs, models)")
    echo(f"logs in {config.work_dir / 'ui-logs'}; Ctrl-C stops both")
    try:
        while all(s.process.poll() is None for s in services):
            time.sleep(0.5)
        dead = [s.name for s in services if s.process.poll() is not None]
        echo(f"{', '.join(dead)} stopped on its own; stopping the rest")
        return 1
    except KeyboardInterrupt:
        echo("stopping ...")
        return 0
    finally:
        stop(services)
