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
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm import tqdm

from dist_cardio.train.checkpoint import CheckpointManager
from dist_cardio.config import dump_yaml, from_dict, load_config, to_dict
from dist_cardio.data import AugmentConfig, build_torchvision_transform
from dist_cardio.downstream.hospital_data import HospitalData, LoadedImages, describe, load_images, read_hospital
from dist_cardio.downstream.metrics import evaluate_predictions, plot_confusion_matrix, point_metrics
from dist_cardio.model import Classifier, ModelConfig, ParamGroup, SimCardioNet, unfreeze_groups
from dist_cardio.downstream.page import PageConfig
from dist_cardio.downstream.splits import Split, SplitConfig, make_split, save_split

log = logging.getLogger(__name__)

FORMAT = "dist_cardio.finetuned/1"
BEST = "best.pt"
FINETUNE_AUGMENT = AugmentConfig(crop_scale=(0.6, 1.0), rotation=3.0, jitter_p=0.5, grayscale_p=0.1)
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

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be ≥ 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.groups != "all" and self.groups < 1:
            raise ValueError(f"groups must be ≥ 1 or 'all', got {self.groups}")


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
    """Epochs without a better validation macro-F1 before a stage ends (the last stage: training ends)."""
    task: Literal["auto", "single", "multi"] = "auto"
    """`auto`: multi-label when any image has several labels (`A;B`), else single-label (softmax)."""
    threshold: float = 0.5
    """Multi-label: a class is predicted when its sigmoid probability reaches this."""
    imbalance: Literal["none", "class_weights", "balanced_sampler"] = "class_weights"
    """Class weights in the loss (multi-label: positive weights), or a sampler drawing classes evenly."""
    dropout: float = 0.2
    """Dropout before the linear head."""
    image_cache: int | None = None
    """Side of the square images kept in memory (decoded once); None = 2 × the model's input size."""
    page: PageConfig = field(default_factory=lambda: PageConfig(mode="crop"))
    split: SplitConfig = field(default_factory=SplitConfig)
    augment: AugmentConfig = field(default_factory=lambda: FINETUNE_AUGMENT)
    """Training-time augmentation (milder than pretraining's); `size` is set to the model's input size."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture for `--from-scratch` runs only; a pretrained checkpoint brings its own."""
    n_bootstrap: int = 1000
    """Resamples for the test metrics' 95% confidence intervals."""
    workers: int = 0
    """DataLoader worker processes (images are already decoded; 0 is fine on small sets)."""
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
        if self.n_bootstrap < 0 or self.workers < 0:
            raise ValueError(f"n_bootstrap and workers must be ≥ 0, got {self.n_bootstrap}, {self.workers}")


def load_finetune_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """`FinetuneConfig` from YAML plus `key.sub=value` overrides (strict: see `config.py`)."""
    return load_config(FinetuneConfig, path, overrides)


# --- model ------------------------------------------------------------------------------------------------


def load_encoder(checkpoint: str | Path | None, cfg: FinetuneConfig) -> tuple[SimCardioNet, str]:
    """The pretrained encoder from a pretraining checkpoint, or a fresh one (`None`: from scratch).

    `checkpoint` may be the checkpoint file, its `checkpoints/` folder, or the pretraining run folder.
    """
    if checkpoint is None:
        torch.manual_seed(cfg.seed)
        return SimCardioNet(cfg.model), "scratch"
    path = Path(checkpoint)
    for candidate in (path / "checkpoints" / "latest", path / "latest"):
        if path.is_dir() and candidate.is_file():
            path = candidate
            break
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no pretraining checkpoint (pass the file, its run folder, or --from-scratch)")
    state = CheckpointManager(path.parent).load(path)
    model_cfg = from_dict(ModelConfig, state["config"]["model"], source=f"{path} (config.model)")
    encoder = SimCardioNet(model_cfg)
    encoder.load_state_dict(state["model"])
    return encoder, str(path)


def set_trainable(classifier: Classifier, groups: int | Literal["all"]) -> list[ParamGroup]:
    """Train the first `groups` parameter groups (from the head), freeze the rest; returns the trained ones.

    Fully frozen modules are put in eval mode, so their dropout is off and BatchNorm statistics stay as
    pretrained; call again after every `classifier.train()`.
    """
    all_groups = unfreeze_groups(classifier)
    n = len(all_groups) if groups == "all" else min(groups, len(all_groups))
    for k, group in enumerate(all_groups):
        for p in group.params:
            p.requires_grad_(k < n)
    classifier.train()
    for module in classifier.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
    return all_groups[:n]


def build_optimizer(groups: list[ParamGroup], stage: StageConfig, lr_decay: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with one param group per model group: LR `stage.lr · lr_decay**k`; no decay on 1-D params."""
    param_groups = []
    for k, group in enumerate(groups):
        lr = stage.lr * lr_decay**k
        matrices = [p for p in group.params if p.ndim > 1]
        vectors = [p for p in group.params if p.ndim <= 1]
        param_groups += [
            {"params": matrices, "lr": lr, "weight_decay": weight_decay, "name": group.name},
            {"params": vectors, "lr": lr, "weight_decay": 0.0, "name": group.name},
        ]
    return torch.optim.AdamW([g for g in param_groups if g["params"]])


# --- data -------------------------------------------------------------------------------------------------


class ImageSet(Dataset):
    """In-memory images with targets, through a torchvision transform."""

    def __init__(self, images: list, targets: torch.Tensor, transform: Any) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.targets[i]


def targets_for(labels: list[tuple[str, ...]], classes: list[str], multilabel: bool) -> torch.Tensor:
    """Class ids (int64) or multi-hot rows (float32) in `classes` order."""
    index = {c: i for i, c in enumerate(classes)}
    if multilabel:
        out = torch.zeros(len(labels), len(classes))
        for row, labs in enumerate(labels):
            out[row, [index[lab] for lab in labs]] = 1.0
        return out
    return torch.tensor([index[labs[0]] for labs in labels], dtype=torch.int64)


def _is_multilabel(task: str, data: HospitalData) -> bool:
    if task == "single" and data.multilabel:
        example = next(item for item in data.items if len(item.labels) > 1)
        raise ValueError(f"{data.root}: task is single-label but {example.id} has labels {';'.join(example.labels)} (use task: multi)")
    return data.multilabel if task == "auto" else task == "multi"


def make_loss(targets: torch.Tensor, n_classes: int, multilabel: bool, imbalance: str) -> nn.Module:
    """Cross-entropy (single-label) or BCE-with-logits (multi-label), class-weighted if configured."""
    if multilabel:
        pos_weight = None
        if imbalance == "class_weights":
            pos = targets.sum(dim=0)
            pos_weight = torch.where(pos > 0, (len(targets) - pos) / pos.clamp(min=1), torch.ones_like(pos))
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    weight = None
    if imbalance == "class_weights":
        y = targets.numpy()
        present = np.unique(y)
        weight = torch.ones(n_classes)
        weight[present] = torch.as_tensor(compute_class_weight("balanced", classes=present, y=y), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight)


def balanced_sampler(targets: torch.Tensor, multilabel: bool, seed: int) -> WeightedRandomSampler:
    """Draw images so every class is about equally frequent (multi-label: by an image's rarest class)."""
    onehot = targets if multilabel else F.one_hot(targets, int(targets.max()) + 1).float()
    counts = onehot.sum(dim=0).clamp(min=1)
    per_image = (onehot / counts).max(dim=1).values
    per_image = torch.where(per_image > 0, per_image, 1.0 / len(targets))  # images with no positive label
    return WeightedRandomSampler(per_image.double(), len(targets), replacement=True, generator=torch.Generator().manual_seed(seed))


# --- the run ----------------------------------------------------------------------------------------------


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA device is visible (use device: auto or cpu)")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def predict_batches(classifier: Classifier, loader: DataLoader, multilabel: bool, device: torch.device,
                    loss_fn: nn.Module | None = None, desc: str = "predict", progress: bool = True) -> tuple[np.ndarray, float]:
    """Probabilities for every image of `loader` (in order), and the mean loss when `loss_fn` is given."""
    classifier.eval()
    probs, total, count = [], 0.0, 0
    with torch.no_grad(), _autocast(device):
        for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
            logits = classifier(x.to(device)).float()
            if loss_fn is not None:
                total += float(loss_fn(logits, y.to(device))) * len(x)
                count += len(x)
            probs.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)).cpu())
    return torch.cat(probs).numpy(), total / max(count, 1)


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (tensor cores); plain fp32 on CPU, where bf16 matmuls are slow."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def _save_atomic(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False))
    os.replace(tmp, path)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training/validation loss and validation macro-F1 per epoch, unfreezing stages shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train (the optimised, weighted loss)")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation (unweighted)")
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
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    encoder, source = load_encoder(checkpoint, cfg)
    input_size = encoder.cfg.input_size
    cache_side = cfg.image_cache or 2 * input_size
    augment = dataclasses.replace(cfg.augment, size=input_size)
    (out / "config.yaml").write_text(dump_yaml(dataclasses.replace(cfg, model=encoder.cfg, augment=augment)))

    multilabel = _is_multilabel(cfg.task, hospital)
    classes = hospital.classes
    loaded, split = _load_and_split(cfg, hospital, cache_side, out, progress)
    targets = targets_for([it.labels for it in loaded.items], classes, multilabel)
    parts = {name: split.indices(name) for name in ("train", "val", "test")}

    train_tf = build_torchvision_transform(augment, train=True)
    eval_tf = build_torchvision_transform(augment, train=False)

    def subset(name: str, transform: Any) -> ImageSet:
        idx = parts[name]
        return ImageSet([loaded.images[i] for i in idx], targets[idx], transform)

    train_set = subset("train", train_tf)
    sampler = balanced_sampler(train_set.targets, multilabel, cfg.seed) if cfg.imbalance == "balanced_sampler" else None
    pin = device.type == "cuda"
    train_loader = DataLoader(train_set, cfg.batch_size, shuffle=sampler is None, sampler=sampler, num_workers=cfg.workers,
                              drop_last=len(train_set) > cfg.batch_size, pin_memory=pin,
                              generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(subset("val", eval_tf), cfg.batch_size, num_workers=cfg.workers, pin_memory=pin)
    loss_fn = make_loss(train_set.targets, len(classes), multilabel, cfg.imbalance).to(device)
    eval_loss_fn = make_loss(train_set.targets, len(classes), multilabel, "none").to(device)

    classifier = Classifier(encoder, len(classes), cfg.dropout).to(device)
    meta = {
        "format": FORMAT, "classes": classes, "multilabel": multilabel, "threshold": cfg.threshold,
        "model_config": to_dict(encoder.cfg), "augment": to_dict(augment), "page": to_dict(cfg.page),
        "image_cache": cache_side, "config": to_dict(cfg),
        "pretrained": source, "split": {h: s for h, s in zip(loaded.hashes, split.assignment)},
    }
    history, best = _train(cfg, classifier, train_loader, val_loader, loss_fn, eval_loss_fn, multilabel, device, meta,
                           out / BEST, progress)
    state = torch.load(out / BEST, map_location="cpu", weights_only=True)
    classifier.load_state_dict(state["model"])

    report_on = "test" if parts["test"] else "val"
    probs, _ = predict_batches(classifier, DataLoader(subset(report_on, eval_tf), cfg.batch_size), multilabel, device,
                               desc=f"evaluate ({report_on})", progress=progress)
    y_true = targets[parts[report_on]].numpy().astype(np.int64)
    metrics = evaluate_predictions(y_true, probs, classes, multilabel, cfg.threshold, cfg.n_bootstrap, cfg.seed, progress)
    plot_confusion_matrix(metrics, str(out / "confusion_matrix.png"))
    plot_curves(history, out / "curves.png")
    summary = {
        "evaluated_on": report_on,
        "accuracy": metrics["accuracy"]["value"],
        "macro_f1": metrics["macro_f1"]["value"],
        "macro_auroc": metrics["macro_auroc"]["value"],
        "best_epoch": best["epoch"],
        "best_val_macro_f1": best["val_macro_f1"],
        "images": {**split.counts(), "copies": loaded.copies, "unreadable": len(loaded.errors),
                   "without_label": hospital.unlabeled},
        "classes": classes,
        "multilabel": multilabel,
        "pretrained": source,
        "checkpoint": str(out / BEST),
        "seconds": round(time.perf_counter() - start, 1),
    }
    _write_json(out / "metrics.json", {"summary": summary, report_on: metrics, "history": history,
                                       "split_mode": split.mode, "moved_to_keep_groups_together": split.moved})
    log.info("fine-tuned in %.1f s: %s macro-F1 %.3f, accuracy %.3f", summary["seconds"], report_on,
             summary["macro_f1"], summary["accuracy"])
    return summary


def _load_and_split(cfg: FinetuneConfig, hospital: HospitalData, side: int, out: Path, progress: bool) -> tuple[LoadedImages, Split]:
    """Decode every image once, drop byte-identical copies, split without leaks; writes `split.json`."""
    log.info("%s", describe(hospital))
    loaded = load_images(hospital.items, cfg.page, side, progress).unique()
    _report_unreadable(loaded, out)
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
    log.info("split (%s): %s%s", split.mode, counts, f", {loaded.copies} byte-identical copies used once" if loaded.copies else "")
    return loaded, split


def _report_unreadable(loaded: LoadedImages, out: Path) -> None:
    if not loaded.errors:
        return
    (out / "unreadable.txt").write_text("".join(f"{item_id}\t{reason}\n" for item_id, reason in loaded.errors))
    for item_id, reason in loaded.errors[:10]:
        log.warning("left out unreadable image %s: %s", item_id, reason)
    if len(loaded.errors) > 10:
        log.warning("... %d unreadable images in all, listed in %s", len(loaded.errors), out / "unreadable.txt")


def _train(cfg: FinetuneConfig, classifier: Classifier, train_loader: DataLoader, val_loader: DataLoader,
           loss_fn: nn.Module, eval_loss_fn: nn.Module, multilabel: bool, device: torch.device,
           meta: dict[str, Any], best_path: Path, progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The unfreezing stages; saves `best_path` whenever validation macro-F1 improves."""
    history: list[dict[str, Any]] = []
    best = {"epoch": 0, "val_macro_f1": -math.inf}
    y_val = val_loader.dataset.targets.numpy().astype(np.int64)
    epoch = 0
    for stage_no, stage in enumerate(cfg.stages, start=1):
        groups = set_trainable(classifier, stage.groups)
        optimizer = build_optimizer(groups, stage, cfg.lr_decay, cfg.weight_decay)
        total_steps = stage.epochs * len(train_loader)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
        log.info("stage %d: training %s for up to %d epochs at lr %g", stage_no, ", ".join(g.name for g in groups), stage.epochs, stage.lr)
        stale = 0
        for _ in range(stage.epochs):
            epoch += 1
            set_trainable(classifier, stage.groups)  # restores train mode of the thawed part
            tic, seen, total = time.perf_counter(), 0, 0.0
            for x, y in tqdm(train_loader, desc=f"stage {stage_no} epoch {epoch}", unit="batch", leave=False, disable=not progress):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(device):
                    loss = loss_fn(classifier(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                seen += len(x)
                total += float(loss.detach()) * len(x)
            probs, val_loss = predict_batches(classifier, val_loader, multilabel, device, eval_loss_fn, "validate", progress)
            f1 = point_metrics(y_val, probs, multilabel, cfg.threshold)["macro_f1"]
            row = {"epoch": epoch, "stage": stage_no, "train_loss": total / max(seen, 1), "val_loss": val_loss,
                   "val_macro_f1": f1, "lr": optimizer.param_groups[0]["lr"],
                   "images_per_s": seen / max(time.perf_counter() - tic, 1e-9)}
            history.append(row)
            improved = f1 > best["val_macro_f1"]
            log.info("epoch %d (stage %d): train loss %.4f  val loss %.4f  val macro-F1 %.3f%s  %.0f img/s", epoch, stage_no,
                     row["train_loss"], val_loss, f1, "  (best)" if improved else "", row["images_per_s"])
            if improved:
                best = {"epoch": epoch, "val_macro_f1": f1}
                state = {k: v.detach().cpu() for k, v in classifier.state_dict().items()}
                _save_atomic({**meta, "model": state, "epoch": epoch, "val_macro_f1": f1}, best_path)
                stale = 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    log.info("stage %d: no better validation macro-F1 for %d epochs, %s", stage_no, stale,
                             "moving on" if stage_no < len(cfg.stages) else "stopping")
                    break
    return history, best


__all__ = [
    "FORMAT", "BEST", "StageConfig", "FinetuneConfig", "load_finetune_config", "load_encoder", "set_trainable",
    "build_optimizer", "targets_for", "make_loss", "balanced_sampler", "predict_batches", "plot_curves", "run_finetune",
]
