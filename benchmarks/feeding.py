"""Is the step fed? The real cpu-small pretraining loop on real shards, the loader alone, the model alone,
and the fine-tuning loop beside its model alone; used by ``benchmarks/train.py`` (section "feeding").

- ``data_wait_share``: of the wall time of the real ``dist-cardio pretrain`` loop (shipped ``cpu-small.yaml``, one
  process, its own loader), the share spent waiting for the next batch, over the steps after the first
  ``WARM`` (the first batch waits for the pipeline to start). Read from the run's own ``metrics.jsonl``
  (``data_s`` / ``step_s`` per step), so it is what a user's progress line shows.
- ``loader_images_per_s``: the same loader alone (no model), samples (pairs of views) per second over a fixed
  number of batches after one warm-up batch, across as many epochs as that takes.
- ``model_only_images_per_s`` (``train.py``'s ``throughput``): the same step on in-memory tensors (no loader).
- Fine-tuning: one pass of the real fine-tuning step (``finetune_loop._train_epoch``: AdamW, cpu-small
  classifier, batch 16) over the decoded-once page cache through the fine-tuning transform, against the
  same step on in-memory tensors: ``finetune_data_ratio`` = fed ÷ model only.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dist_cardio.commands.demo import MAX_SIDE, RENDER, build_shards, render_printouts
from dist_cardio.data import contrastive_loader
from dist_cardio.signals.records import SAMPLE_PTBXL
from dist_cardio.train.pretrain import load_pretrain_config

from batch_timing import timed  # benchmarks/ is the script's own folder

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs" / "pretrain" / "cpu-small.yaml"
FINETUNE = REPO / "configs" / "finetune" / "cpu-small.yaml"
PRINTOUTS = REPO.parent / "shared" / "data" / "ecg-printouts"
WARM = 2
"""Steps left out of data_wait_share: the first batches wait for the pipeline (and its workers) to start."""


def shard_sets(work: Path, workers: int) -> dict[str, Path]:
    """``ptbxl-pages``: the built-in 200 PTB-XL records rendered as the demo does and sharded at ``--max-side``
    (the README's path, labelled); ``printouts``: the real printouts and scans as they are (full size, no
    ``--max-side``), when ``../shared/data`` is there."""
    pages = work / "pages"
    render_printouts(SAMPLE_PTBXL, pages, RENDER, workers=workers)
    sets = {"ptbxl-pages": work / "shards-pages"}
    build_shards([pages / "images"], sets["ptbxl-pages"], labels=pages / "labels.csv", workers=workers,
                 max_side=MAX_SIDE, progress=False)
    if PRINTOUTS.is_dir():
        sets["printouts"] = work / "shards-printouts"
        build_shards([PRINTOUTS], sets["printouts"], workers=workers, progress=False)
    return sets


def loader_rate(shards: Path, batches: int, overrides: tuple[str, ...] = ()) -> float:
    """Samples/s of the shipped pretraining loader alone: ``batches`` batches after one, over epochs as needed."""
    cfg = load_pretrain_config(PRETRAIN, [f"data.shards={shards}", *overrides])
    return timed(contrastive_loader(cfg.data, cfg.augment, 0, 1), batches)["samples_per_s"]


def pretrain_feed(shards: Path, steps: int, work: Path, overrides: tuple[str, ...] = ()) -> dict:
    """The real pretraining loop in a fresh process; data wait and images/s from its ``metrics.jsonl``."""
    out = work / f"pretrain-{shards.name}"
    cmd = [sys.executable, "-m", "dist_cardio.cli", "pretrain", "--config", str(PRETRAIN), "--out", str(out),
           "--set", f"data.shards={shards}", "--set", f"steps={WARM + steps}", "--set", "log_every=1",
           "--set", f"checkpoint.every={10 * (WARM + steps)}", *(a for o in overrides for a in ("--set", o))]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "data_s" in r][WARM:]
    data, step = sum(r["data_s"] for r in rows), sum(r["step_s"] for r in rows)
    batch = load_pretrain_config(PRETRAIN, [f"data.shards={shards}", *overrides]).data.batch_size
    return {"data_wait_share": data / step, "images_per_s": len(rows) * batch / step, "data_s": data / len(rows),
            "step_s": step / len(rows), "steps": len(rows)}


def finetune_feed(shards: Path, batches: int) -> dict:
    """Fine-tuning step fed by the decoded-once cache through the training transform vs on ready tensors."""
    from dist_cardio.data.torchvision_pipeline import build_torchvision_transform
    from dist_cardio.downstream.finetune import load_finetune_config
    from dist_cardio.downstream.finetune_loop import _StageLR, _train_epoch
    from dist_cardio.downstream.finetune_model import ImageSet
    from dist_cardio.downstream.hospital_data import load_images, read_hospital
    from dist_cardio.model import Classifier, SimCardioNet

    cfg = load_finetune_config(FINETUNE)
    augment = dataclasses.replace(cfg.augment, size=cfg.model.input_size, height=cfg.model.input_height)
    hospital = read_hospital(shards)
    n = min(len(hospital.items), batches * cfg.batch_size)
    loaded = load_images(hospital.items[:n], cfg.page, cfg.image_cache, progress=False, input_shape=augment.shape)
    targets = torch.zeros(len(loaded.images), dtype=torch.int64)
    fed = ImageSet(loaded.images, targets, build_torchvision_transform(augment, train=True))
    loader = DataLoader(fed, cfg.batch_size, shuffle=True, num_workers=cfg.workers, drop_last=True)
    ready = [(torch.randn(cfg.batch_size, 3, *augment.shape), torch.zeros(cfg.batch_size, dtype=torch.int64))
             for _ in range(len(loader))]

    def rate(batches_of: object) -> float:
        torch.manual_seed(0)
        classifier = Classifier(SimCardioNet(cfg.model), 2, cfg.dropout)
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3)
        loss_fn = torch.nn.CrossEntropyLoss()
        _train_epoch(classifier, ready[:1], loss_fn, optimizer, _StageLR(optimizer, len(ready) + 1), torch.device("cpu"), "", False)
        start = time.perf_counter()
        seen, _ = _train_epoch(classifier, batches_of, loss_fn, optimizer, _StageLR(optimizer, len(ready) + 1),
                               torch.device("cpu"), "", False)
        return seen / (time.perf_counter() - start)

    model = rate(ready)
    with_data = rate(loader)
    return {"finetune_images_per_s": with_data, "finetune_model_only_images_per_s": model,
            "finetune_data_ratio": with_data / model, "finetune_images": len(loaded.images),
            "finetune_workers": cfg.workers}
