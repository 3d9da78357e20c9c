"""``verify_shard_set``: re-read a shard set and report every problem by shard and key.

Worth running on shards copied between clusters or made elsewhere: DALI names no file when one image
kills its pipeline, and a wrong ``.idx`` makes it read garbage offsets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from dist_cardio.shard.imagecheck import BadImage, inspect_image
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


def verify_shard_set(directory: str | Path, decode: bool = True, progress: bool = True) -> VerifyReport:
    """Check checksums, ``.idx`` files, the json of every sample, and that every image validates and decodes.

    With ``decode=False`` images get only the structure checks (markers, chunk CRCs, header).
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
    bar = tqdm(total=manifest["totals"]["samples"], unit="img", desc="verify", disable=not progress)
    try:
        for entry in manifest["shards"]:
            _verify_shard(directory, entry, decode, logged, seen, report, bar)
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
    report: VerifyReport, bar: tqdm,
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
    if sha256_file(path) != entry["sha256"]:
        report.add(name, None, "sha256 does not match manifest.json (changed or damaged since written)")
    samples = []
    try:
        for key, components, data in read_shard(path):
            samples.append(components)
            _verify_sample(name, key, data, decode, report)
            if key in seen:
                report.add(name, key, f"key also in {seen[key]}")
            seen[key] = name
            if name not in logged.get(key, []):
                report.add(name, key, "missing from samples.jsonl")
            report.samples += 1
            bar.update(1)
    except Exception as e:  # tarfile raises several types on damaged archives
        report.add(name, None, f"unreadable tar after {len(samples)} samples: {e}")
        return
    if len(samples) != entry["count"]:
        report.add(name, None, f"{len(samples)} samples, manifest says {entry['count']}")
    index = directory / entry["index"]
    if not index.is_file():
        report.add(name, None, f"index {entry['index']} missing")
    elif index.read_text() != index_text(samples):
        report.add(name, None, f"index {entry['index']} does not match the tar (DALI would read wrong offsets)")


def _verify_sample(shard: str, key: str, data: dict[str, bytes], decode: bool, report: VerifyReport) -> None:
    images = [ext for ext in data if ext in IMAGE_EXTS]
    if len(images) != 1 or "json" not in data or len(data) != 2:
        report.add(shard, key, f"components {sorted(data)}, expected one of {IMAGE_EXTS} and json")
        if not images:
            return
    ext = images[0]
    doc: dict = {}
    if "json" in data:
        try:
            doc = json.loads(data["json"])
        except ValueError as e:
            report.add(shard, key, f"json component unreadable: {e}")
    if doc:
        if doc.get("key") != key or not str(doc.get("sha256", "")).startswith(key):
            report.add(shard, key, "json key/sha256 do not match the sample key")
        if doc.get("format") != ext:
            report.add(shard, key, f"json format {doc.get('format')!r} but component is .{ext}")
    try:
        info = inspect_image(data[ext], decode=decode)
    except BadImage as e:
        report.add(shard, key, f"bad image: {e}")
        return
    if info.family != ext:
        report.add(shard, key, f".{ext} component holds {info.format} data")
    if doc and doc.get("size") != list(info.size):
        report.add(shard, key, f"image is {info.size[0]}x{info.size[1]}, json says {doc.get('size')}")
