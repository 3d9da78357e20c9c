"""LARS (You et al., 2017) as used by SimCLR/MoCo v3: SGD with momentum and a per-layer trust ratio.

Per parameter tensor ``w`` with gradient ``g`` (``wd`` = weight decay, ``η`` = trust coefficient):

    u = g + wd·w
    u ← u · η·‖w‖/‖u‖        (only for adapted tensors, and only when ‖w‖ > 0 and ‖u‖ > 0)
    μ ← momentum·μ + u
    w ← w − lr·μ

Biases, normalisation scales/shifts and position embeddings are neither adapted nor decayed (their norm
is no measure of a layer's scale): :func:`lars_param_groups` splits the model by name patterns and,
optionally, by the 1-D rule (MoCo v3's ``p.ndim > 1``). The trust ratio is per *tensor*, so the optimizer
must see whole tensors: DeepSpeed ZeRO 1/2 hands it flat slices instead (see ENVIRONMENT.md) — run it
at ZeRO stage 0 or under Accelerate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

DEFAULT_EXCLUDE: tuple[str, ...] = ("*.bias", "*norm*", "*pos_embed*")
"""Parameter-name patterns (fnmatch) kept out of adaptation and weight decay."""


@dataclass(frozen=True)
class LarsConfig:
    """Optimizer settings; the learning rate itself comes from ``schedule.py`` (set per step)."""

    momentum: float = 0.9
    weight_decay: float = 1e-6
    """SimCLR's value for LARS."""
    trust_coefficient: float = 0.001
    """η of the LARS paper."""
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    """fnmatch patterns of parameter names neither adapted nor decayed."""
    exclude_1d: bool = True
    """Also exclude every 1-D tensor (biases, norms) whatever its name."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {self.weight_decay}")
        if not self.trust_coefficient > 0:
            raise ValueError(f"trust_coefficient must be > 0, got {self.trust_coefficient}")


class LARS(torch.optim.Optimizer):
    """LARS over param groups carrying ``lars_adapt`` (default True); see the module docstring."""

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0.0 <= momentum < 1.0 or not trust_coefficient > 0:
            raise ValueError(
                f"LARS: need lr ≥ 0, weight_decay ≥ 0, 0 ≤ momentum < 1, trust_coefficient > 0; got "
                f"{lr}, {weight_decay}, {momentum}, {trust_coefficient}"
            )
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient, lars_adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad.clone()
                if group["lars_adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    ratio = torch.where(
                        (w_norm > 0) & (u_norm > 0), group["trust_coefficient"] * w_norm / u_norm, torch.ones_like(w_norm)
                    )
                    update.mul_(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def lars_param_groups(
    model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE, weight_decay: float = 0.0, exclude_1d: bool = True
) -> list[dict[str, Any]]:
    """Two param groups: adapted + decayed, and excluded (by name pattern or 1-D rule) with no decay.

    Frozen parameters are included too (the optimizer skips tensors without a gradient), so gradual
    unfreezing needs no new optimizer. Groups with no parameter are dropped.
    """
    adapted, excluded = [], []
    for name, p in model.named_parameters():
        skip = any(fnmatchcase(name, pat) for pat in exclude) or (exclude_1d and p.ndim <= 1)
        (excluded if skip else adapted).append(p)
    groups = [
        {"params": adapted, "weight_decay": weight_decay, "lars_adapt": True},
        {"params": excluded, "weight_decay": 0.0, "lars_adapt": False},
    ]
    return [g for g in groups if g["params"]]


def build_lars(model: nn.Module, cfg: LarsConfig, lr: float = 0.0) -> LARS:
    """LARS over :func:`lars_param_groups` of ``model`` as ``cfg`` says (``lr`` is then set per step)."""
    groups = lars_param_groups(model, cfg.exclude, cfg.weight_decay, cfg.exclude_1d)
    return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)


__all__ = ["DEFAULT_EXCLUDE", "LarsConfig", "LARS", "lars_param_groups", "build_lars"]
