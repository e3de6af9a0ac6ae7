"""Files a process keeps while it runs — a gateway process's journal, a PostgreSQL writer's spool — carry a lock
(`<file>.lock`, held for the process's life). Files of the same kind whose lock nobody holds were left by a
process that is gone and will not come back under that name (killed, then started on another port; a
`--workers` group restarted with fewer workers): the next process that starts beside them adopts what they hold,
so no record is stranded in a file nobody reads."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def hold(path: Path) -> int | None:
    """Take the lock of `path` for this process's life; the descriptor (None if it is held elsewhere)."""
    fd = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def hold_or_own(path: Path, wait: float) -> tuple[Path, int]:
    """The lock of `path`, waited for up to `wait` seconds (a process of the same name still finishing: a gateway
    restarted while the old one drains); past that, a name of this process's own beside it, which the old one
    will not touch and a later start adopts. (the path used, the lock's descriptor)"""
    deadline = time.monotonic() + wait
    while True:
        fd = hold(path)
        if fd is not None:
            return path, fd
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    stem, dot, ext = path.name.rpartition(".")
    own = path.with_name(f"{stem}.p{os.getpid()}.{ext}")
    log.warning("aibridge: %s is still in use by another process; using %s", path.name, own.name)
    fd = hold(own)
    assert fd is not None  # the name carries this process's id
    return own, fd


def orphans(own: Path, pattern: str) -> Iterator[Path]:
    """Siblings of `own` matching `pattern` whose owner is gone, each locked while the caller adopts it (the
    caller then deletes it with `forget`). A sibling whose lock is held belongs to a live process."""
    for path in sorted(own.parent.glob(pattern)):
        if path == own or not path.is_file():
            continue
        try:
            fd = hold(path)
        except OSError:
            continue
        if fd is None:
            continue
        try:
            yield path
        finally:
            os.close(fd)


def forget(path: Path, *more: Path) -> None:
    """Delete an adopted file (and its companions) and its lock."""
    for p in (path, *more, _lock_path(path)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("aibridge: could not delete %s: %s", p, e)
