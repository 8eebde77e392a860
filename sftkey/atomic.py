"""Atomic writes: a reader or a crash never sees half a file or half a folder.

Files are written to a temp name beside the target and renamed over it; folders are built under a temp name
and swapped in, the previous folder (if any) moved aside first and deleted only after the swap.
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
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


def swap_folder(tmp: Path, target: Path) -> Path:
    """Rename the finished folder `tmp` to `target`; an existing `target` is replaced only at the last moment."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    return target
