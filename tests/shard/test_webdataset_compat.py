"""The reference `webdataset` library reads every sample of a set written by `dist-cardio shard`, including
shards appended by a later run: same count, keys, image bytes, json and labels as the set's own records."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from dist_cardio.cli import main
from dist_cardio.shard import read_manifest, read_samples
from dist_cardio.shard.writer import read_shard

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def _labels_csv(path: Path, names: list[str]) -> dict[str, str | list[str]]:
    """A labels CSV for `names`: every third image multi-label ('MI;STTC'); returns name → expected label."""
    expected: dict[str, str | list[str]] = {}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "site"])
        for i, name in enumerate(names):
            label = "MI;STTC" if i % 3 == 0 else ("NORM" if i % 3 == 1 else "CD")
            writer.writerow([name, label, f"site-{i % 2}"])
            expected[name] = label.split(";") if ";" in label else label
    return expected


def _keys(files: list[Path]) -> set[str]:
    """Sample keys of distinct contents (the shared printouts hold byte-identical copies)."""
    return {hashlib.sha256(p.read_bytes()).hexdigest()[:32] for p in files}


@pytest.fixture(scope="module")
def shard_set(shared_data: Path, tmp_path_factory) -> dict:
    """Two `dist-cardio shard` runs: a folder of real printouts, then a tar appending new ones (plus a duplicate)."""
    tmp = tmp_path_factory.mktemp("wds")
    files = sorted(p for p in (shared_data / "ecg-printouts").iterdir() if p.suffix.lower() in SUFFIXES)
    first, later = files[:24], files[24:34]
    folder = tmp / "scans"
    folder.mkdir()
    for p in first:
        shutil.copy(p, folder / p.name)
    labels = _labels_csv(tmp / "first.csv", [p.name for p in first])
    out = tmp / "shards"
    assert main(["shard", str(folder), "--out", str(out), "--labels", str(tmp / "first.csv"), "--max-count", "7",
                 "--workers", "1", "--no-progress"]) == 0
    before = [s["name"] for s in read_manifest(out)["shards"]]

    archive = tmp / "more.tar"
    with tarfile.open(archive, "w") as tf:
        for p in later + [first[0]]:  # the last one is already in the set: a duplicate, not a new sample
            tf.add(p, arcname=f"more/{p.name}")
    labels |= _labels_csv(tmp / "later.csv", [p.name for p in later])
    assert main(["shard", str(archive), "--out", str(out), "--labels", str(tmp / "later.csv"), "--max-count", "7",
                 "--workers", "1", "--no-progress"]) == 0
    return {"out": out, "first_shards": before, "labels": labels, "originals": {p.name: p.read_bytes() for p in files},
            "keys": _keys(first + later), "appended": len(_keys(later) - _keys(first))}


def _wds_samples(out: Path) -> list[dict]:
    urls = [str(out / s["name"]) for s in read_manifest(out)["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=True))


def test_webdataset_reads_every_sample_of_both_runs(shard_set):
    out = shard_set["out"]
    manifest = read_manifest(out)
    shards = [s["name"] for s in manifest["shards"]]
    assert shards[: len(shard_set["first_shards"])] == shard_set["first_shards"] and len(shards) > len(shard_set["first_shards"])
    samples = _wds_samples(out)
    records = read_samples(out)
    assert len(samples) == manifest["totals"]["samples"] == len(records) == len(shard_set["keys"])
    assert [s["__key__"] for s in samples] == [r["key"] for r in records]
    assert set(r["key"] for r in records) == shard_set["keys"]
    assert [Path(s["__url__"]).name for s in samples] == [r["shard"] for r in records]
    # the appended run is read like the first: the samples of its shard(s) are there, after the first run's
    appended = [s for s in samples if Path(s["__url__"]).name not in shard_set["first_shards"]]
    assert len(appended) == shard_set["appended"] > 0


def test_webdataset_sees_the_bytes_json_and_labels_the_set_holds(shard_set):
    out = shard_set["out"]
    ours = {key: parts for s in read_manifest(out)["shards"] for key, _, parts in read_shard(out / s["name"])}
    for sample in _wds_samples(out):
        key = sample["__key__"]
        image_ext = "jpg" if "jpg" in sample else "png"
        components = {k for k in sample if not k.startswith("__")}
        assert components == {image_ext, "json"}, components
        assert sample[image_ext] == ours[key][image_ext] and sample["json"] == ours[key]["json"]
        meta = json.loads(sample["json"])
        assert meta["key"] == key and meta["format"] == image_ext
        name = Path(meta["source"]["path"]).name
        assert meta["label"] == shard_set["labels"][name] and meta["meta"]["site"] in ("site-0", "site-1")
        original = shard_set["originals"][name]
        if name.lower().endswith(".bmp"):  # converted once to PNG: same pixels, PNG bytes
            assert image_ext == "png"
            with Image.open(io.BytesIO(original)) as a, Image.open(io.BytesIO(sample["png"])) as b:
                assert a.convert("RGB").tobytes() == b.convert("RGB").tobytes()
        else:  # JPEG and PNG are stored as they came
            assert sample[image_ext] == original


def test_webdataset_decode_pipeline(shard_set):
    """What a user of the library writes: decode to PIL, tuples of (key, image, json)."""
    urls = [str(shard_set["out"] / s["name"]) for s in read_manifest(shard_set["out"])["shards"]]
    pipeline = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg;png", "json")
    keys = []
    for key, image, meta in pipeline:
        assert isinstance(image, Image.Image) and list(image.size) == meta["size"] and meta["key"] == key
        keys.append(key)
    assert sorted(keys) == sorted(shard_set["keys"])
