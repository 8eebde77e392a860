"""One base class for every error a user can fix: the CLI prints its message as one line and exits non-zero.

Library modules raise subclasses (DataError, ConfigError, ...) whose messages name the input and the fix; the
`sftkey` entry point catches `UserError` once, so no command repeats the try/except and no traceback is shown.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unusable environment; `str(error)` says which input and what to do."""

    exit_code = 2  # 2: the request cannot run as given; 1 (subclasses): it ran and failed or a gate said no
