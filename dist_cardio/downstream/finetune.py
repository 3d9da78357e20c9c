"""Fine-tuning a pretrained SimCardioNet on one hospital's labelled printouts, with gradual unfreezing.

As in the SimCardioNet paper, the classification head is trained first with the encoder frozen, then the
top blocks are thawed, then the rest: a hospital's few hundred images would otherwise wash out what
pretraining learned. Each stage has its own epochs and LR; deeper parameter groups get smaller LRs
(discriminative fine-tuning: group k from the head trains at `lr · lr_decay**k`). A stage ends early
when validation macro-F1 has not improved for `patience` epochs; the best epoch's weights are kept.

Outputs in `out/`: `best.pt` (weights + everything `predict`/`evaluate`/`explain` need), `metrics.json`
(test metrics with bootstrap CIs, history), `confusion_matrix.png`, `curves.png`, `split.json`,
`config.yaml`, and `unreadable.txt` when some images could not be read.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from dist_cardio.atomic import atomic_write_json, output_lock
from dist_cardio.config import dump_yaml, load_config, to_dict
from dist_cardio.data import AugmentConfig, build_torchvision_transform
from dist_cardio.downstream.finetune_loop import train_stages
from dist_cardio.downstream.finetune_model import (
    ImageSet, balanced_sampler, chance_loss, device_for, load_encoder, make_loss, predict_batches, targets_for,
)
from dist_cardio.downstream.hospital_data import HospitalData, LoadedImages, describe, load_images, read_hospital, write_unreadable
from dist_cardio.downstream.metrics import evaluate_predictions, plot_confusion_matrix
from dist_cardio.downstream.page import PageConfig
from dist_cardio.downstream.splits import Split, SplitConfig, make_split, save_split
from dist_cardio.host_memory import keep_freed_memory
from dist_cardio.model import PRESETS, Classifier, ModelConfig

log = logging.getLogger(__name__)

FORMAT = "dist_cardio.finetuned/1"
BEST = "best.pt"
UNFIT = 0.9
"""A run whose lowest training loss stays above this share of the chance level gets a warning."""
FINETUNE_AUGMENT = AugmentConfig(crop_scale=(0.7, 1.0), crop_ratio=(1.35, 1.55), rotation=3.0, jitter_p=0.5, grayscale_p=0.1)
"""Labelled data is scarce, but the classifier must see most of the page: milder than SimCLR's views."""


@dataclass(frozen=True)
class StageConfig:
    """One step of gradual unfreezing."""

    epochs: int
    lr: float
    """LR of the head; deeper groups get `lr · lr_decay**k`."""
    groups: int | Literal["all"] = "all"
    """How many parameter groups train, counted from the head (`model.unfreeze_groups` order: head,
    attention, last stage, ..., stem); the rest stay frozen."""
    warmup: float = 0.0
    """Share of the stage's steps with a linear LR warmup before the cosine (thawing the whole network
    at full LR throws away what the head and top blocks just learnt)."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be ≥ 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.groups != "all" and self.groups < 1:
            raise ValueError(f"groups must be ≥ 1 or 'all', got {self.groups}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be a share of the stage in [0, 1), got {self.warmup}")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything one hospital's fine-tuning depends on (`configs/finetune/*.yaml`)."""

    stages: tuple[StageConfig, ...] = (
        StageConfig(epochs=3, lr=1e-3, groups=1),
        StageConfig(epochs=4, lr=3e-4, groups=3),
        StageConfig(epochs=8, lr=1e-4, groups="all"),
    )
    lr_decay: float = 0.5
    """Discriminative LRs: each group deeper than the head trains at this factor of the one above."""
    weight_decay: float = 1e-4
    batch_size: int = 32
    patience: int = 3
    """Epochs without a better validation score (`select_on`) before a stage ends (the last stage: training ends)."""
    select_on: Literal["macro_f1", "macro_auroc"] = "macro_f1"
    """Validation metric that keeps the best epoch and drives early stopping. Macro-AUROC needs no threshold
    and moves less from epoch to epoch on a validation set of a few dozen images."""
    task: Literal["auto", "single", "multi"] = "auto"
    """`auto`: multi-label when any image has several labels (`A;B`), else single-label (softmax)."""
    threshold: float = 0.5
    """Multi-label: a class is predicted when its sigmoid probability reaches this."""
    imbalance: Literal["none", "class_weights", "balanced_sampler"] = "class_weights"
    """Class weights in the loss (multi-label: positive weights), or a sampler drawing classes evenly."""
    dropout: float = 0.2
    """Dropout before the linear head."""
    image_cache: int | None = None
    """Width of the copies kept in memory (decoded once, at the model input's aspect); None = 2 × the model's
    input width."""
    page: PageConfig = field(default_factory=lambda: PageConfig(mode="crop"))
    split: SplitConfig = field(default_factory=SplitConfig)
    augment: AugmentConfig = field(default_factory=lambda: FINETUNE_AUGMENT)
    """Training-time augmentation (milder than pretraining's); `size`/`height` are set to the model's input."""
    model: ModelConfig = field(default_factory=lambda: PRESETS["default"])
    """Architecture for `--from-scratch` runs only; a pretrained checkpoint brings its own."""
    n_bootstrap: int = 1000
    """Resamples for the test metrics' 95% confidence intervals."""
    cache_mb: float = 4096
    """Memory for decoded pages: each is decoded and shrunk once (``image_cache``), and kept as pixels while
    they fit in this many MB; past that, as lossless PNG bytes decoded again per use (same pixels, ~4-8×
    smaller), so a large hospital set does not exhaust memory."""
    workers: int = 0
    """DataLoader worker processes (pages are decoded once; augmenting them costs ~10 % of a CPU step, so 0 keeps
    the step ≥ 0.8 of the model's own speed on 2 cores: ``benchmarks/train.py``)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages must list at least one stage")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {self.weight_decay}")
        if self.batch_size < 1 or self.patience < 1:
            raise ValueError(f"batch_size and patience must be ≥ 1, got {self.batch_size}, {self.patience}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_cache is not None and self.image_cache < 16:
            raise ValueError(f"image_cache must be ≥ 16 px (or null), got {self.image_cache}")
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be ≥ 0, got {self.cache_mb}")
        if self.n_bootstrap < 0 or self.workers < 0:
            raise ValueError(f"n_bootstrap and workers must be ≥ 0, got {self.n_bootstrap}, {self.workers}")


def load_finetune_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """`FinetuneConfig` from YAML plus `key.sub=value` overrides (strict: see `config.py`)."""
    return load_config(FinetuneConfig, path, overrides)


def plot_curves(history: list[dict[str, Any]], path: Path, chance: float | None = None) -> None:
    """Training/validation loss and validation macro-F1 per epoch, unfreezing stages shaded, the training
    loss of a constant guess dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train (the optimised, weighted loss)")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation (unweighted)")
    if chance is not None:
        ax_loss.axhline(chance, color="tab:blue", ls="--", lw=1, label="train loss of a constant guess")
    ax_f1.plot(epochs, [h["val_macro_f1"] for h in history], color="tab:green", label="val macro-F1")
    for ax in (ax_loss, ax_f1):
        for stage in sorted({h["stage"] for h in history}):
            span = [h["epoch"] for h in history if h["stage"] == stage]
            if stage % 2:
                ax.axvspan(min(span) - 0.5, max(span) + 0.5, color="0.92", zorder=0)
        ax.set_xlabel("epoch (shaded: alternate unfreezing stages)")
        ax.legend(fontsize=8)
    ax_loss.set_ylabel("loss")
    ax_f1.set_ylabel("macro-F1")
    ax_f1.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_finetune(cfg: FinetuneConfig, checkpoint: str | Path | None, data: str | Path, out: str | Path,
                 progress: bool = True) -> dict[str, Any]:
    """Fine-tune on one hospital's data; writes the outputs listed in the module docstring to `out`.

    `checkpoint` None trains from scratch (the baseline pretraining is compared against). Returns a
    summary: test (or validation, without a test split) accuracy / macro-F1 / macro AUROC, sizes, paths.
    """
    out = Path(out)
    if (out / "metrics.json").is_file():
        raise FileExistsError(f"{out}: holds a finished fine-tuning run (metrics.json); choose another --out or delete it")
    hospital = read_hospital(data)  # FileNotFoundError naming the path comes first, before any model work
    with output_lock(out, "finetune"):
        return _finetune(cfg, checkpoint, hospital, out, progress)


def _finetune(cfg: FinetuneConfig, checkpoint: str | Path | None, hospital: HospitalData, out: Path,
              progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = device_for(cfg.device)
    keep_freed_memory(device.type)
    encoder, source = load_encoder(checkpoint, cfg)
    cache_side = cfg.image_cache or 2 * encoder.cfg.input_size
    augment = dataclasses.replace(cfg.augment, size=encoder.cfg.input_size, height=encoder.cfg.input_height)
    (out / "config.yaml").write_text(dump_yaml(dataclasses.replace(cfg, model=encoder.cfg, augment=augment)))

    multilabel = _is_multilabel(cfg.task, hospital)
    loaded, split = _load_and_split(cfg, hospital, cache_side, augment.shape, out, progress)
    parts = _Parts(loaded, split, targets_for([it.labels for it in loaded.items], hospital.classes, multilabel), augment)
    train_set = parts.subset("train", train=True)
    train_loader, val_loader = _loaders(cfg, train_set, parts.subset("val", train=False), multilabel, device)
    loss_fn = make_loss(train_set.targets, len(hospital.classes), multilabel, cfg.imbalance)
    chance = chance_loss(loss_fn, train_set.targets, len(hospital.classes), multilabel)  # on the CPU targets
    loss_fn.to(device)
    eval_loss_fn = make_loss(train_set.targets, len(hospital.classes), multilabel, "none").to(device)
    log.info("training loss of a constant guess (the class frequencies): %.4f; a network that fits ends well below it", chance)

    classifier = Classifier(encoder, len(hospital.classes), cfg.dropout).to(device)
    meta = {
        "format": FORMAT, "classes": hospital.classes, "multilabel": multilabel, "threshold": cfg.threshold,
        "model_config": to_dict(encoder.cfg), "augment": to_dict(augment), "page": to_dict(cfg.page),
        "image_cache": cache_side, "config": to_dict(cfg),
        "pretrained": source, "split": {h: s for h, s in zip(loaded.hashes, split.assignment)},
    }
    history, best = train_stages(cfg, classifier, train_loader, val_loader, loss_fn, eval_loss_fn, multilabel, device,
                                 meta, out / BEST, progress)
    state = torch.load(out / BEST, map_location="cpu", weights_only=True)
    classifier.load_state_dict(state["model"])
    report_on = "test" if parts.indices["test"] else "val"
    metrics = _evaluate(cfg, classifier, parts, report_on, hospital.classes, multilabel, device, progress)
    plot_confusion_matrix(metrics, str(out / "confusion_matrix.png"))
    plot_curves(history, out / "curves.png", chance)
    summary = _summary(report_on, metrics, best, split, loaded, hospital, multilabel, source, out, start)
    summary["train_loss"] = {"chance": chance, "lowest": min(h["train_loss"] for h in history)}
    if summary["train_loss"]["lowest"] > UNFIT * chance:
        log.warning("the training loss never fell below %.0f %% of chance (%.4f vs %.4f): the network did not fit its "
                    "training set; check the labels and the input geometry, or train longer", 100 * UNFIT,
                    summary["train_loss"]["lowest"], chance)
    atomic_write_json(out / "metrics.json", {"summary": summary, report_on: metrics, "history": history,
                                             "split_mode": split.mode, "moved_to_keep_groups_together": split.moved},
                      newline=False, indent=1, allow_nan=False)
    log.info("fine-tuned in %.1f s: %s macro-F1 %.3f, accuracy %.3f", summary["seconds"], report_on,
             summary["macro_f1"], summary["accuracy"])
    return summary


class _Parts:
    """The decoded images, their targets and split, as `ImageSet`s per part (train / val / test)."""

    def __init__(self, loaded: LoadedImages, split: Split, targets: torch.Tensor, augment: AugmentConfig) -> None:
        self.loaded, self.targets = loaded, targets
        self.indices = {name: split.indices(name) for name in ("train", "val", "test")}
        self.transforms = {train: build_torchvision_transform(augment, train=train) for train in (True, False)}

    def subset(self, name: str, train: bool) -> ImageSet:
        idx = self.indices[name]
        return ImageSet([self.loaded.images[i] for i in idx], self.targets[idx], self.transforms[train])


def _loaders(cfg: FinetuneConfig, train_set: ImageSet, val_set: ImageSet, multilabel: bool,
             device: torch.device) -> tuple[DataLoader, DataLoader]:
    sampler = balanced_sampler(train_set.targets, multilabel, cfg.seed) if cfg.imbalance == "balanced_sampler" else None
    pin = device.type == "cuda"
    train_loader = DataLoader(train_set, cfg.batch_size, shuffle=sampler is None, sampler=sampler, num_workers=cfg.workers,
                              drop_last=len(train_set) > cfg.batch_size, pin_memory=pin,
                              generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(val_set, cfg.batch_size, num_workers=cfg.workers, pin_memory=pin)
    return train_loader, val_loader


def _evaluate(cfg: FinetuneConfig, classifier: Classifier, parts: _Parts, report_on: str, classes: list[str],
              multilabel: bool, device: torch.device, progress: bool) -> dict[str, Any]:
    """Metrics with bootstrap CIs of the best weights on the test part (validation when there is none)."""
    probs, _ = predict_batches(classifier, DataLoader(parts.subset(report_on, train=False), cfg.batch_size), multilabel,
                               device, desc=f"evaluate ({report_on})", progress=progress)
    idx = parts.indices[report_on]
    y_true = parts.targets[idx].numpy().astype(np.int64)
    patients = [parts.loaded.items[i].patient for i in idx]
    return evaluate_predictions(y_true, probs, classes, multilabel, cfg.threshold, cfg.n_bootstrap, cfg.seed, progress,
                                groups=patients)


def _summary(report_on: str, metrics: dict[str, Any], best: dict[str, Any], split: Split, loaded: LoadedImages,
             hospital: HospitalData, multilabel: bool, source: str, out: Path, start: float) -> dict[str, Any]:
    return {
        "evaluated_on": report_on,
        "accuracy": metrics["accuracy"]["value"],
        "macro_f1": metrics["macro_f1"]["value"],
        "macro_auroc": metrics["macro_auroc"]["value"],
        "best_epoch": best["epoch"],
        "best_val_macro_f1": best["val_macro_f1"],
        "images": {**split.counts(), "copies": loaded.copies, "unreadable": len(loaded.errors),
                   "without_label": hospital.unlabeled},
        "classes": hospital.classes,
        "multilabel": multilabel,
        "pretrained": source,
        "checkpoint": str(out / BEST),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _is_multilabel(task: str, data: HospitalData) -> bool:
    if task == "single" and data.multilabel:
        example = next(item for item in data.items if len(item.labels) > 1)
        raise ValueError(f"{data.root}: task is single-label but {example.id} has labels {';'.join(example.labels)} (use task: multi)")
    return data.multilabel if task == "auto" else task == "multi"



def _load_and_split(cfg: FinetuneConfig, hospital: HospitalData, side: int, input_shape: tuple[int, int], out: Path,
                    progress: bool) -> tuple[LoadedImages, Split]:
    """Decode every image once (`side` px wide at the input's aspect), drop copies (same bytes or same pixels), split
    without leaks; writes `split.json`."""
    log.info("%s", describe(hospital))
    loaded = load_images(hospital.items, cfg.page, side, progress, input_shape, cfg.cache_mb).unique()
    if loaded.errors:
        write_unreadable(out / "unreadable.txt", loaded.errors)
    if not loaded.images:
        raise ValueError(f"{hospital.root}: none of the {len(hospital.items)} images could be read (see {out / 'unreadable.txt'})")
    split = make_split(
        cfg.split, loaded.hashes, [it.patient for it in loaded.items],
        [";".join(sorted(it.labels)) for it in loaded.items], [it.strat_fold for it in loaded.items],
    )
    save_split(out / "split.json", split, [it.id for it in loaded.items], loaded.hashes, cfg.split)
    counts = split.counts()
    if not counts["train"] or not counts["val"]:
        raise ValueError(f"{hospital.root}: the split left {counts['train']} training and {counts['val']} validation images; need both")
    log.info("split (%s): %s%s", split.mode, counts, f", {loaded.copies} copies (same bytes or pixels) used once" if loaded.copies else "")
    return loaded, split


__all__ = [
    "FORMAT", "BEST", "FINETUNE_AUGMENT", "StageConfig", "FinetuneConfig", "load_finetune_config", "plot_curves",
    "run_finetune",
]
