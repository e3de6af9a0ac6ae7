"""Files that hold audit data or credentials' hints: created readable by this user only."""

from __future__ import annotations

import os
from pathlib import Path


def private_file(path: Path, mode: str = "ab"):
    """Open a file that only this user may read (audit data, credentials' hints)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC), 0o600)
    os.chmod(path, 0o600)  # an existing file keeps its old mode otherwise
    return os.fdopen(fd, mode)
