"""The shard set's bookkeeping: ``manifest.json``, the jsonl logs, dedup tables and crash recovery.

Order of writes per completed shard: tar renamed into place → its ``.idx`` → ``samples.jsonl``,
``duplicates.jsonl``, ``skipped.jsonl`` appended → ``manifest.json`` replaced. A run killed between any
two steps leaves a state that :meth:`ShardSet.open` repairs without rewriting a complete shard: stale
temporary files are removed, a torn last jsonl line is cut, and a complete shard the manifest does not
list yet is adopted from its own json components.

Patient identifiers never travel with the shards: CSV columns that name a patient or record are
replaced by a keyed pseudonym (HMAC-SHA256 under a secret kept in the set's ``.local/`` folder, which
also holds the runs' absolute input paths and is never packed), so one patient keeps one id for splits.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path

from dist_cardio.shard.sources import Source
from dist_cardio.shard.writer import (
    PARTIAL_SUFFIX,
    ShardRecord,
    atomic_write_bytes,
    index_name,
    index_text,
    naming,
    read_shard,
    sha256_file,
    shard_name,
)

MANIFEST = "manifest.json"
SAMPLES = "samples.jsonl"
DUPLICATES = "duplicates.jsonl"
SKIPPED = "skipped.jsonl"
LOCK = ".shard.lock"
LOCAL = ".local"  # site-only: the pseudonym secret and the runs' input paths; copy a set without it
SECRET = "secret"
LOCAL_RUNS = "runs.jsonl"
PSEUDONYMISED = ("patient", "patient_id", "ecg_id")  # label CSV columns that identify a person or record
VERSION = 1


class ShardSetError(ValueError):
    """A shard directory that cannot be used as asked; the message names the directory and the fix."""


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def refuse_nesting(inputs: list[Path], out: Path) -> None:
    """ShardSetError when ``out`` lies inside an input or an input inside ``out`` (shards read back as input)."""
    target = os.path.realpath(out)
    for p in inputs:
        real = os.path.realpath(p)
        if _within(target, real):
            raise ShardSetError(f"{out}: --out is inside the input {p}, whose shards would be read back as "
                                "images; pass an --out outside every input")
        if _within(real, target):
            raise ShardSetError(f"{p}: input inside the shard set {out}; pass inputs from outside --out")


def shard_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(prefix)}-(\d{{6,}})\.tar")


def read_manifest(directory: str | Path) -> dict:
    """The parsed ``manifest.json`` of a shard set."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest.json here (not a shard set? create one with `dist-cardio shard`)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardSetError(f"{path}: damaged manifest ({str(e)[:120]}); restore manifest.json from a copy before reading "
                            "or adding to this set") from None
    if not isinstance(manifest, dict):
        raise ShardSetError(f"{path}: damaged manifest (a JSON {type(manifest).__name__}, not an object); restore "
                            "manifest.json from a copy before reading or adding to this set")
    if manifest.get("version") != VERSION:
        raise ShardSetError(f"{path}: manifest version {manifest.get('version')!r}, this dist_cardio reads {VERSION}")
    return manifest


def read_jsonl(path: Path) -> list[dict]:
    """Records of a jsonl log; a torn last line (run killed mid-write) is ignored."""
    if not path.is_file():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line]


def read_samples(directory: str | Path) -> list[dict]:
    """``samples.jsonl`` records (key, shard, label, meta, source) of the shards the manifest lists."""
    listed = {s["name"] for s in read_manifest(directory)["shards"]}
    return [r for r in read_jsonl(Path(directory) / SAMPLES) if r["shard"] in listed]


def _source_key(source: dict) -> tuple[str | None, str]:
    return source.get("archive"), source["path"]


def _append_jsonl(path: Path, records: list[dict], mode: int = 0o644) -> None:
    """Append whole lines or nothing: a failed write (full disk) is cut back off before it is raised."""
    if not records:
        return
    data = memoryview("".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
    with naming(path), open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode), "wb", buffering=0) as f:
        start = f.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[f.write(data):]
            os.fsync(f.fileno())
        except BaseException:
            f.truncate(start)
            raise


def _cut_torn_line(path: Path) -> None:
    if not path.is_file():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)


def _labels_of(label: str | list[str] | None) -> list[str]:
    if label is None:
        return []
    return list(label) if isinstance(label, list) else [label]


class ShardSet:
    """One output directory during a run: holds its lock, dedup tables and pending log records."""

    def __init__(self, out: Path, prefix: str, lock_fd: int, manifest: dict) -> None:
        self.out = out
        self.prefix = prefix
        self._lock_fd = lock_fd
        self.manifest = manifest
        self.seen: dict[str, dict] = {}  # key → source where first seen (earlier runs and this one)
        self._classes: set[str] = set(manifest["classes"])
        self._multilabel: bool = manifest["multilabel"]
        self._dup_ids: set[tuple] = set()
        self._skip_ids: set[tuple] = set()
        self._pending_samples: list[dict] = []
        self._pending_dups: list[dict] = []
        self._pending_skips: list[dict] = []
        self.recovered: list[str] = []
        self._run: dict | None = None
        self._secret = b""

    # --- opening and recovery -------------------------------------------------------------------------
    @classmethod
    def open(cls, out: Path, prefix: str) -> ShardSet:
        out.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise ShardSetError(f"{out}: another `dist-cardio shard` is writing here; wait for it to finish") from None
        try:
            manifest = read_manifest(out) if (out / MANIFEST).is_file() else None
            if manifest is not None and manifest["prefix"] != prefix:
                p = manifest["prefix"]
                raise ShardSetError(f"{out}: holds shards with prefix {p!r}; pass --prefix {p} or another --out")
            state = cls(out, prefix, lock_fd, manifest or _new_manifest(prefix))
            state._recover()
        except BaseException:
            os.close(lock_fd)
            raise
        return state

    def _recover(self) -> None:
        pattern = shard_pattern(self.prefix)
        for p in self.out.iterdir():
            if p.name.startswith(".") and p.name.endswith(PARTIAL_SUFFIX):
                inner = p.name[1 : -len(PARTIAL_SUFFIX)]
                if inner == MANIFEST or pattern.fullmatch(inner) or pattern.fullmatch(inner[: -len(".idx")] + ".tar"):
                    p.unlink()
        for name in (SAMPLES, DUPLICATES, SKIPPED):
            _cut_torn_line(self.out / name)
        pseudonyms = False
        for r in read_jsonl(self.out / SAMPLES):
            self.seen.setdefault(r["key"], r["source"])
            self._note_label(r["label"])
            pseudonyms = pseudonyms or any(r["meta"].get(k) for k in PSEUDONYMISED)
        self._secret = self._load_secret(pseudonyms)
        self._dup_ids = {(r["key"], *_source_key(r["duplicate"])) for r in read_jsonl(self.out / DUPLICATES)}
        self._skip_ids = {(*_source_key(r["source"]), r["reason"]) for r in read_jsonl(self.out / SKIPPED)}

        listed = {s["name"] for s in self.manifest["shards"]}
        for entry in self.manifest["shards"]:
            if not (self.out / entry["index"]).is_file():  # only a user deletes an index: rebuild it
                samples = [c for _, c, _ in read_shard(self.out / entry["name"])]
                atomic_write_bytes(self.out / entry["index"], index_text(samples).encode())
        orphans = sorted(
            (p for p in self.out.iterdir() if pattern.fullmatch(p.name) and p.name not in listed),
            key=lambda p: int(pattern.fullmatch(p.name).group(1)),
        )
        for path in orphans:
            self._adopt(path)
        if orphans or not (self.out / MANIFEST).is_file():
            self._update_manifest()

    def _adopt(self, path: Path) -> None:
        """Add a complete shard left unlisted by a killed run, from its own json components."""
        samples, records = [], []
        try:
            for key, components, data in read_shard(path):
                meta = json.loads(data["json"])
                samples.append(components)
                records.append(
                    {"key": key, "shard": path.name, "label": meta["label"], "meta": meta["meta"], "source": meta["source"]}
                )
        except Exception as e:
            raise ShardSetError(f"{path}: shard not in {MANIFEST} and unreadable ({e}); move it away and re-run") from None
        atomic_write_bytes(path.parent / index_name(path.name), index_text(samples).encode())
        new = [r for r in records if r["key"] not in self.seen]
        _append_jsonl(self.out / SAMPLES, new)
        for r in new:
            self.seen[r["key"]] = r["source"]
            self._note_label(r["label"])
        self.manifest["shards"].append(
            {"name": path.name, "count": len(records), "bytes": path.stat().st_size,
             "sha256": sha256_file(path), "index": index_name(path.name)}
        )
        self.recovered.append(path.name)

    def _load_secret(self, in_use: bool) -> bytes:
        """The set's pseudonym key, made on first use; its loss with pseudonyms in the set is an error."""
        local = self.out / LOCAL
        path = local / SECRET
        if path.is_file():
            return path.read_bytes()
        if in_use:
            raise ShardSetError(f"{path}: missing, but this set holds pseudonymised patient ids; restore it from "
                                "the site's copy (new ids would split one patient's images) or shard into a new --out")
        local.mkdir(mode=0o700, exist_ok=True)
        key = secrets.token_hex(32).encode()
        try:
            with naming(path), open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(key)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return key

    # --- during a run -------------------------------------------------------------------------------
    def pseudonymise(self, meta: dict[str, str]) -> dict[str, str]:
        """``meta`` with patient/record ids replaced by their keyed pseudonyms (equal ids, equal pseudonyms)."""
        def alias(key: str, value: str) -> str:
            return hmac.new(self._secret, f"{key}\0{value}".encode(), hashlib.sha256).hexdigest()[:16]

        return {k: alias(k, v.strip()) if k in PSEUDONYMISED and v.strip() else v for k, v in meta.items()}

    def next_shard_name(self) -> str:
        pattern = shard_pattern(self.prefix)
        used = [int(pattern.fullmatch(s["name"]).group(1)) for s in self.manifest["shards"]]
        return shard_name(self.prefix, max(used, default=-1) + 1)

    def begin_run(self, info: dict, paths: dict) -> None:
        """Record a run in the manifest, and the paths it read (they may name patients) in ``.local/``."""
        _append_jsonl(self.out / LOCAL / LOCAL_RUNS, [{"started": info.get("started"), **paths}], 0o600)
        counters = {"added": 0, "duplicates": 0, "skipped": 0, "shards": [], "recovered": self.recovered}
        self._run = {**info, "finished": None, **counters}
        self.manifest["runs"].append(self._run)

    def add_sample(self, record: dict) -> None:
        """A sample written to the open shard; logged in samples.jsonl once its shard is complete."""
        self.seen[record["key"]] = record["source"]
        self._pending_samples.append(record)

    def note_duplicate(self, key: str, source: Source) -> bool:
        """Record ``source`` as a duplicate of ``key``; False when the same file was recorded before."""
        ident = (key, source.archive, source.path)
        if ident in self._dup_ids:
            return False
        self._dup_ids.add(ident)
        self._pending_dups.append({"key": key, "first_seen": self.seen[key], "duplicate": source.as_dict()})
        return True

    def note_skipped(self, source: Source, reason: str) -> bool:
        """Record a skipped file; False when an earlier run already recorded it for the same reason."""
        ident = (source.archive, source.path, reason)
        if ident in self._skip_ids:
            return False
        self._skip_ids.add(ident)
        self._pending_skips.append({"source": source.as_dict(), "reason": reason})
        return True

    def commit(self, record: ShardRecord, last: bool = False) -> None:
        """After ``record``'s tar and index are in place: log its samples, then rewrite the manifest. With
        ``last`` it also ends the run, as ``finish()`` would, in the same single manifest write."""
        if len(self._pending_samples) != record.count:
            raise RuntimeError(f"{record.name}: {record.count} samples written but {len(self._pending_samples)} pending")
        samples, self._pending_samples = self._pending_samples, []
        for r in samples:
            r["shard"] = record.name
            self._note_label(r["label"])
        self.manifest["shards"].append(record.manifest_entry())
        if self._run is not None:
            self._run["added"] += record.count
            self._run["shards"].append(record.name)
            if last:
                self._run["finished"] = _now()
        self._flush(samples)

    def finish(self) -> None:
        """End of the run: log the remaining duplicates and skips, mark the run finished."""
        if self._pending_samples:
            raise RuntimeError("finish() with samples of an unfinished shard")
        if self._run is not None:
            self._run["finished"] = _now()
        self._flush([])

    def _note_label(self, label: str | list[str] | None) -> None:
        self._classes.update(_labels_of(label))
        self._multilabel = self._multilabel or isinstance(label, list)

    def _flush(self, samples: list[dict]) -> None:
        _append_jsonl(self.out / SAMPLES, samples)
        _append_jsonl(self.out / DUPLICATES, self._pending_dups)
        _append_jsonl(self.out / SKIPPED, self._pending_skips)
        if self._run is not None:
            self._run["duplicates"] += len(self._pending_dups)
            self._run["skipped"] += len(self._pending_skips)
        self._pending_dups, self._pending_skips = [], []
        self._update_manifest()

    def _update_manifest(self) -> None:
        m = self.manifest
        m["classes"] = sorted(self._classes)
        m["multilabel"] = self._multilabel
        m["totals"] = {
            "samples": sum(s["count"] for s in m["shards"]),
            "bytes": sum(s["bytes"] for s in m["shards"]),
            "shards": len(m["shards"]),
            "duplicates": len(self._dup_ids),
            "skipped": len(self._skip_ids),
        }
        atomic_write_bytes(self.out / MANIFEST, (json.dumps(m, indent=1) + "\n").encode())

    @property
    def lock_fd(self) -> int:
        """The descriptor holding the set's lock (a forked worker closes its copy)."""
        return self._lock_fd

    def close(self) -> None:
        os.close(self._lock_fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _new_manifest(prefix: str) -> dict:
    return {
        "version": VERSION,
        "prefix": prefix,
        "shards": [],
        "totals": {"samples": 0, "bytes": 0, "shards": 0, "duplicates": 0, "skipped": 0},
        "classes": [],
        "multilabel": False,
        "runs": [],
    }
