"""Leak-free splits: duplicates and patients never straddle splits; PTB-XL folds respected."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections import Counter, defaultdict

import numpy as np
import pytest

from dist_cardio.downstream.hospital_data import load_images, read_hospital
from dist_cardio.downstream.page import PageConfig
from dist_cardio.shard.sources import IMAGE_SUFFIXES
from dist_cardio.downstream.splits import SplitConfig, leak_groups, make_split, save_split


def _dataset(seed: int = 0):
    """120 distinct images in 3 imbalanced classes; 25 of them copied 1-4 extra times; some patients repeat."""
    rng = np.random.default_rng(seed)
    hashes, patients, labels = [], [], []
    for i in range(120):
        label = "abc"[0 if i < 60 else 1 if i < 95 else 2]
        copies = 1 + (rng.integers(1, 5) if i % 5 == 0 else 0)
        patient = f"p{i // 3}" if i % 2 else None  # every odd image has a patient shared with a neighbour
        for _ in range(copies):
            hashes.append(f"h{i:04d}")
            patients.append(patient)
            labels.append(label)
    order = rng.permutation(len(hashes))
    return [hashes[k] for k in order], [patients[k] for k in order], [labels[k] for k in order]


def _splits_per(keys, assignment):
    seen = defaultdict(set)
    for k, s in zip(keys, assignment):
        if k is not None:
            seen[k].add(s)
    return seen


def test_duplicates_and_patients_never_straddle_splits():
    hashes, patients, labels = _dataset()
    assert len(hashes) > len(set(hashes)) + 40  # the injected copies are really there
    for seed in range(5):
        split = make_split(SplitConfig(seed=seed), hashes, patients, labels, [None] * len(hashes))
        assert split.mode == "grouped"
        assert all(len(s) == 1 for s in _splits_per(hashes, split.assignment).values())
        assert all(len(s) == 1 for s in _splits_per(patients, split.assignment).values())
        counts = split.counts()
        assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
        # stratified: every class appears in every split, in roughly its overall share
        for name in ("train", "val", "test"):
            share = Counter(labels[i] for i in split.indices(name))
            assert set(share) == {"a", "b", "c"}


def test_groups_are_transitive_over_hash_and_patient():
    # image 0 and 1 share bytes; 1 and 2 share a patient; 3 is alone
    groups = leak_groups(["x", "x", "y", "z"], [None, "p1", "p1", "p2"])
    assert groups[0] == groups[1] == groups[2] != groups[3]


def test_split_is_reproducible_and_seed_dependent():
    hashes, patients, labels = _dataset()
    folds = [None] * len(hashes)
    a = make_split(SplitConfig(seed=3), hashes, patients, labels, folds)
    b = make_split(SplitConfig(seed=3), hashes, patients, labels, folds)
    c = make_split(SplitConfig(seed=4), hashes, patients, labels, folds)
    assert a == b
    assert a.assignment != c.assignment


def test_strat_fold_split_uses_the_folds_and_moves_straddling_groups_whole():
    folds = [1, 2, 8, 9, 10, 3, 9]
    hashes = ["a", "b", "c", "d", "e", "f", "a"]  # "a" sits in fold 1 (train) and fold 9 (val)
    split = make_split(SplitConfig(), hashes, [None] * 7, ["n"] * 7, folds)
    assert split.mode == "strat_fold"
    assert split.assignment == ("val", "train", "train", "val", "test", "train", "val")
    assert split.moved == 1
    with pytest.raises(ValueError, match=r"strat_fold values \[11\]"):
        make_split(SplitConfig(), ["a"], [None], ["n"], [11])


def test_too_few_groups_and_bad_fractions_are_clear_errors():
    with pytest.raises(ValueError, match="too few"):
        make_split(SplitConfig(), ["a", "a", "b"], [None] * 3, ["x"] * 3, [None] * 3)
    with pytest.raises(ValueError, match="val_fraction"):
        SplitConfig(val_fraction=0.0)
    with pytest.raises(ValueError, match="one split only"):
        SplitConfig(train_folds=(1, 2), val_folds=(2,))


def test_saved_split_holds_ids_and_hashes_but_no_patients(tmp_path):
    hashes, patients, labels = _dataset()
    cfg = SplitConfig()
    split = make_split(cfg, hashes, patients, labels, [None] * len(hashes))
    ids = [f"img{i}.png" for i in range(len(hashes))]
    save_split(tmp_path / "split.json", split, ids, hashes, cfg)
    text = (tmp_path / "split.json").read_text()
    assert '"p1"' not in text and "patient" not in text
    doc = json.loads(text)
    assert doc["counts"] == split.counts()
    assert [(i["id"], i["sha256"], i["split"]) for i in doc["items"]] == list(zip(ids, hashes, split.assignment))


def test_real_printouts_with_injected_copies_and_shared_patients(shared_data, tmp_path):
    """The 52 real printouts as a hospital CSV: every third one also filed again under other names (same
    bytes), and pairs of different scans belonging to one patient. No bytes and no patient may straddle."""
    files = sorted(p for p in (shared_data / "ecg-printouts").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    assert len(files) >= 50
    rows = []
    for i, f in enumerate(files):
        label = "abc"[i % 3]
        names = [f.name] + ([f"rescan-{k}-{f.name}" for k in range(1 + i % 4)] if i % 3 == 0 else [])
        for name in names:
            shutil.copy(f, tmp_path / name)
            rows.append({"path": name, "label": label, "patient": f"pt{i // 2}" if i % 5 == 0 else ""})
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    data = read_hospital(tmp_path / "labels.csv")
    loaded = load_images(data.items, PageConfig(mode="none"), 32, progress=False)
    assert not loaded.errors and len(loaded.hashes) == len(rows)
    # the copies hash alike (and the real set itself already holds one byte-identical pair)
    assert len(set(loaded.hashes)) == len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) < len(files)
    for seed in range(3):
        split = make_split(SplitConfig(seed=seed, val_fraction=0.2, test_fraction=0.2), loaded.hashes,
                           [it.patient for it in loaded.items], [it.labels[0] for it in loaded.items],
                           [it.strat_fold for it in loaded.items])
        assert all(len(s) == 1 for s in _splits_per(loaded.hashes, split.assignment).values())
        assert all(len(s) == 1 for s in _splits_per([it.patient for it in loaded.items], split.assignment).values())
        assert min(split.counts().values()) > 0


def test_a_reencoded_copy_is_one_picture_with_its_original(shared_data, tmp_path):
    """The same pixels in other bytes (a PNG saved again at another compression level) count once, as a byte copy
    does, so the copy can never land in test while its original trains."""
    from PIL import Image

    sources = sorted((shared_data / "ecg-printouts").glob("*.png"))[:3]
    for label, source in zip("abc", sources):
        (tmp_path / label).mkdir()
        shutil.copy(source, tmp_path / label / "original.png")
        Image.open(source).save(tmp_path / label / "resaved.png", compress_level=1)
        assert (tmp_path / label / "resaved.png").read_bytes() != source.read_bytes()
    loaded = load_images(read_hospital(tmp_path).items, PageConfig(mode="none"), 64, progress=False)
    assert len(set(loaded.hashes)) == 6 and len(set(loaded.pixels)) == 3
    unique = loaded.unique()
    assert [it.id for it in unique.items] == ["a/original.png", "b/original.png", "c/original.png"]
    assert unique.copies == 3
