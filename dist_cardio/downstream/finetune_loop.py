"""The gradual-unfreezing loop: per stage, thaw groups, AdamW, the precomputed cosine LR, early stopping."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dist_cardio.atomic import atomic_save
from dist_cardio.downstream.finetune_model import autocast, build_optimizer, predict_batches, set_trainable
from dist_cardio.downstream.metrics import point_metrics
from dist_cardio.model import Classifier
from dist_cardio.train.schedule import apply_lr_factor, warmup_cosine

if TYPE_CHECKING:  # annotations only: finetune.py imports this module
    from dist_cardio.downstream.finetune import FinetuneConfig

log = logging.getLogger(__name__)


def stage_lr_factors(total_steps: int, warmup_steps: int = 0) -> np.ndarray:
    """LR ÷ the stage's base LR before each optimizer step: a linear warmup over ``warmup_steps``, then
    cosine from 1 to 0 over the rest of ``total_steps``.

    One entry more than the stage has steps: entry ``k`` is what step ``k`` uses, and the last (0) is the
    LR left after the final step (what the epoch's history row logs at the end of a stage).
    """
    return warmup_cosine(1.0, total_steps + 1, min(warmup_steps, total_steps), 0.0)


def train_stages(cfg: FinetuneConfig, classifier: Classifier, train_loader: DataLoader, val_loader: DataLoader,
                 loss_fn: nn.Module, eval_loss_fn: nn.Module, multilabel: bool, device: torch.device,
                 meta: dict[str, Any], best_path: Path, progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The unfreezing stages; saves `best_path` whenever the validation `cfg.select_on` metric improves."""
    history: list[dict[str, Any]] = []
    best = {"epoch": 0, "val_macro_f1": -math.inf, "score": -math.inf}
    y_val = val_loader.dataset.targets.numpy().astype(np.int64)
    epoch = 0
    for stage_no, stage in enumerate(cfg.stages, start=1):
        groups = set_trainable(classifier, stage.groups)
        optimizer = build_optimizer(groups, stage, cfg.lr_decay, cfg.weight_decay)
        steps = stage.epochs * len(train_loader)
        lr = _StageLR(optimizer, steps, round(stage.warmup * steps))
        log.info("stage %d: training %s for up to %d epochs at lr %g", stage_no, ", ".join(g.name for g in groups), stage.epochs, stage.lr)
        stale = 0
        for _ in range(stage.epochs):
            epoch += 1
            set_trainable(classifier, stage.groups)  # restores train mode of the thawed part
            tic = time.perf_counter()
            seen, train_loss = _train_epoch(classifier, train_loader, loss_fn, optimizer, lr, device,
                                            f"stage {stage_no} epoch {epoch}", progress)
            probs, val_loss = predict_batches(classifier, val_loader, multilabel, device, eval_loss_fn, "validate", progress)
            val = point_metrics(y_val, probs, multilabel, cfg.threshold)
            f1, auroc = val["macro_f1"], val["macro_auroc"]
            auroc = None if math.isnan(auroc) else auroc  # no class with both outcomes in validation
            score = auroc if cfg.select_on == "macro_auroc" and auroc is not None else f1
            row = {"epoch": epoch, "stage": stage_no, "train_loss": train_loss, "val_loss": val_loss,
                   "val_macro_f1": f1, "val_macro_auroc": auroc, "lr": optimizer.param_groups[0]["lr"],
                   "images_per_s": seen / max(time.perf_counter() - tic, 1e-9)}
            history.append(row)
            improved = score > best["score"]
            log.info("epoch %d (stage %d): train loss %.4f  val loss %.4f  val macro-F1 %.3f  macro-AUROC %s%s  %.0f img/s",
                     epoch, stage_no, row["train_loss"], val_loss, f1, "n/a" if auroc is None else f"{auroc:.3f}",
                     "  (best)" if improved else "", row["images_per_s"])
            if improved:
                best = {"epoch": epoch, "val_macro_f1": f1, "score": score}
                state = {k: v.detach().cpu() for k, v in classifier.state_dict().items()}
                atomic_save(best_path, lambda tmp: torch.save({**meta, "model": state, "epoch": epoch, "val_macro_f1": f1}, tmp))
                stale = 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    log.info("stage %d: no better validation %s for %d epochs, %s", stage_no, cfg.select_on, stale,
                             "moving on" if stage_no < len(cfg.stages) else "stopping")
                    break
    return history, best


class _StageLR:
    """Each param group at its own base LR × the stage's cosine factor for the step about to run."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> None:
        self.optimizer, self.total_steps = optimizer, total_steps
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.factors = stage_lr_factors(total_steps, warmup_steps)
        self.step = 0
        apply_lr_factor(self.optimizer, self.base, self.factors[0])  # 1.0 without warmup

    def advance(self) -> None:
        """After an optimizer step: set the LR of the next one (past the end: the last factor)."""
        self.step += 1
        apply_lr_factor(self.optimizer, self.base, self.factors[min(self.step, self.total_steps)])


def _train_epoch(classifier: Classifier, loader: DataLoader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 lr: _StageLR, device: torch.device, desc: str, progress: bool) -> tuple[int, float]:
    """One pass over the training images; returns (images seen, mean training loss)."""
    seen, total = 0, 0.0
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            loss = loss_fn(classifier(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr.advance()
        seen += len(x)
        total += float(loss.detach()) * len(x)
    return seen, total / max(seen, 1)


__all__ = ["train_stages", "stage_lr_factors"]
