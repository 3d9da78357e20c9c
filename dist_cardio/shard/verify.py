"""``verify_shard_set``: re-read a shard set and report every problem by shard and key.

Worth running on shards copied between clusters or made elsewhere: DALI names no file when one image
kills its pipeline, and a wrong ``.idx`` makes it read garbage offsets. The main process reads each tar in
order; checksums and sample checks run in worker processes (``ImagePool``) and come back in that order,
so the report is the same whatever the number of workers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dist_cardio.shard.imagecheck import BadImage, ImagePool, ProgressBar, inspect_image
from dist_cardio.shard.manifest import SAMPLES, read_jsonl, read_manifest, shard_pattern
from dist_cardio.shard.writer import PARTIAL_SUFFIX, index_text, read_shard, sha256_file

IMAGE_EXTS = ("jpg", "png")


@dataclass(frozen=True)
class Problem:
    shard: str | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = " ".join(x for x in (self.shard, f"key {self.key}" if self.key else None) if x)
        return f"{where}: {self.message}" if where else self.message


@dataclass
class VerifyReport:
    """What was checked and what is wrong; ``ok`` when nothing is."""

    directory: str
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, shard: str | None, key: str | None, message: str) -> None:
        self.problems.append(Problem(shard, key, message))

    def text(self, max_problems: int = 50) -> str:
        head = f"{self.directory}: {self.shards} shards, {self.samples} samples, {self.bytes / 1e6:.1f} MB checked"
        lines = [head + (": OK" if self.ok else f": {len(self.problems)} problem(s)")]
        lines += [f"  {p}" for p in self.problems[:max_problems]]
        if len(self.problems) > max_problems:
            lines.append(f"  ... and {len(self.problems) - max_problems} more")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify_shard_set(
    directory: str | Path, decode: bool = True, progress: bool = True, workers: int = 0
) -> VerifyReport:
    """Check checksums, ``.idx`` files, the json of every sample, and that every image validates and decodes.

    With ``decode=False`` images get only the structure checks (markers, chunk CRCs, header). ``workers``:
    processes for checksums and sample checks; 0 = one per CPU core (at most 8), 1 = in this process.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory}: not a directory (pass the --out folder of `dist-cardio shard`)")
    report = VerifyReport(str(directory))
    manifest = read_manifest(directory)
    listed = {s["name"] for s in manifest["shards"]}
    on_disk = {p.name for p in directory.iterdir() if shard_pattern(manifest["prefix"]).fullmatch(p.name)}
    for name in sorted(on_disk - listed):
        report.add(name, None, "shard not listed in manifest.json (a killed run? re-run `dist-cardio shard` to adopt it)")
    partial = sorted(p.name for p in directory.iterdir() if p.name.endswith(PARTIAL_SUFFIX))
    if partial:
        report.notes.append(f"{len(partial)} temporary file(s) from a killed run; the next `dist-cardio shard` removes them")

    logged: dict[str, list[str]] = {}
    for r in read_jsonl(directory / SAMPLES):
        logged.setdefault(r["key"], []).append(r["shard"])
    for key, shards in logged.items():
        if len(shards) > 1:
            report.add(None, key, f"listed {len(shards)} times in samples.jsonl ({', '.join(shards)})")

    seen: dict[str, str] = {}
    with ImagePool(workers) as pool:  # before the bar: workers fork only from a process without threads
        bar = ProgressBar(total=manifest["totals"]["samples"], unit="img", desc="verify", disable=not progress)
        try:
            for entry in manifest["shards"]:
                _verify_shard(directory, entry, decode, logged, seen, report, bar, pool)
        finally:
            bar.close()

    for key, shards in logged.items():
        if key not in seen:
            report.add(shards[0], key, "in samples.jsonl but not in any shard")
    totals = manifest["totals"]
    if totals["samples"] != sum(s["count"] for s in manifest["shards"]) or totals["shards"] != len(manifest["shards"]):
        report.add(None, None, "manifest totals do not add up to its shard list")
    return report


def _verify_shard(
    directory: Path, entry: dict, decode: bool, logged: dict[str, list[str]], seen: dict[str, str],
    report: VerifyReport, bar: ProgressBar, pool: ImagePool,
) -> None:
    name = entry["name"]
    path = directory / name
    if not path.is_file():
        report.add(name, None, "listed in manifest.json but missing")
        return
    report.shards += 1
    size = path.stat().st_size
    report.bytes += size
    if size != entry["bytes"]:
        report.add(name, None, f"size {size} bytes, manifest says {entry['bytes']}")
    samples: list[tuple] = []
    unreadable: list[str] = []

    def tasks() -> Iterator[tuple[str | None, Path | _Sample]]:
        yield None, path  # the checksum, in a worker beside the image checks
        try:
            for key, components, data in read_shard(path):
                samples.append(components)
                yield key, _Sample(key, data, decode)
        except Exception as e:  # tarfile raises several types on damaged archives
            unreadable.append(f"unreadable tar after {len(samples)} samples: {e}")

    for key, result in pool.ordered(_check, tasks()):
        if key is None:
            if result != entry["sha256"]:
                report.add(name, None, "sha256 does not match manifest.json (changed or damaged since written)")
            continue
        for message in result:
            report.add(name, key, message)
        if key in seen:
            report.add(name, key, f"key also in {seen[key]}")
        seen[key] = name
        if name not in logged.get(key, []):
            report.add(name, key, "missing from samples.jsonl")
        report.samples += 1
        bar.update(1)
    if unreadable:
        report.add(name, None, unreadable[0])
        return
    if len(samples) != entry["count"]:
        report.add(name, None, f"{len(samples)} samples, manifest says {entry['count']}")
    index = directory / entry["index"]
    if not index.is_file():
        report.add(name, None, f"index {entry['index']} missing")
    elif index.read_text() != index_text(samples):
        report.add(name, None, f"index {entry['index']} does not match the tar (DALI would read wrong offsets)")


# --- in worker processes -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sample:
    key: str
    data: dict[str, bytes]
    decode: bool


def _check(task: Path | _Sample) -> str | list[str]:
    """A shard's sha256, or what is wrong with one sample."""
    if isinstance(task, Path):
        return sha256_file(task)
    return _sample_problems(task.key, task.data, task.decode)


def _sample_problems(key: str, data: dict[str, bytes], decode: bool) -> list[str]:
    problems: list[str] = []
    images = [ext for ext in data if ext in IMAGE_EXTS]
    if len(images) != 1 or "json" not in data or len(data) != 2:
        problems.append(f"components {sorted(data)}, expected one of {IMAGE_EXTS} and json")
        if not images:
            return problems
    ext = images[0]
    doc: dict = {}
    if "json" in data:
        try:
            doc = json.loads(data["json"])
        except ValueError as e:
            problems.append(f"json component unreadable: {e}")
        if not isinstance(doc, dict):
            problems.append(f"json component is a {type(doc).__name__}, not an object")
            doc = {}
    if doc:
        if doc.get("key") != key or not str(doc.get("sha256", "")).startswith(key):
            problems.append("json key/sha256 do not match the sample key")
        if doc.get("format") != ext:
            problems.append(f"json format {doc.get('format')!r} but component is .{ext}")
    try:
        info = inspect_image(data[ext], decode=decode)
    except BadImage as e:
        problems.append(f"bad image: {e}")
        return problems
    if info.family != ext:
        problems.append(f".{ext} component holds {info.format} data")
    if doc and doc.get("size") != list(info.size):
        problems.append(f"image is {info.size[0]}x{info.size[1]}, json says {doc.get('size')}")
    return problems
