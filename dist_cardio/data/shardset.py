"""A shard set as the loaders see it: tars, their DALI indexes, which of them were validated, per-rank spans.

Shards written by ``dist-cardio shard`` are listed in ``manifest.json`` and every image in them was
validated at write time. Any other tar set (no manifest, or tars the manifest does not list with their
size) is "foreign": before a pipeline reads it, each image is checked with the shard stage's
``check_image_bytes``, because one undecodable image stops a DALI pipeline with an error that names no
file. A missing or non-``v1.2`` index is rebuilt from the tar into a temporary folder; so are filtered
indexes when only some keys are wanted (DALI reads exactly the samples an index lists).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterable

from tqdm import tqdm

from dist_cardio.shard.imagecheck import check_image_bytes
from dist_cardio.shard.manifest import read_manifest
from dist_cardio.shard.writer import Component, index_name, index_text, read_shard, split_member_name

IMAGE_EXTS = ("jpg", "jpeg", "png")
"""Image components a sample may carry (DALI decodes these on CPU and GPU)."""
INDEX_HEADER = "v1.2"


class ShardDataError(ValueError):
    """Shards the loader cannot read; the message names the shard set, the shard and the key where known."""


@dataclass(frozen=True)
class Sample:
    """One sample of a shard: its key, the shard's position in ``ShardView.tars``, image and json members."""

    key: str
    shard: int
    image: Component
    json: Component | None


@dataclass
class ShardView:
    """The tars of a shard directory (in manifest order), their indexes and sample counts."""

    root: Path
    tars: list[Path]
    indexes: list[Path]
    counts: list[int]
    validated: list[bool]
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def samples(self, shard: int) -> list[Sample]:
        """The samples of tar ``shard`` as its index lists them."""
        return parse_index(self.indexes[shard], shard, self.tars[shard])

    def all_samples(self) -> list[Sample]:
        return [s for i in range(len(self.tars)) for s in self.samples(i)]

    def read(self, component: Component, shard: int) -> bytes:
        """Bytes of one member, read at the offset the index gives (no tar walking, no extraction)."""
        with open(self.tars[shard], "rb") as f:
            return os.pread(f.fileno(), component.size, component.offset)

    def scratch(self) -> Path:
        """A private temporary folder for generated indexes, removed with this object."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dist-cardio-idx-")
        return Path(self._tmp.name)

    def select(self, keys: Collection[str]) -> ShardView:
        """Only the samples whose key is in ``keys`` (e.g. one fine-tuning split), via filtered indexes."""
        wanted = set(keys)
        found: set[str] = set()
        tars, indexes, counts, validated = [], [], [], []
        out = self.scratch()
        for i, tar in enumerate(self.tars):
            kept = [s for s in self.samples(i) if s.key in wanted]
            found.update(s.key for s in kept)
            if not kept:
                continue
            index = out / f"select-{i:06d}-{index_name(tar.name)}"
            index.write_text(index_text([(s.image, s.json) if s.json else (s.image,) for s in kept]))
            tars.append(tar)
            indexes.append(index)
            counts.append(len(kept))
            validated.append(self.validated[i])
        missing = wanted - found
        if missing:
            example = sorted(missing)[0]
            raise ShardDataError(f"{self.root}: {len(missing)} of the {len(wanted)} requested keys are not in this shard set "
                                 f"(e.g. {example}); pass keys from its samples.jsonl")
        return ShardView(self.root, tars, indexes, counts, validated, self._tmp)

    def check(self, shards: Iterable[int], need_json: bool, progress: bool = True) -> None:
        """Decode-check every image of ``shards``; raises ShardDataError naming the first bad shard and key."""
        shards = list(shards)
        bar = tqdm(total=sum(self.counts[i] for i in shards), unit="img", desc=f"check {self.root.name}",
                   disable=not progress, leave=False)
        try:
            for i in shards:
                for sample in self.samples(i):
                    problem = self.problem(sample, need_json)
                    if problem:
                        raise ShardDataError(
                            f"{self.tars[i]}: sample {sample.key}: {problem}. These shards are not listed in a "
                            "manifest.json of `dist-cardio shard` (not validated when written); remove the sample, "
                            "or re-shard the images with `dist-cardio shard`, which skips bad ones"
                        )
                    bar.update(1)
        finally:
            bar.close()

    def problem(self, sample: Sample, need_json: bool) -> str | None:
        """Why DALI could not read ``sample`` (bad image, missing json), or None."""
        if need_json and sample.json is None:
            return "no json component (labels and keys come from it)"
        try:
            data = self.read(sample.image, sample.shard)
        except OSError as e:
            return f"unreadable: {e}"
        if len(data) != sample.image.size:
            return f"{sample.image.name} runs past the end of the tar (index offsets wrong or tar truncated)"
        return check_image_bytes(data, sample.image.name)

    def first_problem(self, shards: Iterable[int], need_json: bool) -> str | None:
        """``shard: key: reason`` of the first unreadable sample in ``shards`` (used after a DALI failure)."""
        for i in shards:
            for sample in self.samples(i):
                problem = self.problem(sample, need_json)
                if problem:
                    return f"{self.tars[i].name}: sample {sample.key}: {problem}"
        return None


def open_shard_set(root: str | Path) -> ShardView:
    """The tars under ``root``: the manifest's list when there is one, else every ``*.tar`` (foreign set)."""
    root = Path(root)
    if not root.is_dir():
        raise ShardDataError(f"{root}: shard folder not found (pass the --out folder of `dist-cardio shard`)")
    listed: dict[str, dict] = {}
    if (root / "manifest.json").is_file():
        listed = {entry["name"]: entry for entry in read_manifest(root)["shards"]}
        names = list(listed)
    else:
        names = sorted(p.name for p in root.glob("*.tar") if not p.name.startswith("."))
    shard_set = ShardView(root, [], [], [], [])
    for name in names:
        tar = root / name
        if not tar.is_file():
            raise ShardDataError(f"{tar}: listed in {root / 'manifest.json'} but missing; run `dist-cardio verify {root}`")
        entry = listed.get(name)
        index = root / (entry["index"] if entry else index_name(name))
        if not _usable_index(index):
            index = _rebuild_index(tar, shard_set.scratch())
        shard_set.tars.append(tar)
        shard_set.indexes.append(index)
        shard_set.counts.append(_index_count(index))
        shard_set.validated.append(entry is not None and entry["bytes"] == tar.stat().st_size)
    if not shard_set.total:
        raise ShardDataError(f"{root}: no samples (no manifest.json listing shards and no *.tar files); "
                             "create a shard set with `dist-cardio shard`")
    return shard_set


def rank_span(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous part of ``n`` samples: the split DALI readers make."""
    return n * rank // world_size, n * (rank + 1) // world_size


def parse_index(index: Path, shard: int, tar: Path) -> list[Sample]:
    lines = index.read_text().splitlines()
    samples = []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts:
            continue
        if len(parts) % 4:
            raise ShardDataError(f"{index}:{number}: expected 'ext offset size name' groups; rebuild it with wds2idx")
        members = [Component(parts[j], int(parts[j + 1]), int(parts[j + 2]), parts[j + 3]) for j in range(0, len(parts), 4)]
        images = [c for c in members if c.ext in IMAGE_EXTS]
        key = split_member_name(members[0].name)[0]
        if len(images) != 1:
            raise ShardDataError(f"{tar}: sample {key}: components {sorted(c.ext for c in members)}, expected exactly "
                                 f"one image ({', '.join(IMAGE_EXTS)}); remove the sample or re-shard")
        meta = [c for c in members if c.ext == "json"]
        samples.append(Sample(key, shard, images[0], meta[0] if meta else None))
    return samples


def _usable_index(index: Path) -> bool:
    if not index.is_file():
        return False
    with open(index) as f:
        head = f.readline().split()
        first = f.readline().split()
    return len(head) == 2 and head[0] == INDEX_HEADER and len(first) % 4 == 0


def _index_count(index: Path) -> int:
    with open(index) as f:
        return int(f.readline().split()[1])


def _rebuild_index(tar: Path, out: Path) -> Path:
    """A ``v1.2`` index for ``tar`` written into ``out`` (the shard folder may be read-only)."""
    try:
        samples = [components for _, components, _ in read_shard(tar)]
    except Exception as e:  # tarfile raises several types on damaged archives
        raise ShardDataError(f"{tar}: not a readable tar ({e}); re-create it with `dist-cardio shard`") from None
    index = out / index_name(tar.name)
    index.write_text(index_text(samples))
    return index
