"""DAGSTER_HOME/dagster.yaml from the pipeline config's `dagster:` section: sqlite files under the home (default)
or PostgreSQL (dagster-postgres), a queued run coordinator so that runs launched from the UI wait their turn,
telemetry and the sign-up dialog off.

The home is DAGSTER_HOME when set, else `<work_dir>/dagster`. sftkey owns a dagster.yaml it wrote (its first line
says so) and rewrites it when the config changes; one written by hand is used as it is, and a config whose
`dagster:` section is not the default is refused there rather than silently ignored. The password never enters
the file: it names the environment variable that holds it (`{env: VAR}`).
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from orchestration.config import DagsterSection, PipelineConfig
from sftkey import atomic
from sftkey.errors import UserError

INSTANCE_YAML = "dagster.yaml"
HEADER = "# Written by sftkey from the pipeline config's `dagster:` section; edits are overwritten.\n"
LEGACY_YAML = "telemetry:\n  enabled: false\nnux:\n  enabled: false\n"  # what sftkey wrote before `dagster:`
QUEUED_RUN_COORDINATOR = {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}


def instance_settings(dagster: DagsterSection) -> dict[str, Any]:
    """The dagster.yaml mapping for a `dagster:` section."""
    settings: dict[str, Any] = {
        "telemetry": {"enabled": False},
        "nux": {"enabled": False},
        "run_coordinator": QUEUED_RUN_COORDINATOR,  # its limits live under `concurrency: runs:`
        "concurrency": {"runs": {"max_concurrent_runs": dagster.max_concurrent_runs},
                        "pools": {"default_limit": dagster.pool_default_limit}},
    }
    if dagster.storage == "postgres":
        settings["storage"] = {"postgres": postgres_settings(dagster.postgres_url or "", dagster.password_env)}
    return settings


def postgres_settings(url: str, password_env: str | None) -> dict[str, Any]:
    """dagster-postgres' config for `url` (which holds no password). Without password_env the URL is passed as
    it is, so libpq finds the password its own way (PGPASSWORD, ~/.pgpass); with it, the parts and `{env: VAR}`."""
    if password_env is None:
        return {"postgres_url": psycopg2_url(url)}
    parts = urllib.parse.urlsplit(psycopg2_url(url))
    db = {"username": urllib.parse.unquote(parts.username or ""), "password": {"env": password_env},
          "hostname": parts.hostname or "localhost", "db_name": parts.path.lstrip("/"), "port": parts.port or 5432,
          "scheme": parts.scheme}
    params = dict(urllib.parse.parse_qsl(parts.query))
    if params:
        db["params"] = params
    return {"postgres_db": db}


def psycopg2_url(url: str) -> str:
    """A postgresql:// URL with its driver named: SQLAlchemy 2.1 would pick psycopg 3 for a bare one, under which
    dagster-postgres' NOTIFY fails (it relies on psycopg2's client-side parameters)."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql+psycopg2://{rest}" if sep and scheme in ("postgresql", "postgres") else url


def write_instance_yaml(home: Path, config: PipelineConfig) -> Path:
    """Write `home`/dagster.yaml for `config` (atomically; untouched when already the same) and return its path.
    A dagster.yaml sftkey did not write is kept; HandWrittenInstance when the config asks for other settings."""
    name = config.sections.dagster.password_env
    if name and name not in os.environ:  # Dagster would fail later, naming neither the key nor the fix
        raise MissingPassword(f"dagster.password_env: ${name} is not set; export it with the database's password")
    home.mkdir(parents=True, exist_ok=True)
    path = home / INSTANCE_YAML
    text = HEADER + yaml.safe_dump(instance_settings(config.sections.dagster), sort_keys=False)
    current = path.read_text() if path.exists() else None
    if current is not None and not current.startswith(HEADER) and current != LEGACY_YAML:
        if config.sections.dagster != DagsterSection():
            raise HandWrittenInstance(f"{path} was not written by sftkey, so the config's `dagster:` section "
                                      "cannot apply: delete the file (sftkey writes one) or drop the section")
        return path
    if current != text:
        atomic.write_text(path, text)
    return path


class MissingPassword(UserError):
    """dagster.password_env names a variable that is not set."""


class HandWrittenInstance(UserError):
    """The Dagster home holds a dagster.yaml of the user's while the config asks for other settings."""
