"""Atomic file writes: a temporary name beside the target, then ``os.replace`` (readers see old or new).

The one home of this chore for the package and the launchers: JSON/text/CSV outputs, torch files and
``fsync_dir`` (used where a rename must survive a crash: checkpoints, shards).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename inside ``path``) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The hidden, per-process temporary name ``path`` is written under before the rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, doc: Any, *, newline: bool = True, **dumps: Any) -> None:
    """``json.dumps(doc, **dumps)`` (plus a final newline) written atomically."""
    atomic_write_text(path, json.dumps(doc, **dumps) + ("\n" if newline else ""))


def atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename, for writers that take a path (``torch.save``, ``csv``)."""
    with atomic_path(path) as tmp:
        write(tmp)


__all__ = ["fsync_dir", "temp_path", "atomic_path", "atomic_write_text", "atomic_write_json", "atomic_save"]
