"""Open files a user pointed us at: regular files only, symlinks kept inside their root, reads bounded.

Anything can sit in an input folder. A FIFO named ``f.png`` makes ``open()`` wait forever for a writer;
a symlink to ``/dev/zero`` reports size 0 and reads without end. So the kind is checked with ``stat``
before opening, the open itself cannot block (``O_NONBLOCK``) and is checked again on the descriptor
(the name may have been swapped in between), and reads stop at ``limit + 1`` bytes whatever the size
said. Each refusal is a ``RefusedFile`` whose message is the reason, worded for a skip list.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

_KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
          stat.S_IFSOCK: "socket", stat.S_IFDIR: "folder"}
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_READ_STEP = 1 << 20
MAX_IMAGE_BYTES = 256_000_000
"""The most bytes read from one image file (shard's default member limit): a 600-dpi A4 scan is ~30 MB."""


class RefusedFile(ValueError):
    """A path that is not read (not a regular file, outside its root, too large); ``str(e)`` is why."""


def _inside(path: str, root: str | Path | None) -> str:
    """``path`` with every symlink resolved; refused when that leaves ``root``."""
    real = os.path.realpath(path)
    if root is not None:
        base = os.path.realpath(root)
        if os.path.commonpath([real, base]) != base:
            raise RefusedFile("symlink leads outside the input folder: not followed")
    return real


def open_regular(path: str | Path, root: str | Path | None = None) -> BinaryIO:
    """``path`` opened for binary reading, if it is (or links, within ``root``, to) a regular file.

    OSError as ``open`` raises it for a missing or unreadable file; RefusedFile for anything else.
    """
    before = os.stat(path)  # follows links: a dangling one is FileNotFoundError, as for open()
    real = _inside(os.fspath(path), root)
    _require_regular(before)
    fd = os.open(real, _OPEN_FLAGS | os.O_NOFOLLOW)
    try:
        after = os.fstat(fd)
        _require_regular(after)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise RefusedFile("file replaced while being opened: not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, limit: int, root: str | Path | None = None) -> bytes:
    """All bytes of the regular file ``path``; RefusedFile past ``limit`` bytes (counted, not trusted from stat)."""
    with open_regular(path, root) as f:
        step = min(os.fstat(f.fileno()).st_size, limit) + 1
        chunks, total = [], 0
        while total <= limit:
            chunk = f.read(min(step, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            step = _READ_STEP
    if total > limit:
        raise RefusedFile(f"file too large: over the {limit / 1e6:.1f} MB limit")
    return b"".join(chunks)


def _require_regular(st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "special file")
        raise RefusedFile(f"not a regular file: {kind}, not read")
