"""Loaders over real shards (``dist-cardio shard`` of real printouts and of PTB-XL rendered pages), real DALI
CPU-only pipelines and the torchvision fallback: views, per-rank split in two processes, exact resume,
labels, bad shards, and matching statistics between the two backends."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_cardio.config import ConfigError, load_config
from dist_cardio.data import (
    AugmentConfig,
    LoaderConfig,
    ShardDataError,
    build_torchvision_transform,
    contrastive_loader,
    labeled_loader,
)
from dist_cardio.signals.render import RenderConfig, render_dataset
from dist_cardio.shard import ShardConfig, read_manifest, read_samples, shard_inputs
from dist_cardio.shard.writer import index_text, read_shard

REPO = Path(__file__).resolve().parents[2]
AUG = AugmentConfig(size=64)
BACKENDS = ("dali", "torchvision")


@pytest.fixture(scope="module")
def ptbxl_shards(shared_data: Path, tmp_path_factory) -> Path:
    """48 PTB-XL records rendered at 50 dpi (JPEG), multi-label superclasses, 5 shards (10+10+10+10+8)."""
    work = tmp_path_factory.mktemp("ptbxl")
    render_dataset(shared_data / "ptbxl-500", work / "pages", RenderConfig(dpi=50, format="jpg"), limit=48)
    out = work / "shards"
    shard_inputs([work / "pages" / "images"], out,
                 ShardConfig(labels=str(work / "pages" / "labels.csv"), max_count=10, workers=1, progress=False))
    return out


@pytest.fixture(scope="module")
def printout_shards(shared_data: Path, tmp_path_factory) -> Path:
    """The real printouts (mixed sizes, PNG/JPEG/BMP), single label = their dpi, at most 256 px a side."""
    work = tmp_path_factory.mktemp("printouts")
    src = shared_data / "ecg-printouts"
    with open(src / "ecg-samples-metadata.csv") as f, open(work / "labels.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "label"])
        for row in csv.DictReader(f, delimiter="\t"):
            writer.writerow([row["fname"], row["dpi"]])
    shard_inputs([src], work / "shards",
                 ShardConfig(labels=str(work / "labels.csv"), max_side=256, max_count=16, workers=1, progress=False))
    return work / "shards"


def cfg_for(shards: Path, backend: str, **kw) -> LoaderConfig:
    return LoaderConfig(shards=str(shards), backend=backend, device="cpu", num_threads=1, **{"batch_size": 8, **kw})


def epoch_batches(loader, epoch: int) -> list[tuple]:
    loader.set_epoch(epoch)
    return [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in batch) for batch in loader]


def ranges(aug: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.tensor(aug.mean).view(1, 3, 1, 1), torch.tensor(aug.std).view(1, 3, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


# --- views ---------------------------------------------------------------------------------------------
EVERY_OPTION = AugmentConfig(size=40, rotation=10, hue=0.2, blur_p=0.5, blur_sigma=(1.0, 1.0), hflip_p=0.5, vflip_p=0.5, grayscale_p=0.5,
                             mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.mark.parametrize("aug", [AUG, EVERY_OPTION], ids=["defaults", "every-option"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_views_differ_and_have_configured_shape_dtype_range(ptbxl_shards, backend, aug):
    loader = contrastive_loader(cfg_for(ptbxl_shards, backend), aug, 0, 1)
    assert len(loader) == 48 // 8
    lo, hi = ranges(aug)
    for view1, view2 in loader:
        for v in (view1, view2):
            assert v.shape == (8, 3, aug.size, aug.size) and v.dtype == torch.float32
            assert (v >= lo - 1e-4).all() and (v <= hi + 1e-4).all()
        per_sample = (view1 - view2).abs().mean(dim=(1, 2, 3))
        assert (per_sample > 0.01).all(), per_sample  # independent crops/jitter for every pair


@pytest.mark.parametrize("backend, decode", [("dali", "crop"), ("torchvision", "full")])
def test_other_decode_switches(ptbxl_shards, backend, decode):
    """DALI's fused decode + random crop (the GPU default) and the fallback's full-resolution decode."""
    loader = contrastive_loader(cfg_for(ptbxl_shards, backend, decode=decode), AUG, 0, 1)
    lo, hi = ranges(AUG)
    view1, view2 = next(iter(loader))
    assert view1.shape == view2.shape == (8, 3, 64, 64)
    assert (view1 >= lo - 1e-4).all() and (view1 <= hi + 1e-4).all()
    assert ((view1 - view2).abs().mean(dim=(1, 2, 3)) > 0.01).all()


def test_dali_views_carry_the_page_and_flips_are_off(ptbxl_shards):
    """No augmentation at all (full-page crops): a DALI view is the rendered page resized, like PIL does it."""
    plain = AugmentConfig(size=64, crop_scale=(1.0, 1.0), crop_ratio=(585 / 413, 585 / 413), rotation=0,
                          jitter_p=0, grayscale_p=0)
    loader = labeled_loader(cfg_for(ptbxl_shards, "dali", shuffle=False), plain, 0, 1, ["NORM", "MI", "STTC", "CD", "HYP"],
                            True, train=True)
    images, _, keys = next(iter(loader))
    by_key = {key: data for tar in sorted(ptbxl_shards.glob("*.tar")) for key, _, data in read_shard(tar)}
    reference = build_torchvision_transform(plain, train=False)
    for image, key in zip(images, keys):
        expected = reference(Image.open(io.BytesIO(by_key[key]["jpg"])))
        assert (image - expected).abs().mean() < 0.05  # resampling differs slightly; a wrong image or flip would not


def test_torchvision_transform_eval_and_train(shared_data):
    page = Image.open(shared_data / "ecg-printouts" / "ecg00015.png")  # palette PNG
    aug = AugmentConfig(size=96)
    x = build_torchvision_transform(aug, train=False)(page)
    assert x.shape == (3, 96, 96) and x.dtype == torch.float32
    assert torch.equal(x, build_torchvision_transform(aug, train=False)(page))
    train = build_torchvision_transform(aug, train=True)
    assert not torch.equal(train(page), train(page))


def test_config_ranges_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="never upside down"):
        AugmentConfig(rotation=180)
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="batch_size"):
        LoaderConfig(shards="x", batch_size=0)
    (tmp_path / "data.yaml").write_text("shards: /data/shards\nbatch_size: 16\ndecode: crop\n")
    assert load_config(LoaderConfig, tmp_path / "data.yaml").decode == "crop"
    (tmp_path / "bad.yaml").write_text("shards: x\nbackend: tensorflow\n")
    with pytest.raises(ConfigError, match="backend"):
        load_config(LoaderConfig, tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="reduced"):
        contrastive_loader(LoaderConfig(shards=str(tmp_path), backend="dali", device="cpu", decode="reduced"), AUG, 0, 1)


# --- ranks -------------------------------------------------------------------------------------------
RANK_SCRIPT = """
import json, sys
from dist_cardio.data import AugmentConfig, LoaderConfig, contrastive_loader, labeled_loader
shards, backend, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {}
for batch_size, n_epochs in ((8, 2), (5, 1)):
    cfg = LoaderConfig(shards=shards, backend=backend, device="cpu", batch_size=batch_size, num_threads=1)
    pairs = contrastive_loader(cfg, AugmentConfig(size=32), rank, 2)
    labeled = labeled_loader(cfg, AugmentConfig(size=32), rank, 2, ["NORM", "MI", "STTC", "CD", "HYP"], True, train=True)
    epochs = []
    for epoch in range(n_epochs):
        labeled.set_epoch(epoch)
        epochs.append([keys for _, _, keys in labeled])
    out[batch_size] = {"pairs_len": len(pairs), "pairs_batches": sum(1 for _ in pairs), "len": len(labeled),
                       "epochs": epochs}
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_read_disjoint_parts_covering_the_set(ptbxl_shards, backend):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(ptbxl_shards), backend, str(rank)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    everything = {r["key"] for r in read_samples(ptbxl_shards)}
    assert len(everything) == 48
    for batch_size, per_rank_batches in (("8", 3), ("5", 4)):
        r0, r1 = results[0][batch_size], results[1][batch_size]
        for r in (r0, r1):
            assert r["len"] == r["pairs_len"] == r["pairs_batches"] == per_rank_batches  # equal on both ranks
        for epoch in range(len(r0["epochs"])):
            seen = [[k for batch in r["epochs"][epoch] for k in batch] for r in (r0, r1)]
            assert all(len(batch) == int(batch_size) for r in (r0, r1) for batch in r["epochs"][epoch])
            assert not set(seen[0]) & set(seen[1])
            assert len(set(seen[0])) == len(seen[0]) == len(seen[1]) == per_rank_batches * int(batch_size)
            if batch_size == "8":  # 48 = 2 ranks × 3 batches × 8: the two parts are the whole set
                assert set(seen[0]) | set(seen[1]) == everything
    assert results[0]["8"]["epochs"][0] != results[0]["8"]["epochs"][1]  # reshuffled per epoch


WORKERS_SCRIPT = """
import json, multiprocessing, os, signal, sys, time
from dist_cardio.data import AugmentConfig, LoaderConfig, contrastive_loader
cfg = LoaderConfig(shards=sys.argv[1], backend="torchvision", device="cpu", batch_size=8, num_threads=2)
pairs = contrastive_loader(cfg, AugmentConfig(size=32), 0, 1)
next(iter(pairs))
workers = [p.pid for p in multiprocessing.active_children()]
for pid in workers:
    os.kill(pid, signal.SIGTERM)
time.sleep(1)
print(json.dumps({"workers": workers, "alive": [p.pid for p in multiprocessing.active_children()]}))
"""


def test_torchvision_workers_outlive_sigterm_and_exit_with_the_process(ptbxl_shards):
    """SIGTERM to the process group (preemption) must not kill the workers mid-step, yet a process that ends
    with a loader still open must not wait on them forever (multiprocessing's exit hook terminates, then joins)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", WORKERS_SCRIPT, str(ptbxl_shards)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    pids = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(pids["workers"]) == 2 and sorted(pids["alive"]) == sorted(pids["workers"])
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids["workers"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_reads_every_sample_once_across_uneven_ranks(printout_shards, backend):
    everything = [r["key"] for r in read_samples(printout_shards)]
    assert len(everything) % 2  # 51 samples: parts of 25 and 26
    seen, lengths = [], []
    for rank in (0, 1):
        loader = labeled_loader(cfg_for(printout_shards, backend, batch_size=4), AUG, rank, 2,
                                read_manifest(printout_shards)["classes"], True, train=False)  # one has no label
        batches = [keys for _, _, keys in loader]
        assert len(batches) == len(loader)
        lengths.append([len(b) for b in batches])
        seen += [k for b in batches for k in b]
    assert sorted(seen) == sorted(everything)
    assert lengths == [[4] * 6 + [1], [4] * 6 + [2]]


# --- resume --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_yields_exactly_the_uninterrupted_batches(ptbxl_shards, tmp_path, backend):
    cfg = cfg_for(ptbxl_shards, backend, batch_size=4, shuffle_buffer=16)
    reference = contrastive_loader(cfg, AUG, 1, 2)
    epoch0, epoch1 = epoch_batches(reference, 0), epoch_batches(reference, 1)
    assert len(epoch0) == len(epoch1) == 6

    interrupted = contrastive_loader(cfg, AUG, 1, 2)
    interrupted.set_epoch(0)
    first = []
    for batch in interrupted:
        first.append(batch)
        if len(first) == 2:
            break
    torch.save(interrupted.state_dict(), tmp_path / "state.pt")
    del interrupted

    assert (tmp_path / "state.pt").stat().st_size < 16384  # DALI's reader + operator RNG states: ~5 KB
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = contrastive_loader(cfg, AUG, 1, 2)
    resumed.set_epoch(0)  # what the trainer does before loading the position
    resumed.load_state_dict(state)
    rest = [tuple(t.clone() for t in batch) for batch in resumed]
    for got, want in zip(first + rest, epoch0, strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    resumed.set_epoch(1)
    for got, want in zip(epoch_batches(resumed, 1), epoch1, strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size", [8, 40])
def test_epochs_started_ahead_yield_what_a_fresh_loader_yields(ptbxl_shards, backend, batch_size):
    # Training loaders start the next epoch while the last batch of the current one trains (at batch 40 the
    # 48 pages give one batch per epoch, so every batch is such a last one); that must not change a pixel.
    cfg = cfg_for(ptbxl_shards, backend, batch_size=batch_size, shuffle_buffer=16)
    running = contrastive_loader(cfg, AUG, 0, 1)
    continuous = []
    for _ in range(3):  # as the trainer reads them: each pass continues with the next epoch
        continuous += [tuple(t.clone() for t in batch) for batch in running]
    fresh = []
    for epoch in range(3):
        fresh += epoch_batches(contrastive_loader(cfg, AUG, 0, 1), epoch)
    assert len(fresh) == len(continuous)
    for got, want in zip(continuous, fresh, strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_resume_refuses_other_settings_and_continues_after_a_finished_epoch(ptbxl_shards):
    cfg = cfg_for(ptbxl_shards, "dali")
    loader = contrastive_loader(cfg, AUG, 0, 2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    for other, match in ((cfg_for(ptbxl_shards, "dali", batch_size=4), "batch_size"), (cfg_for(ptbxl_shards, "dali", seed=1), "seed")):
        with pytest.raises(ValueError, match=match):
            contrastive_loader(other, AUG, 0, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        contrastive_loader(cfg, AUG, 0, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="rank"):
        contrastive_loader(cfg, AUG, 1, 2).load_state_dict(state)

    list(it)  # finish epoch 0: the state needs no DALI bytes, and iterating again starts epoch 1
    done = loader.state_dict()
    assert done["engine"] is None and done["position"] == len(loader)
    again = contrastive_loader(cfg, AUG, 0, 2)
    again.load_state_dict(done)
    assert sum(1 for _ in again) == len(loader) and again.epoch == 1


# --- labels --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_multilabel_targets_match_the_shard_json(ptbxl_shards, backend):
    manifest = read_manifest(ptbxl_shards)
    assert manifest["multilabel"]
    classes = ["NORM", "MI", "STTC", "CD", "HYP"]
    expected = {r["key"]: r["label"] for r in read_samples(ptbxl_shards)}
    loader = labeled_loader(cfg_for(ptbxl_shards, backend, batch_size=10), AUG, 0, 1, classes, True, train=False)
    assert len(loader) == 5
    seen = {}
    for images, targets, keys in loader:
        assert images.shape[1:] == (3, 64, 64) and targets.dtype == torch.float32 and targets.shape[1] == 5
        seen.update(zip(keys, targets))
    assert set(seen) == set(expected)  # evaluation: every sample once, partial last batch included
    for key, label in expected.items():
        labels = label if isinstance(label, list) else ([label] if label else [])
        assert seen[key].tolist() == [1.0 if c in labels else 0.0 for c in classes], key
    assert any(isinstance(label, list) for label in expected.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_label_ids_match_the_shard_json_and_keys_select_a_split(printout_shards, backend):
    manifest = read_manifest(printout_shards)
    classes = manifest["classes"]
    assert not manifest["multilabel"] and len(classes) >= 3
    samples = [r for r in read_samples(printout_shards) if r["label"] is not None]
    split = {r["key"] for r in samples[::3]}
    loader = labeled_loader(cfg_for(printout_shards, backend, batch_size=4), AUG, 0, 1, classes, False, train=False,
                            keys=split)
    got = {}
    for images, targets, keys in loader:
        assert targets.dtype == torch.int64
        got.update(zip(keys, targets.tolist()))
    assert set(got) == split
    assert got == {r["key"]: classes.index(r["label"]) for r in samples if r["key"] in split}


# --- bad data ------------------------------------------------------------------------------------------
def foreign_shard(folder: Path, shared_data: Path, damage: bool) -> tuple[Path, str]:
    """A WebDataset tar written with plain tarfile (no manifest) plus its index; returns (tar, damaged key)."""
    folder.mkdir()
    pages = [p for p in sorted((shared_data / "ecg-printouts").glob("*.jpg"))[:8]]
    tar_path = folder / "hospital-000.tar"
    bad_key = ""
    with tarfile.open(tar_path, "w") as tf:
        for i, page in enumerate(pages):
            img = Image.open(page).convert("RGB")
            img.thumbnail((200, 200))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            data = buf.getvalue()
            key = f"scan{i:03d}"
            if damage and i == 5:
                data, bad_key = data[: len(data) // 2], key  # a truncated download
            for ext, payload in (("jpg", data), ("json", json.dumps({"key": key, "label": None}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    (folder / "hospital-000.idx").write_text(index_text([c for _, c, _ in read_shard(tar_path)]))
    return tar_path, bad_key


def test_corrupt_foreign_shard_is_named_before_dali_starts(shared_data, tmp_path):
    tar_path, bad_key = foreign_shard(tmp_path / "foreign", shared_data, damage=True)
    cfg = LoaderConfig(shards=str(tar_path.parent), batch_size=2, backend="dali", device="cpu", num_threads=1)
    with pytest.raises(ShardDataError) as err:
        contrastive_loader(cfg, AUG, 0, 1)
    message = str(err.value)
    assert str(tar_path) in message and bad_key in message and "truncated" in message

    # Unchecked, DALI itself dies mid-epoch: the error still names the shard set, shard and key.
    unchecked = contrastive_loader(replace(cfg, check="never", shuffle=False), AUG, 0, 1)
    with pytest.raises(ShardDataError) as err:
        list(unchecked)
    message = str(err.value)
    assert str(tar_path.parent) in message and tar_path.name in message and bad_key in message


def test_clean_foreign_shard_without_index_is_checked_and_read(shared_data, tmp_path):
    tar_path, _ = foreign_shard(tmp_path / "foreign", shared_data, damage=False)
    (tar_path.parent / "hospital-000.idx").unlink()  # DALI needs one: the loader writes it elsewhere
    for backend in BACKENDS:
        loader = contrastive_loader(cfg_for(tar_path.parent, backend, batch_size=4), AUG, 0, 1)
        assert sum(len(v1) for v1, _ in loader) == 8
    assert sorted(p.name for p in tar_path.parent.iterdir()) == ["hospital-000.tar"]


# --- the two backends agree ----------------------------------------------------------------------------
def test_torchvision_fallback_matches_dali_statistics(printout_shards):
    """Same shards, same config: views of the same size and range, per-channel means within 0.1 (std units)."""
    aug = AugmentConfig(size=48)
    stats = {}
    for backend in BACKENDS:
        loader = contrastive_loader(cfg_for(printout_shards, backend, batch_size=8), aug, 0, 1)
        views = torch.cat([torch.cat(pair) for epoch in range(6) for pair in epoch_batches(loader, epoch)])
        assert views.shape[1:] == (3, 48, 48) and views.dtype == torch.float32
        stats[backend] = (views.mean(dim=(0, 2, 3)), views.std(dim=(0, 2, 3)), views.amin(), views.amax())
    lo, hi = ranges(aug)
    for mean, std, vmin, vmax in stats.values():
        assert vmin >= lo.min() - 1e-4 and vmax <= hi.max() + 1e-4
    (m_d, s_d, *_), (m_t, s_t, *_) = stats["dali"], stats["torchvision"]
    assert (m_d - m_t).abs().max() < 0.1, (m_d, m_t)
    assert (s_d - s_t).abs().max() < 0.1, (s_d, s_t)
    assert np.isclose(float(stats["dali"][3]), float(hi.max()), atol=0.02)  # white paper survives as white
