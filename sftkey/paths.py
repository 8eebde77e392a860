"""Where sftkey keeps caches: `$SFTKEY_HOME`, default `~/.cache/sftkey`."""

from __future__ import annotations

import os
from pathlib import Path


def sftkey_home() -> Path:
    return Path(os.environ.get("SFTKEY_HOME") or Path.home() / ".cache" / "sftkey")
