"""Atomic writes: a reader or a crash never sees half a file or half a folder.

Files are written to a temp name beside the target and renamed over it; folders are built under a temp name
and swapped in, the previous folder (if any) moved aside first and deleted only after the swap. The data is
fsynced before the rename and the folder after it, so after a power loss the new name never points at
unwritten blocks and the rename itself is on disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temp file in the same folder, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


def swap_folder(tmp: Path, target: Path) -> Path:
    """Rename the finished folder `tmp` to `target`; an existing `target` is replaced only at the last moment."""
    tmp, target = Path(tmp), Path(target)
    fsync_tree(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    fsync_dir(target.parent)
    return target


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` and every folder's entries to disk (before the folder is renamed into place)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (POSIX: fsync the directory itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
