"""The code version in every stage and score key: the package version, and in a git checkout the commit and a
hash of the uncommitted source changes; never an error when git is missing."""

import subprocess

from sftkey import version
from sftkey.version import describe_code, package_version


def git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def checkout(tmp_path):
    """A git checkout with one committed source file and a test file."""
    root = tmp_path / "repo"
    (root / "sftkey").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "sftkey" / "loss.py").write_text("WEIGHT = 1\n")
    (root / "tests" / "test_loss.py").write_text("")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return root, sha


def test_clean_checkout_is_the_package_version_and_the_commit(tmp_path):
    root, sha = checkout(tmp_path)
    assert describe_code(root) == f"sftkey {package_version()} git {sha}"
    (root / "tests" / "test_loss.py").write_text("x = 1\n")  # not source: no change of code version
    assert describe_code(root) == f"sftkey {package_version()} git {sha}"


def test_source_changes_make_another_code_version(tmp_path):
    root, sha = checkout(tmp_path)
    clean = describe_code(root)
    (root / "sftkey" / "loss.py").write_text("WEIGHT = 2\n")
    edited = describe_code(root)
    assert edited.startswith(f"{clean} dirty ") and len(edited.split(" dirty ")[1]) == 16
    (root / "sftkey" / "loss.py").write_text("WEIGHT = 3\n")
    assert describe_code(root) not in (clean, edited)  # each change its own version
    (root / "sftkey" / "loss.py").write_text("WEIGHT = 1\n")
    assert describe_code(root) == clean
    (root / "sftkey" / "new.py").write_text("")  # an untracked, not ignored source file counts too
    assert describe_code(root).startswith(f"{clean} dirty ")


def test_without_git_or_outside_a_checkout_it_is_the_package_version(tmp_path, monkeypatch):
    root, _ = checkout(tmp_path)
    assert describe_code(root / "sftkey") == f"sftkey {package_version()}"  # inside another repository
    assert describe_code(tmp_path / "nowhere") == f"sftkey {package_version()}"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git executable
    assert describe_code(root) == f"sftkey {package_version()}"


def test_code_version_is_computed_once_per_process():
    version.code_version.cache_clear()
    first = version.code_version()
    assert version.code_version() is first and version.code_version.cache_info().hits == 1
    assert first.startswith(f"sftkey {package_version()}")
