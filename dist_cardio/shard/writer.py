"""Atomic WebDataset tar shards and their DALI ``.idx`` files.

A shard is written under a temporary name that the shard glob never matches (``.NAME.partial``),
fsynced, then renamed; its index follows the same way. A run killed at any moment therefore leaves
only complete shards. While a shard grows, a background thread hands each further ``WRITEBACK_BYTES`` to
the disk (``fdatasync``), so the disk writes while images are still being validated and the final fsync
waits only for the tail. The tar is written by hand (512-byte ustar headers, fixed owner and mtime) so
the data offsets for the index are known without re-reading, and the same input gives the same bytes.
A write that fails (full disk) removes its temporary file and raises an OSError naming the target.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tarfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dist_cardio.atomic import fsync_dir

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # GNU tar and Python's tarfile pad archives to whole records
INDEX_VERSION = "v1.2"  # DALI wds2idx format
PARTIAL_SUFFIX = ".partial"
WRITEBACK_BYTES = 4 << 20


@dataclass(frozen=True)
class Component:
    """One tar member of a sample, as a DALI index names it: extension, data offset, size, member name."""

    ext: str
    offset: int
    size: int
    name: str


@dataclass(frozen=True)
class ShardRecord:
    """A completed shard as the manifest lists it."""

    name: str
    count: int
    bytes: int
    sha256: str
    index: str

    def manifest_entry(self) -> dict:
        return {"name": self.name, "count": self.count, "bytes": self.bytes, "sha256": self.sha256, "index": self.index}


def shard_name(prefix: str, n: int) -> str:
    return f"{prefix}-{n:06d}.tar"


def index_name(shard: str) -> str:
    return shard[: -len(".tar")] + ".idx"


def partial_path(path: Path) -> Path:
    """Temporary name beside ``path``: hidden and not ending in .tar/.idx/.json, so no glob takes it."""
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Let an OSError raised while writing ``path`` name it (a failed write() or fsync() names no file)."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


# What to do about a failed write into the shard set, by errno.
_FIXES = {
    errno.ENOSPC: "free space on that disk (or pass an --out on another one), then re-run",
    errno.EDQUOT: "free space within your quota (or pass an --out elsewhere), then re-run",
    errno.EROFS: "pass an --out on a writable disk",
    errno.EACCES: "make --out writable for you, or pass another --out",
}


def write_failure(e: OSError, out: Path) -> str:
    """One line for a failed write into the set ``out``: the file, the cause, the fix, and what was kept."""
    fix = _FIXES.get(e.errno, "fix the cause, then re-run")
    return (f"{e.filename or out}: {e.strerror or e}; {fix} (complete shards and manifest.json are kept, "
            "no temporary file is left)")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers see old or new, never half."""
    tmp = partial_path(path)
    with naming(path):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def split_member_name(name: str) -> tuple[str, str]:
    """(sample key, extension) split at the first dot of the base name, as webdataset and wds2idx do."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def index_text(samples: list[tuple[Component, ...]] | tuple[tuple[Component, ...], ...]) -> str:
    """The ``.idx`` content DALI's wds2idx writes for a tar with these samples."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{c.ext} {c.offset} {c.size} {c.name}" for c in sample) for sample in samples]
    return "\n".join(lines) + "\n"


def _padding(n: int, unit: int) -> int:
    return (-n) % unit


class ShardWriter:
    """Writes one shard to its temporary name; ``finish()`` makes it (and its index) visible atomically."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.path = out_dir / name
        self.tmp = partial_path(self.path)
        self._file = open(self.tmp, "wb")
        self._hash = hashlib.sha256()
        self.offset = 0
        self.samples: list[tuple[Component, ...]] = []
        self._handed = 0  # bytes handed to the background fdatasync
        self._writeback: Future | None = None
        self._thread: ThreadPoolExecutor | None = None

    @property
    def count(self) -> int:
        return len(self.samples)

    def size_with(self, components: list[tuple[str, bytes]]) -> int:
        """Final shard size in bytes if these components were added now (end blocks and record padding included)."""
        end = self.offset + sum(TAR_BLOCK + len(d) + _padding(len(d), TAR_BLOCK) for _, d in components)
        end += 2 * TAR_BLOCK
        return end + _padding(end, TAR_RECORD)

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.offset += len(data)

    def add(self, key: str, components: list[tuple[str, bytes]]) -> None:
        with naming(self.path):
            self._add(key, components)

    def _add(self, key: str, components: list[tuple[str, bytes]]) -> None:
        entries = []
        for ext, data in components:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0  # reproducible bytes; provenance lives in the json component
            info.uname = info.gname = ""
            self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
            entries.append(Component(ext, self.offset, len(data), info.name))
            self._write(data)
            self._write(b"\0" * _padding(len(data), TAR_BLOCK))
        self.samples.append(tuple(entries))
        if self.offset - self._handed >= WRITEBACK_BYTES and (self._writeback is None or self._writeback.done()):
            self._finish_writeback()  # raises what the previous one met (a full disk)
            self._file.flush()
            self._thread = self._thread or ThreadPoolExecutor(1, thread_name_prefix="shard-writeback")
            self._writeback = self._thread.submit(os.fdatasync, self._file.fileno())
            self._handed = self.offset

    def _finish_writeback(self, stop: bool = False) -> None:
        """Wait for the background fdatasync (re-raising its error); with ``stop`` also end its thread."""
        try:
            if self._writeback is not None:
                self._writeback.result()
        finally:
            self._writeback = None
            if stop and self._thread is not None:
                self._thread.shutdown()
                self._thread = None

    def finish(self) -> ShardRecord:
        """Close the tar, rename it into place, then write its index (also atomically)."""
        with naming(self.path):
            self._write(b"\0" * (2 * TAR_BLOCK))
            self._write(b"\0" * _padding(self.offset, TAR_RECORD))
            self._file.flush()
            self._finish_writeback(stop=True)
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        index = index_name(self.path.name)
        atomic_write_bytes(self.path.parent / index, index_text(self.samples).encode())
        return ShardRecord(self.path.name, self.count, self.offset, self._hash.hexdigest(), index)

    def abort(self) -> None:
        """Drop the unfinished shard (on an error in the run; a kill leaves the temporary file to the next run)."""
        try:
            self._finish_writeback(stop=True)
        except OSError:  # the error being handled already says what went wrong
            pass
        try:
            self._file.close()
        except OSError:  # the final flush fails again on a full disk; the file is closed and dropped anyway
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


def read_shard(path: Path) -> Iterator[tuple[str, tuple[Component, ...], dict[str, bytes]]]:
    """(key, index components, {ext: bytes}) per sample, grouped by key in tar order like wds2idx."""
    key: str | None = None
    components: list[Component] = []
    data: dict[str, bytes] = {}
    with tarfile.open(path, mode="r:") as tf:
        for m in tf:
            if not m.isreg():
                continue
            base, ext = split_member_name(m.name)
            if not base or base.endswith("/"):
                continue
            if base != key and key is not None:
                yield key, tuple(components), data
                components, data = [], {}
            key = base
            f = tf.extractfile(m)
            data[ext] = f.read() if f is not None else b""
            components.append(Component(ext, m.offset_data, m.size, m.name))
    if key is not None:
        yield key, tuple(components), data


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
