"""A throwaway PostgreSQL server for tests: `initdb` + `pg_ctl start` in a temp folder, on 127.0.0.1 and a free
port, password authentication (scram) for every connection, stopped with `pg_ctl stop -m fast`.

PostgreSQL refuses to run as root: under root the server runs as the `postgres` user (else `nobody`) through
`runuser`, in a folder under /tmp that user owns (pytest's own tmp folders are root-only, 0700).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SUPERUSER = "postgres"
SEARCH_DIRS = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14)]
START_TIMEOUT_S = 60


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries here, or no way to run them: tests skip with this message."""


class PostgresFailed(RuntimeError):
    """The binaries are there but the server did not set up or start: a test failure, with the server's log."""


@dataclass
class PostgresServer:
    bin_dir: Path
    folder: Path  # holds data/, the log and the password file
    port: int
    password: str  # of SUPERUSER and of every user `create_user` makes
    run_as: str | None  # the unprivileged user under root
    startup_s: float = 0.0
    host: str = "127.0.0.1"
    databases: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def url(self, database: str, user: str = SUPERUSER, password: bool = False, scheme: str = "postgresql") -> str:
        secret = f":{self.password}" if password else ""
        return f"{scheme}://{user}{secret}@{self.host}:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> None:
        import psycopg2

        connection = psycopg2.connect(host=self.host, port=self.port, user=SUPERUSER, password=self.password,
                                      dbname=database)
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with connection.cursor() as cursor:
                cursor.execute(sql)
        finally:
            connection.close()

    def create_database(self, name: str, owner: str = SUPERUSER) -> str:
        self.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        self.databases.append(name)
        return name

    def create_user(self, name: str) -> str:
        self.execute(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{self.password}'")
        return name

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            _run(self, [self.bin_dir / "pg_ctl", "stop", "-D", self.data, "-m", "fast", "-w"], check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


def find_bin_dir() -> Path:
    """The folder of initdb/pg_ctl/postgres: on PATH (Debian links them into /usr/local/bin) or Debian's own."""
    on_path = shutil.which("initdb")
    candidates = ([Path(os.path.realpath(on_path)).parent] if on_path else []) + SEARCH_DIRS
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise PostgresMissing("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in "
                          "/usr/lib/postgresql/*/bin: apt-get install postgresql-15")


def unprivileged_user() -> str | None:
    """None when not root; else a user PostgreSQL agrees to run as."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("runuser"):
            return name
    raise PostgresMissing("running as root and no `runuser` + postgres/nobody user to run PostgreSQL as")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_postgres() -> PostgresServer:
    """A running server with SUPERUSER's password set; the caller stops it (`stop()` also deletes its folder)."""
    bin_dir, run_as = find_bin_dir(), unprivileged_user()
    folder = Path(tempfile.mkdtemp(prefix="sftkey-pg-"))
    server = PostgresServer(bin_dir, folder, free_port(), password=os.urandom(12).hex(), run_as=run_as)
    try:
        password_file = folder / "superuser.pw"
        password_file.write_text(server.password + "\n")
        if run_as:
            user = pwd.getpwnam(run_as)
            os.chown(folder, user.pw_uid, user.pw_gid)
            os.chown(password_file, user.pw_uid, user.pw_gid)
        _run(server, [bin_dir / "initdb", "-D", server.data, "-U", SUPERUSER, f"--pwfile={password_file}",
                      "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"])
        password_file.unlink()
        options = f"-c listen_addresses={server.host} -c port={server.port} -c unix_socket_directories='' -c fsync=off"
        started = time.monotonic()
        _run(server, [bin_dir / "pg_ctl", "start", "-D", server.data, "-l", server.log, "-w",
                      "-t", str(START_TIMEOUT_S), "-o", options])
        server.startup_s = time.monotonic() - started
    except BaseException:
        server.stop()
        raise
    return server


def _run(server: PostgresServer, command: list, check: bool = True) -> subprocess.CompletedProcess:
    command = [str(c) for c in command]
    if server.run_as:
        command = ["runuser", "-u", server.run_as, "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, cwd=server.folder)
    if check and done.returncode != 0:
        log = server.log.read_text()[-2000:] if server.log.exists() else ""
        raise PostgresFailed(f"{' '.join(command[:4])} ... failed ({done.returncode}): {done.stderr[-2000:]}{log}")
    return done
