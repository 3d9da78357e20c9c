"""``shard_inputs``: images from folders and archives → deduplicated, incremental WebDataset shards.

Hashing, validation and any re-encoding run in worker processes (``ImagePool``); results come back in
input order and the main process alone writes tars, so the same inputs always give the same shards,
whatever the number of workers. Content already in the set (from ``samples.jsonl`` of earlier runs) is
recognised by hash in the worker before any decode, so re-running on the same archive costs a read and
a hash per file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from dist_cardio.shard.safe_open import RefusedFile, read_regular
from dist_cardio.shard.imagecheck import (BadImage, ImageInfo, ImagePool, ProgressBar, inspect_image, open_image,
                                          worker_count)
from dist_cardio.shard.labels import label_source
from dist_cardio.shard.manifest import ShardSet, ShardSetError, refuse_nesting
from dist_cardio.shard.sources import ArchiveLimits, Candidate, Skipped, walk_input
from dist_cardio.shard.writer import ShardWriter, write_failure

MB = 1_000_000
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ShardConfig:
    """How ``dist-cardio shard`` packs images (CLI flags for the common fields, ``--set`` for all)."""

    prefix: str = "shard"
    """Shard file names: ``{prefix}-{n:06d}.tar``."""
    max_size_mb: float = 1000.0
    """Upper bound on a shard's size (a single larger sample still gets a shard of its own)."""
    max_count: int = 10_000
    """Upper bound on samples per shard."""
    max_side: int | None = None
    """Store a training-resolution copy: long side at most this many pixels (JPEG stays JPEG q90, PNG stays PNG)."""
    labels: str | None = None
    """``folders`` (class = parent folder) or a CSV ``path,label[,extra → meta]``; None: unlabeled."""
    workers: int = 0
    """Processes for hashing/validation/conversion; 0 = one per CPU core (at most 8), 1 = in this process."""
    jpeg_quality: int = 90
    """Quality of re-encoded JPEGs (only with ``max_side``)."""
    max_member_mb: float = 256.0
    """Largest file read, archive member or plain file."""
    max_total_gb: float = 1024.0
    """Most decompressed bytes read from one input (all its nested archives together)."""
    max_ratio: float = 100.0
    """Zip members, and compressed tar streams as read, expanding more than this (beyond 1 MB) are refused as bombs."""
    max_depth: int = 3
    """Deepest archive nesting read (an archive in a folder is depth 1)."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: use letters, digits, '_', '-', '.' (not starting with '.')")
        if self.max_size_mb <= 0 or self.max_member_mb <= 0 or self.max_total_gb <= 0:
            raise ValueError("max_size_mb, max_member_mb and max_total_gb must be > 0")
        if self.max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {self.max_count}")
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side must be >= 16 pixels, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.max_ratio < 1 or self.max_depth < 1:
            raise ValueError("max_ratio and max_depth must be >= 1")

    @property
    def n_workers(self) -> int:
        return worker_count(self.workers)

    @property
    def limits(self) -> ArchiveLimits:
        return ArchiveLimits(
            max_member_bytes=int(self.max_member_mb * MB),
            max_total_bytes=int(self.max_total_gb * 1000 * MB),
            max_ratio=self.max_ratio,
            max_depth=self.max_depth,
        )


# --- per image, in worker processes ------------------------------------------------------------------
@dataclass(frozen=True)
class _Task:
    file: str | None
    root: str | None
    data: bytes | None
    max_bytes: int
    max_side: int | None
    quality: int


@dataclass(frozen=True)
class Prepared:
    """A valid image ready to write: ``payload`` in format ``ext`` (jpg/png) at ``size``."""

    key: str
    sha256: str
    ext: str
    payload: bytes
    original_size: tuple[int, int]
    size: tuple[int, int]


@dataclass(frozen=True)
class Known:
    """Content already in the shard set when the run started."""

    key: str


@dataclass(frozen=True)
class Rejected:
    reason: str


_known_keys: frozenset[str] = frozenset()


def _init_worker(known: frozenset[str]) -> None:
    global _known_keys
    _known_keys = known


def prepare(task: _Task) -> Prepared | Known | Rejected:
    """Read, hash, validate and (if needed) re-encode one image."""
    try:
        data = task.data if task.data is not None else read_regular(task.file, task.max_bytes, task.root)
    except RefusedFile as e:  # a FIFO, device or symlink out of the input folder: named in skipped.jsonl
        return Rejected(str(e))
    except OSError as e:
        return Rejected(f"unreadable: {e.strerror or type(e).__name__}")
    digest = hashlib.sha256(data).hexdigest()
    key = digest[:32]
    if key in _known_keys:
        return Known(key)
    try:
        info = inspect_image(data)
        ext, payload, size = _encode(data, info, task.max_side, task.quality)
    except BadImage as e:
        return Rejected(str(e))
    except Exception as e:  # a decoder failure while re-encoding: the image is unusable either way
        return Rejected(f"undecodable {type(e).__name__}: {e}")
    return Prepared(key, digest, ext, payload, info.size, size)


def _encode(data: bytes, info: ImageInfo, max_side: int | None, quality: int) -> tuple[str, bytes, tuple[int, int]]:
    """JPEG/PNG bytes unchanged unless larger than ``max_side``; anything else converted once to PNG."""
    w, h = info.size
    scale = max_side / max(w, h) if max_side and max(w, h) > max_side else None
    if info.family and scale is None:
        return info.family, data, info.size
    image = open_image(data)
    target = (w, h) if scale is None else (max(1, round(w * scale)), max(1, round(h * scale)))
    # Keep only the EXIF orientation: loaders that honour it see the same picture as from the original,
    # and the rest of EXIF (thumbnails, dates, GPS) stays out of the training copy.
    orientation = image.getexif().get(EXIF_ORIENTATION, 1) if info.family == "jpg" else 1
    exif = Image.Exif()
    if orientation != 1:
        exif[EXIF_ORIENTATION] = orientation
    if info.family == "jpg":
        image.draft(None, target)  # DCT-domain downscale to >= target: most of the work skipped
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        has_alpha = image.mode in ("PA", "RGBa") or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha and info.family != "jpg" else ("L" if image.mode == "1" else "RGB"))
    if image.size != target:
        image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    if info.family == "jpg":
        image.save(buf, format="JPEG", quality=quality, exif=exif)
        return "jpg", buf.getvalue(), image.size
    image.save(buf, format="PNG")
    return "png", buf.getvalue(), image.size


Numbered = tuple[int, Candidate | Skipped]  # (input position, item): console lines name inputs by position


def task_for(c: Candidate, cfg: ShardConfig) -> _Task:
    """What a worker needs to ``prepare`` candidate ``c``."""
    return _Task(c.file, c.root, c.data, cfg.limits.max_member_bytes, cfg.max_side, cfg.jpeg_quality)


def _tasks(inputs: list[Path], cfg: ShardConfig) -> Iterator[tuple[Numbered, _Task | None]]:
    """Every item of every input, in order, with its worker task (None for a skip found while walking)."""
    for position, root in enumerate(inputs, 1):
        for item in walk_input(root, cfg.limits):
            yield (position, item), task_for(item, cfg) if isinstance(item, Candidate) else None


# --- the run ------------------------------------------------------------------------------------------
def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def shard_inputs(inputs: list[Path], out: Path, cfg: ShardConfig) -> dict:
    """Add the images under ``inputs`` to the shard set in ``out``; returns a summary of this run.

    Existing shards are never rewritten: new samples go into new shards, content already present is
    skipped by hash, bad files are listed in ``skipped.jsonl`` with the reason. A failed write (full
    disk, read-only folder) is a ShardSetError naming the file and the fix; it leaves no temporary file
    and the set as it was after its last complete shard.
    """
    inputs = [Path(p) for p in inputs]
    for p in inputs:
        if not p.exists() and not p.is_symlink():
            raise FileNotFoundError(f"{p}: input not found (pass existing folders, images or .zip/.tar archives)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: --out must be a folder (new or a shard set), not a file")
    refuse_nesting(inputs, out)
    labels = label_source(cfg.labels) if cfg.labels else None
    try:
        return _run(inputs, out, cfg, labels)
    except OSError as e:  # only writes raise here: every input that cannot be read is a skip
        raise ShardSetError(write_failure(e, out)) from None


def _run(inputs: list[Path], out: Path, cfg: ShardConfig, labels: Any) -> dict:
    started = time.perf_counter()
    state = ShardSet.open(out, cfg.prefix)
    packer = _Packer(state, out, cfg, labels)
    try:
        _begin_run(state, out, inputs, cfg)
        # The pool before the bar: workers fork only from a process without threads.
        with ImagePool(cfg.workers, _init_worker, (frozenset(state.seen),), private_fds=(state.lock_fd,)) as pool:
            bar = ProgressBar(unit="file", desc=f"shard → {out.name}", disable=not cfg.progress, dynamic_ncols=True)
            try:
                for (position, item), result in pool.ordered(prepare, _tasks(inputs, cfg)):
                    bar.update(1)
                    if packer.take(position, item, result) and packer.counts["added"] % 64 == 0:
                        c = packer.counts
                        bar.set_postfix(added=c["added"], dup=c["duplicates"], skip=c["skipped"], refresh=False)
            finally:
                bar.close()
            pool.release()  # the workers exit while the last shard is written
            packer.flush(last=True)
    except BaseException:
        packer.abort()
        raise
    finally:
        state.close()
    run = state.manifest["runs"][-1]
    return {
        "out": str(out),
        "added": packer.counts["added"],
        "duplicates": packer.counts["duplicates"],
        "already_present": packer.counts["already_present"],
        "skipped": packer.counts["skipped"],
        "skipped_kinds": dict(packer.skipped_kinds),
        "warnings": packer.warnings(),
        "unlabeled": labels.unlabeled if labels is not None else None,
        "shards": run["shards"],
        "recovered": run["recovered"],
        "totals": dict(state.manifest["totals"]),
        "seconds": time.perf_counter() - started,
    }


def _begin_run(state: ShardSet, out: Path, inputs: list[Path], cfg: ShardConfig) -> None:
    """Refuse a second resolution in one set, then record this run (its paths only in the set's ``.local/``)."""
    earlier = {r["max_side"] for r in state.manifest["runs"]}
    if earlier and earlier != {cfg.max_side}:
        raise ShardSetError(f"{out}: built with max_side {earlier.pop()}; pass the same --max-side or another --out "
                            "(one set, one resolution)")
    state.begin_run(
        {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": len(inputs),
            "labels": cfg.labels if cfg.labels in (None, "folders") else "csv",
            "max_side": cfg.max_side,
        },
        {"inputs": [os.path.abspath(p) for p in inputs], "labels": cfg.labels},
    )


class _Packer:
    """Files each worker result: skipped, already present, duplicate, or a new sample in the open shard."""

    def __init__(self, state: ShardSet, out: Path, cfg: ShardConfig, labels: Any) -> None:
        self.state, self.out, self.cfg, self.labels = state, out, cfg, labels
        self.counts: Counter[str] = Counter()
        self.skipped_kinds: Counter[str] = Counter()
        self.empty_archives: Counter[int] = Counter()  # by input position
        self.writer: ShardWriter | None = None
        self.max_bytes = int(cfg.max_size_mb * MB)

    def take(self, position: int, item: Any, result: Any) -> bool:
        """Handle one result of input number ``position``; True when it became a new sample."""
        reason = item.reason if isinstance(item, Skipped) else None
        if isinstance(result, Rejected):
            reason = result.reason
        if reason is not None:
            self.counts["skipped"] += 1
            self.skipped_kinds[_reason_kind(reason)] += 1
            if reason.startswith("empty archive"):
                self.empty_archives[position] += 1
            self.state.note_skipped(item.source, reason)
            return False
        first = self.state.seen.get(result.key)
        if first is not None:
            if first == item.source.as_dict():
                self.counts["already_present"] += 1
            else:
                self.counts["duplicates"] += 1
                self.state.note_duplicate(result.key, item.source)
            return False
        if isinstance(result, Known):
            raise RuntimeError(f"key {result.key} known to the workers but not to the shard set")
        self._add(item, result)
        return True

    def warnings(self) -> list[str]:
        """Lines for the console: inputs by position, file names only in skipped.jsonl."""
        return [f"input {position}: {n} empty archive(s), names in skipped.jsonl"
                for position, n in sorted(self.empty_archives.items())]

    def _add(self, item: Any, result: Any) -> None:
        label, meta = self.labels.lookup(item) if self.labels is not None else (None, {})
        meta = self.state.pseudonymise(meta)
        doc = {
            "key": result.key,
            "sha256": result.sha256,
            "label": label,
            "meta": meta,
            "source": item.source.as_dict(),
            "original_size": list(result.original_size),
            "size": list(result.size),
            "format": result.ext,
        }
        components = [(result.ext, result.payload), ("json", json.dumps(doc, sort_keys=True).encode())]
        w = self.writer
        if w is not None and (w.count >= self.cfg.max_count or w.size_with(components) > self.max_bytes):
            self.flush()
        if self.writer is None:
            self.writer = ShardWriter(self.out, self.state.next_shard_name())
        self.writer.add(result.key, components)
        self.state.add_sample({"key": result.key, "shard": None, "label": label, "meta": meta, "source": doc["source"]})
        self.counts["added"] += 1

    def flush(self, last: bool = False) -> None:
        """Finish the open shard (if any) and commit it to the manifest; with ``last`` also end the run."""
        if self.writer is not None:
            self.state.commit(self.writer.finish(), last=last)
            self.writer = None
        elif last:
            self.state.finish()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
