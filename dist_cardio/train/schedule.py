"""Learning-rate schedule: scaled by the GLOBAL batch, linear warmup, cosine decay; pure functions.

The peak LR follows SimCLR's scaling rules for the global batch ``B`` (per-rank batch × ranks):
``linear``: base × B/256; ``sqrt``: base × √B (SimCLR pairs it with base 0.075); ``none``: base.
The schedule is precomputed as one value per optimizer step (an array whose length is asserted), so a
resumed run indexes it by its step counter and nothing is stateful. ``warmup_cosine`` is the one warmup +
cosine in the package: pretraining (``pretrain.make_plan``) and fine-tuning (each unfreezing stage) both
index an array it made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch


@dataclass(frozen=True)
class ScheduleConfig:
    """How the per-step learning rate is derived."""

    base_lr: float = 0.3
    """LR before scaling by the global batch (SimCLR: 0.3 with ``linear``, 0.075 with ``sqrt``)."""
    scaling: Literal["linear", "sqrt", "none"] = "linear"
    warmup_epochs: float = 10.0
    """Linear warmup from ≈0 to the peak, in epochs (may be fractional); ignored when ``warmup_fraction`` is set."""
    warmup_fraction: float | None = None
    """Warmup as a share of the whole run (e.g. 0.1). Prefer it for short runs on small sets: a warmup in
    epochs becomes the whole run once an epoch has more steps than the run."""
    final_lr_ratio: float = 0.0
    """LR at the last step as a fraction of the peak (cosine decays to it)."""

    def __post_init__(self) -> None:
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be ≥ 0, got {self.warmup_epochs}")
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1) (or null), got {self.warmup_fraction}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")


def scaled_lr(base_lr: float, global_batch: int, scaling: str) -> float:
    """Peak LR for a global batch under a scaling rule (``linear`` | ``sqrt`` | ``none``)."""
    if global_batch < 1:
        raise ValueError(f"global batch must be ≥ 1, got {global_batch}")
    if scaling == "linear":
        return base_lr * global_batch / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch)
    if scaling == "none":
        return base_lr
    raise ValueError(f"unknown LR scaling {scaling!r} (use linear, sqrt or none)")


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int, final_lr: float) -> np.ndarray:
    """Per-step LRs: ``peak·(i+1)/warmup`` for the warmup, then cosine from ``peak`` to ``final_lr``."""
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need total_steps ≥ 1 and 0 ≤ warmup_steps ≤ total_steps, got {total_steps}, {warmup_steps}")
    warmup = peak_lr * np.arange(1, warmup_steps + 1, dtype=np.float64) / max(warmup_steps, 1)
    decay_steps = total_steps - warmup_steps
    progress = np.arange(decay_steps, dtype=np.float64) / max(decay_steps - 1, 1)
    cosine = final_lr + 0.5 * (peak_lr - final_lr) * (1.0 + np.cos(np.pi * progress))
    schedule = np.concatenate([warmup, cosine])
    assert len(schedule) == total_steps, (len(schedule), total_steps)
    return schedule


def warmup_steps(cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> int:
    """The warmup in optimizer steps: ``warmup_fraction`` of the run, else ``warmup_epochs``; clipped to the run."""
    if cfg.warmup_fraction is not None:
        return round(cfg.warmup_fraction * total_steps)
    return min(round(cfg.warmup_epochs * steps_per_epoch), total_steps)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` on every param group (call before each optimizer step with ``schedule[step]``)."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr)


def apply_lr_factor(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    """Set each param group's LR to its own base LR × ``factor`` (groups with different LRs, one shape)."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * float(factor)


__all__ = ["ScheduleConfig", "scaled_lr", "warmup_cosine", "warmup_steps", "apply_lr", "apply_lr_factor"]
