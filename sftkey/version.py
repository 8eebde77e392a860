"""Which code made a result: part of every stage and score key, so reuse never hides a change of code.

    sftkey 0.1.0                                   installed, or git absent
    sftkey 0.1.0 git 1a2b3c4d5e6f...               a clean git checkout
    sftkey 0.1.0 git 1a2b3c4d5e6f... dirty 9f8e7d6c5b4a    local changes to the source (their diff's hash)
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

PACKAGE = "sftkey"
SOURCE_DIRS = ("sftkey", "orchestration", "evals")  # what decides weights and scores; tests/ and docs do not
GIT_TIMEOUT_S = 10


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


@functools.cache
def code_version() -> str:
    """This process's code version (computed once: git runs at most three times per process)."""
    return describe_code(Path(__file__).resolve().parent.parent)


def describe_code(root: Path) -> str:
    """The package version, plus the git sha and a hash of the uncommitted changes under SOURCE_DIRS when `root`
    is the top of a git checkout. Never fails: without git, or outside a checkout, it is the package version."""
    described = f"{PACKAGE} {package_version()}"
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top.decode().strip()).resolve() != Path(root).resolve():
        return described  # no git, or an install inside someone else's repository
    sha = _git(root, "rev-parse", "HEAD")
    if sha is None:
        return described  # a repository with no commit yet
    described += f" git {sha.decode().strip()}"
    dirty = _uncommitted_hash(root)
    return f"{described} dirty {dirty}" if dirty else described


def _uncommitted_hash(root: Path) -> str | None:
    """sha256 (16 hex) of the diff of tracked files and of the untracked, not ignored files; None when clean."""
    diff = _git(root, "diff", "HEAD", "--binary", "--", *SOURCE_DIRS) or b""
    untracked = _git(root, "ls-files", "--others", "--exclude-standard", "-z", "--", *SOURCE_DIRS) or b""
    if not diff and not untracked:
        return None
    digest = hashlib.sha256(diff)
    for name in sorted(n for n in untracked.split(b"\0") if n):
        digest.update(b"\0" + name + b"\0")
        try:
            digest.update((Path(root) / name.decode()).read_bytes())
        except OSError:
            pass  # deleted since the listing: its name still counts
    return digest.hexdigest()[:16]


def _git(root: Path, *args: str) -> bytes | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None  # git missing, or hung
    return done.stdout if done.returncode == 0 else None
