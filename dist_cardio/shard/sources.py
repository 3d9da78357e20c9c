"""Walk folders and (nested) zip/tar archives safely, yielding image candidates and skip records.

Archive members are read into memory and never extracted: a member name like ``../../etc/x.png`` is
only provenance metadata. Reads are bounded (per member, per input in total, compression ratio,
nesting depth) so a zip or gzip bomb or a huge member is skipped with a reason instead of filling
memory. Plain files are not read here: the worker that hashes and validates them reads them in
parallel, through ``safe_open`` (regular files only, symlinks kept inside the input folder).

Provenance is relative: a file's path inside its input folder, an archive given as input by its own
name. Absolute paths (folders named after patients) stay out of the shards.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from dist_cardio.shard.safe_open import RefusedFile, open_regular

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"})
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
NESTED_SEPARATOR = "!"  # archive provenance of nested archives: outer.zip!inner/part.tar
_RATIO_MIN_BYTES = 1 << 20  # compression ratios of tiny members say nothing
_READ_STEP = 1 << 20  # tar members are read in steps, so a bomb is stopped after one step past the bound
# Compressed tars are decompressed here, not by tarfile: these readers give at most what is asked per
# read (tarfile's own bz2/xz inflate a whole input block at once, gigabytes for a bomb).
_COMPRESSED = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


@dataclass(frozen=True)
class Source:
    """Where a file came from, relative to its input: ``archive`` (None for plain files, ``a.zip!b.tar``
    when nested) and ``path`` (inside the input folder, or the member name)."""

    archive: str | None
    path: str

    def as_dict(self) -> dict[str, str | None]:
        return {"archive": self.archive, "path": self.path}


@dataclass(frozen=True)
class Candidate:
    """A file that should be an image: bytes already read (archive member) or a ``file`` to read.

    ``rel`` is its path inside its container (input folder or innermost archive), used for labels;
    ``file`` is the absolute path of a plain file, read only inside ``root`` (its input folder, if any).
    """

    source: Source
    rel: str
    data: bytes | None = None
    file: str | None = None
    root: str | None = None


@dataclass(frozen=True)
class Skipped:
    source: Source
    reason: str


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what archives may make us read."""

    max_member_bytes: int
    max_total_bytes: int
    max_ratio: float
    max_depth: int


class _Budget:
    """Decompressed bytes still allowed for one top-level input (shared by its nested archives)."""

    def __init__(self, total: int) -> None:
        self.left = total

    def take(self, n: int) -> bool:
        if n > self.left:
            return False
        self.left -= n
        return True


def classify(name: str) -> str | None:
    """``image``, ``archive`` or None, from the file name."""
    lower = name.lower()
    if lower.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    if PurePosixPath(lower).suffix in IMAGE_SUFFIXES:
        return "image"
    return None


def _unsupported(name: str) -> str:
    base = PurePosixPath(name).name
    if "__MACOSX/" in name or base.startswith("._"):
        return "not an image file: macOS metadata (__MACOSX or ._ file)"
    return f"not an image file: {PurePosixPath(base).suffix or 'no extension'}"


def walk_input(root: Path, limits: ArchiveLimits) -> Iterator[Candidate | Skipped]:
    """Everything under one input (folder, image or archive) in a deterministic order (sorted folders,
    archive order); all its archives share one decompressed-bytes budget."""
    budget = _Budget(limits.max_total_bytes)
    if root.is_dir():
        yield from _walk_folder(root, limits, budget)
    else:
        yield from _one_file(root, root.name, None, limits, budget)


def _walk_folder(root: Path, limits: ArchiveLimits, budget: _Budget) -> Iterator[Candidate | Skipped]:
    top = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for d in list(dirnames):
            if (base / d).is_symlink():
                yield Skipped(Source(None, (base / d).relative_to(root).as_posix()), "symlinked folder not followed")
        dirnames[:] = sorted(d for d in dirnames if not (base / d).is_symlink())
        for name in sorted(filenames):
            path = base / name
            yield from _one_file(path, path.relative_to(root).as_posix(), top, limits, budget)


def _one_file(
    path: Path, rel: str, root: str | None, limits: ArchiveLimits, budget: _Budget
) -> Iterator[Candidate | Skipped]:
    """One plain file: an image candidate (read later, by a worker), an archive to walk, or a skip."""
    kind = classify(path.name)
    if kind == "image":
        yield Candidate(Source(None, rel), rel, file=os.path.abspath(path), root=root)
    elif kind == "archive":
        try:
            f = open_regular(path, root)
        except RefusedFile as e:
            yield Skipped(Source(rel, ""), str(e))
            return
        except OSError as e:
            yield Skipped(Source(rel, ""), f"unreadable archive: {e.strerror or e}")
            return
        with f:
            yield from _walk_archive(f, rel, 1, limits, budget)
    else:
        yield Skipped(Source(None, rel), _unsupported(path.name))


def _walk_archive(
    src: BinaryIO, label: str, depth: int, limits: ArchiveLimits, budget: _Budget
) -> Iterator[Candidate | Skipped]:
    if depth > limits.max_depth:
        yield Skipped(Source(label, ""), f"archive nested too deep: more than {limits.max_depth} levels")
        return
    if not src.read(1):
        yield _empty(label)
        return
    src.seek(0)
    # The name decides: content sniffing would take a tar whose last member is a zip for that zip.
    walker = _walk_zip if label.lower().endswith(".zip") else _walk_tar
    yield from walker(src, label, depth, limits, budget)


def _member(
    label: str, name: str, data: bytes, depth: int, limits: ArchiveLimits, budget: _Budget
) -> Iterator[Candidate | Skipped]:
    """A member's bytes, already read: an image candidate, or a nested archive to walk."""
    if classify(name) == "archive":
        yield from _walk_archive(io.BytesIO(data), f"{label}{NESTED_SEPARATOR}{name}", depth + 1, limits, budget)
    else:
        yield Candidate(Source(label, name), name, data=data)


def human_size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _too_big(size: int, limits: ArchiveLimits, budget: _Budget) -> str | None:
    if size > limits.max_member_bytes:
        return f"member too large: {human_size(size)} > {human_size(limits.max_member_bytes)} per-member limit"
    if not budget.take(size):
        return f"archive too large: total decompressed limit of {human_size(limits.max_total_bytes)} reached"
    return None


def _ratio_reason(expanded: int, compressed: int, limits: ArchiveLimits) -> str | None:
    """Why ``compressed`` bytes expanding to ``expanded`` look like a decompression bomb, or None."""
    if expanded <= _RATIO_MIN_BYTES or expanded <= limits.max_ratio * max(compressed, 1):
        return None
    ratio = expanded / max(compressed, 1)
    return f"suspicious compression ratio: {ratio:.0f}:1 > {limits.max_ratio:.0f}:1 (decompression bomb?)"


def _empty(label: str) -> Skipped:
    return Skipped(Source(label, ""), "empty archive: no files in it")


def _walk_zip(
    src: BinaryIO, label: str, depth: int, limits: ArchiveLimits, budget: _Budget
) -> Iterator[Candidate | Skipped]:
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as e:
        yield Skipped(Source(label, ""), f"corrupt archive: {e}")
        return
    with zf:
        files = [info for info in zf.infolist() if not info.is_dir()]
        if not files:
            yield _empty(label)
        for info in files:
            source = Source(label, info.filename)
            if classify(info.filename) is None:
                yield Skipped(source, _unsupported(info.filename))
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                yield Skipped(source, "link member: not followed")
                continue
            if info.flag_bits & 0x1:
                yield Skipped(source, "encrypted member: no password support")
                continue
            reason = _ratio_reason(info.file_size, info.compress_size, limits) or _too_big(info.file_size, limits, budget)
            if reason:
                yield Skipped(source, reason)
                if reason.startswith("archive too large"):
                    return
                continue
            try:
                with zf.open(info) as f:
                    data = f.read(limits.max_member_bytes + 1)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as e:
                yield Skipped(source, f"corrupt member: {e}")
                continue
            if len(data) > limits.max_member_bytes:  # header lied about the size
                yield Skipped(source, f"member too large: > {human_size(limits.max_member_bytes)} per-member limit")
                continue
            yield from _member(label, info.filename, data, depth, limits, budget)


class _Counted:
    """A file whose reads are counted: the compressed bytes behind what a tar stream has given so far."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.count += len(data)
        return data


class _TarStream:
    """A tar's raw bytes (counted) and, for .tar.gz/.bz2/.xz, the decompressed stream tarfile reads.

    A tar header has no compressed size, so the zip header's ratio bound is applied as the stream is
    read: to the archive so far, and to the member being read.
    """

    def __init__(self, src: BinaryIO, limits: ArchiveLimits) -> None:
        self.raw = _Counted(src)
        self.limits = limits
        head = src.read(6)
        src.seek(-len(head), io.SEEK_CUR)
        opener = next((open_ for magic, open_ in _COMPRESSED if head.startswith(magic)), None)
        self.compressed = opener is not None
        self.tar: BinaryIO = opener(self.raw) if opener is not None else self.raw  # type: ignore[assignment]

    def archive_reason(self) -> str | None:
        """Why the archive read so far looks like a bomb, or None."""
        return _ratio_reason(self.tar.tell(), self.raw.count, self.limits) if self.compressed else None

    def member(self, f: BinaryIO, size: int) -> bytes:
        """A member's bytes, read in steps so that a bomb is refused (RefusedFile) before it fills memory."""
        since, chunks, got = self.raw.count, [], 0
        while got < size:
            chunk = f.read(min(_READ_STEP, size - got))
            if not chunk:
                raise RefusedFile(f"truncated member: {got} of {size} bytes")
            chunks.append(chunk)
            got += len(chunk)
            if self.compressed:
                bomb = _ratio_reason(got, self.raw.count - since, self.limits) or self.archive_reason()
                if bomb:
                    raise RefusedFile(f"{bomb}; rest of the archive not read")
        return b"".join(chunks)


def _walk_tar(
    src: BinaryIO, label: str, depth: int, limits: ArchiveLimits, budget: _Budget
) -> Iterator[Candidate | Skipped]:
    count = files = 0
    try:
        stream = _TarStream(src, limits)
        # Stream mode reads each member once, in order.
        with tarfile.open(fileobj=stream.tar, mode="r|") as tf:
            for m in tf:
                count += 1
                source = Source(label, m.name)
                bomb = stream.archive_reason()
                if bomb:
                    yield Skipped(Source(label, ""), f"{bomb}; rest of the archive not read")
                    return
                if m.isdir():
                    continue
                files += 1
                if m.issym() or m.islnk():
                    yield Skipped(source, "link member: not followed")
                    continue
                if not m.isreg():
                    yield Skipped(source, "special member (device, fifo): not read")
                    continue
                if classify(m.name) is None:
                    yield Skipped(source, _unsupported(m.name))
                    continue
                reason = _too_big(m.size, limits, budget)
                if reason:
                    yield Skipped(source, reason)
                    if reason.startswith("archive too large"):
                        return
                    continue
                f = tf.extractfile(m)
                try:
                    data = stream.member(f, m.size) if f is not None else b""
                except RefusedFile as e:
                    yield Skipped(source, str(e))
                    if str(e).startswith("suspicious compression ratio"):
                        return
                    continue
                yield from _member(label, m.name, data, depth, limits, budget)
    except _ARCHIVE_ERRORS as e:
        what = "not a zip or tar archive" if count == 0 else f"archive truncated or corrupt after {count} members"
        yield Skipped(Source(label, ""), f"corrupt archive: {what} ({e})")
        return
    if files == 0:
        yield _empty(label)
