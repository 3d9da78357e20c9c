"""Safe writes into output folders: atomic files (a temporary name beside the target, then ``os.replace``:
readers see old or new) and one writer per folder (``output_lock``).

The one home of these chores for the package and the launchers: JSON/text/CSV outputs, torch files,
``fsync_dir`` (used where a rename must survive a crash: checkpoints, shards) and the run lock.
"""

from __future__ import annotations

import fcntl
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


LOCK = ".run.lock"


class OutputInUse(FileExistsError):
    """Another live process holds the output folder's lock; the message names the folder and the fix."""


@contextmanager
def output_lock(out: Path, command: str) -> Iterator[None]:
    """Hold ``out/.run.lock`` while a run writes into ``out``: a second run there is refused, not interleaved.

    Two pretrainings into one folder would log every step twice and race on checkpoints. The kernel drops
    an ``flock`` when its process dies, so a killed or requeued job never leaves a stale lock.
    """
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputInUse(f"{out}: another `dist-cardio {command}` is writing here; wait for it to finish or "
                          "choose another --out") from None
    try:
        yield
    finally:
        os.close(fd)


__all__ = ["LOCK", "OutputInUse", "output_lock", "fsync_dir", "temp_path", "atomic_path", "atomic_write_text", "atomic_write_json", "atomic_save"]
