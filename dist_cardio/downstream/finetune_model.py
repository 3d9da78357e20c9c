"""The model side of fine-tuning: the encoder from a pretraining checkpoint, gradual unfreezing, the
AdamW groups, the loss and sampler for imbalanced classes, the in-memory dataset, batched prediction."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm import tqdm

from dist_cardio.config import from_dict
from dist_cardio.downstream.hospital_data import page_image
from dist_cardio.model import Classifier, ModelConfig, ParamGroup, SimCardioNet, unfreeze_groups
from dist_cardio.train.checkpoint import FORMAT as CHECKPOINT_FORMAT, CheckpointError, load_weights, read_checkpoint

if TYPE_CHECKING:  # annotations only: finetune.py imports this module
    from dist_cardio.downstream.finetune import FinetuneConfig, StageConfig


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
    if not path.exists() or path.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no pretraining checkpoint (pass the file, its run folder, or --from-scratch)")
    fix = "pass a pretraining checkpoint written by `dist-cardio pretrain` (its run folder or a step-N.pt), or --from-scratch"
    state = read_checkpoint(path, fix)
    if state.get("format") != CHECKPOINT_FORMAT or not isinstance(state.get("config"), dict) or "model" not in state:
        kind = "a fine-tuned model, not a pretraining checkpoint" if "classes" in state else "not a dist_cardio pretraining checkpoint"
        raise CheckpointError(f"{path}: {kind}; {fix}")
    model_cfg = from_dict(ModelConfig, state["config"].get("model", {}), source=f"{path} (config.model)")
    encoder = SimCardioNet(model_cfg)
    load_weights(encoder, state["model"], path, fix)
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
    """In-memory pages (decoded, or compressed past the cache budget) with targets, through a torchvision transform."""

    def __init__(self, images: list, targets: torch.Tensor, transform: Any) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(page_image(self.images[i])), self.targets[i]


def targets_for(labels: list[tuple[str, ...]], classes: list[str], multilabel: bool) -> torch.Tensor:
    """Class ids (int64) or multi-hot rows (float32) in `classes` order."""
    index = {c: i for i, c in enumerate(classes)}
    if multilabel:
        out = torch.zeros(len(labels), len(classes))
        for row, labs in enumerate(labels):
            out[row, [index[lab] for lab in labs]] = 1.0
        return out
    return torch.tensor([index[labs[0]] for labs in labels], dtype=torch.int64)


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


def chance_loss(loss_fn: nn.Module, targets: torch.Tensor, n_classes: int, multilabel: bool) -> float:
    """`loss_fn` of the best constant prediction (the class frequencies, as the loss weights them).

    A training loss that does not fall well below it means the network learnt nothing from the images;
    with class weights it is ~2(1 - p)·ln 2 per label, not the familiar ln 2 or ln K, hence a number.
    """
    with torch.no_grad():
        if multilabel:
            p = targets.float().mean(dim=0).clamp(1e-6, 1 - 1e-6)
            w = loss_fn.pos_weight if loss_fn.pos_weight is not None else torch.ones_like(p)
            q = w * p / (w * p + 1 - p)
            logits = torch.log(q) - torch.log1p(-q)
        else:
            w = loss_fn.weight if loss_fn.weight is not None else torch.ones(n_classes)
            logits = torch.log((w * torch.bincount(targets, minlength=n_classes).float()).clamp(min=1e-12))
        return float(loss_fn(logits.expand(len(targets), -1), targets))


def balanced_sampler(targets: torch.Tensor, multilabel: bool, seed: int) -> WeightedRandomSampler:
    """Draw images so every class is about equally frequent (multi-label: by an image's rarest class)."""
    onehot = targets if multilabel else F.one_hot(targets, int(targets.max()) + 1).float()
    counts = onehot.sum(dim=0).clamp(min=1)
    per_image = (onehot / counts).max(dim=1).values
    per_image = torch.where(per_image > 0, per_image, 1.0 / len(targets))  # images with no positive label
    return WeightedRandomSampler(per_image.double(), len(targets), replacement=True, generator=torch.Generator().manual_seed(seed))


# --- devices ----------------------------------------------------------------------------------------------


def device_for(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA device is visible (use device: auto or cpu)")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def predict_batches(classifier: Classifier, loader: DataLoader, multilabel: bool, device: torch.device,
                    loss_fn: nn.Module | None = None, desc: str = "predict", progress: bool = True) -> tuple[np.ndarray, float]:
    """Probabilities for every image of `loader` (in order), and the mean loss when `loss_fn` is given."""
    classifier.eval()
    probs, total, count = [], 0.0, 0
    with torch.no_grad(), autocast(device):
        for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
            logits = classifier(x.to(device)).float()
            if loss_fn is not None:
                total += float(loss_fn(logits, y.to(device))) * len(x)
                count += len(x)
            probs.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)).cpu())
    return torch.cat(probs).numpy(), total / max(count, 1)


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (tensor cores); plain fp32 on CPU, where bf16 matmuls are slow."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


__all__ = [
    "load_encoder", "set_trainable", "build_optimizer", "ImageSet", "targets_for", "make_loss", "chance_loss",
    "balanced_sampler", "device_for", "predict_batches", "autocast",
]
