"""Walk folders and (nested) zip/tar archives safely, yielding image candidates and skip records.

Archive members are read into memory and never extracted: a member name like ``../../etc/x.png`` is
only provenance metadata. Reads are bounded (per member, per input in total, compression ratio,
nesting depth) so a zip bomb or a huge member is skipped with a reason instead of filling memory.
Plain files are not read here: the worker that hashes and validates them reads them in parallel.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"})
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
NESTED_SEPARATOR = "!"  # archive provenance of nested archives: outer.zip!inner/part.tar
_RATIO_MIN_BYTES = 1 << 20  # compression ratios of tiny members say nothing


@dataclass(frozen=True)
class Source:
    """Where a file came from: ``archive`` (None for plain files, ``a.zip!b.tar`` when nested) and ``path``."""

    archive: str | None
    path: str

    def as_dict(self) -> dict[str, str | None]:
        return {"archive": self.archive, "path": self.path}


@dataclass(frozen=True)
class Candidate:
    """A file that should be an image: bytes already read (archive member) or a ``file`` to read.

    ``rel`` is its path inside its container (input folder or innermost archive), used for labels.
    """

    source: Source
    rel: str
    data: bytes | None = None
    file: str | None = None


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


def iter_inputs(inputs: list[Path], limits: ArchiveLimits, exclude: Path | None = None) -> Iterator[Candidate | Skipped]:
    """Everything under ``inputs`` in a deterministic order (sorted folders, archive order).

    ``exclude`` (the output folder) is never walked into: shards inside an input folder are not input.
    """
    skip = exclude.resolve() if exclude is not None else None
    for root in inputs:
        budget = _Budget(limits.max_total_bytes)
        if root.is_dir():
            yield from _walk_folder(root, limits, budget, skip)
        else:
            yield from _one_file(root, root.name, limits, budget)


def _walk_folder(
    root: Path, limits: ArchiveLimits, budget: _Budget, skip: Path | None
) -> Iterator[Candidate | Skipped]:
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        if skip is not None and base.resolve() == skip:
            dirnames[:] = []
            continue
        for d in list(dirnames):
            if (base / d).is_symlink():
                yield Skipped(Source(None, os.path.abspath(base / d)), "symlinked folder not followed")
        dirnames[:] = sorted(d for d in dirnames if not (base / d).is_symlink())
        for name in sorted(filenames):
            path = base / name
            yield from _one_file(path, path.relative_to(root).as_posix(), limits, budget)


def _one_file(path: Path, rel: str, limits: ArchiveLimits, budget: _Budget) -> Iterator[Candidate | Skipped]:
    kind = classify(path.name)
    where = os.path.abspath(path)
    if kind == "image":
        yield Candidate(Source(None, where), rel, file=where)
    elif kind == "archive":
        try:
            yield from _walk_archive(path, where, 1, limits, budget)
        except OSError as e:
            yield Skipped(Source(where, ""), f"unreadable archive: {e.strerror or e}")
    else:
        yield Skipped(Source(None, where), _unsupported(path.name))


def _walk_archive(
    src: Path | bytes, label: str, depth: int, limits: ArchiveLimits, budget: _Budget
) -> Iterator[Candidate | Skipped]:
    if depth > limits.max_depth:
        yield Skipped(Source(label, ""), f"archive nested too deep: more than {limits.max_depth} levels")
        return
    # The name decides: content sniffing would take a tar whose last member is a zip for that zip.
    walker = _walk_zip if label.lower().endswith(".zip") else _walk_tar
    yield from walker(io.BytesIO(src) if isinstance(src, bytes) else src, label, depth, limits, budget)


def _member(
    label: str, name: str, data: bytes, depth: int, limits: ArchiveLimits, budget: _Budget
) -> Iterator[Candidate | Skipped]:
    """A member's bytes, already read: an image candidate, or a nested archive to walk."""
    if classify(name) == "archive":
        yield from _walk_archive(data, f"{label}{NESTED_SEPARATOR}{name}", depth + 1, limits, budget)
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


def _walk_zip(
    src: Path | io.BytesIO, label: str, depth: int, limits: ArchiveLimits, budget: _Budget
) -> Iterator[Candidate | Skipped]:
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as e:
        yield Skipped(Source(label, ""), f"corrupt archive: {e}")
        return
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            source = Source(label, info.filename)
            kind = classify(info.filename)
            if kind is None:
                yield Skipped(source, _unsupported(info.filename))
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                yield Skipped(source, "link member: not followed")
                continue
            if info.flag_bits & 0x1:
                yield Skipped(source, "encrypted member: no password support")
                continue
            if (
                info.file_size > _RATIO_MIN_BYTES
                and info.file_size > limits.max_ratio * max(info.compress_size, 1)
            ):
                ratio = info.file_size / max(info.compress_size, 1)
                yield Skipped(source, f"suspicious compression ratio: {ratio:.0f}:1 > {limits.max_ratio:.0f}:1 (zip bomb?)")
                continue
            reason = _too_big(info.file_size, limits, budget)
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


def _walk_tar(
    src: Path | io.BytesIO, label: str, depth: int, limits: ArchiveLimits, budget: _Budget
) -> Iterator[Candidate | Skipped]:
    count = 0
    raw = open(src, "rb") if isinstance(src, Path) else src  # OSError here: unreadable, not corrupt
    try:
        # Stream mode reads each member once, in order, also through gzip/bz2/xz.
        with raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
            for m in tf:
                count += 1
                source = Source(label, m.name)
                if m.isdir():
                    continue
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
                data = f.read() if f is not None else b""
                if len(data) != m.size:
                    yield Skipped(source, f"truncated member: {len(data)} of {m.size} bytes")
                    continue
                yield from _member(label, m.name, data, depth, limits, budget)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        what = "not a zip or tar archive" if count == 0 else f"archive truncated or corrupt after {count} members"
        yield Skipped(Source(label, ""), f"corrupt archive: {what} ({e})")
