"""Data versions with DVC: a git + DVC repo (local remote by default) that holds the pipeline's data sets.

Each tracked data set is `dvc add`-ed, committed to the repo's git and pushed to the remote; the git commit is
its revision, and `dvc.api.read(path, repo, rev)` gives back exactly that content later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from sftkey.errors import UserError

GIT_IDENTITY = ["-c", "user.name=sftkey pipeline", "-c", "user.email=sftkey@localhost"]
QUIET_DVC = {"DVC_NO_ANALYTICS": "1", "DVC_NO_UPDATER": "1"}  # both phone home; offline they cost seconds
REMOTE_NAME = "storage"


class DvcError(UserError, RuntimeError):
    """A DVC or git command failed; the message has its command and output."""


@dataclass(frozen=True)
class Tracked:
    """A data set at one revision of the DVC repo."""

    path: str  # relative to the repo root
    rev: str  # git commit of the repo that holds its .dvc file
    md5: str  # DVC's content hash of the file or folder


def git(*args: str, cwd: Path) -> str:
    result = subprocess.run(["git", *GIT_IDENTITY, *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
        raise DvcError(f"`git {' '.join(args)}` in {cwd} failed (exit {result.returncode}): {' | '.join(output)}")
    return result.stdout.strip()


@contextlib.contextmanager
def quiet_dvc():
    """DVC logs advice about `git add` at INFO; we commit ourselves, so only its warnings are shown."""
    os.environ.update(QUIET_DVC)
    logger = logging.getLogger("dvc")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def dvc_repo(root: Path):
    """DVC's Python API: 0.3 s a call, against about 1 s for each `dvc` command."""
    from dvc.repo import Repo

    with quiet_dvc(), Repo(str(root)) as repo:
        yield repo


def ensure_repo(root: Path, remote: str) -> Path:
    """A git + DVC repo at `root` whose default remote is `remote` (a folder or any DVC remote URL)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / ".git").exists():
        git("init", "-q", cwd=root)
    url = str(Path(remote).resolve()) if "://" not in remote else remote
    if not (root / ".dvc").exists():
        from dvc.repo import Repo

        with quiet_dvc():
            Repo.init(str(root)).close()
    with dvc_repo(root) as repo:
        if repo.config["remote"].get(REMOTE_NAME, {}).get("url") != url:
            with repo.config.edit() as config:
                config["remote"][REMOTE_NAME] = {"url": url}
                config["core"]["remote"] = REMOTE_NAME
    git("add", ".dvc/config", ".dvc/.gitignore", ".dvcignore", cwd=root)
    if git("status", "--porcelain", "--", ".dvc", ".dvcignore", cwd=root):
        git("commit", "-q", "-m", f"dvc remote {url}", cwd=root)
    return root


def track(root: Path, path: str, message: str) -> Tracked:
    """`dvc add` `path` (relative to `root`), commit its .dvc file, push the data; the new (or same) revision."""
    root = Path(root)
    pointer, ignore = f"{path}.dvc", str(Path(path).parent / ".gitignore")
    with dvc_repo(root) as repo:
        (stage,) = repo.add(str(root / path))
        repo.push(targets=[str(root / path)])
        md5 = stage.outs[0].hash_info.value
    git("add", pointer, ignore, cwd=root)
    if git("status", "--porcelain", "--", pointer, ignore, cwd=root):  # unchanged data: nothing to commit
        git("commit", "-q", "-m", message, "--", pointer, ignore, cwd=root)
    return Tracked(path=path, rev=git("rev-parse", "HEAD", cwd=root), md5=md5)


def read_text(root: Path, path: str, rev: str) -> str:
    """The content of a tracked file at revision `rev` (from the cache or the remote, never the work tree)."""
    import dvc.api

    with quiet_dvc():
        return dvc.api.read(path, repo=str(root), rev=rev, mode="r", encoding="utf-8")


def copy_into(source: Path, target: Path) -> None:
    """Replace `target` by a copy of `source` (through a temp name beside it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if source.is_dir():
        shutil.copytree(source, tmp)
        if target.exists():
            shutil.rmtree(target)
    else:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


class DvcResource(dg.ConfigurableResource):
    """The DVC repo that versions the pipeline's data sets, and its remote."""

    repo: str = ".sftkey-work/dvc/repo"
    remote: str = ".sftkey-work/dvc/remote"  # a folder (local remote) or a DVC remote URL (s3://, ssh://, ...)

    def root(self) -> Path:
        return Path(self.repo).resolve()

    def track(self, source: Path, path: str, message: str) -> Tracked:
        """Copy `source` (a file or folder) to `path` in the repo and track it, one writer at a time: the copy
        happens under the lock, so two pipeline runs never commit each other's data."""
        from filelock import FileLock

        root = self.root()
        root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root.parent / f".{root.name}.lock")):
            ensure_repo(root, self.remote)
            copy_into(Path(source), root / path)
            return track(root, path, message)

    def read_text(self, path: str, rev: str) -> str:
        return read_text(self.root(), path, rev)
