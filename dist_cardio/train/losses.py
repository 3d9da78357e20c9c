"""Contrastive losses as pure tensor functions: NT-Xent and decoupled (DCL) with global negatives, and
the paper's hybrid.

Distributed convention (DDP-style averaging): every rank passes its LOCAL embeddings ``[B, D]`` (the same
B on every rank). The rank's loss is the mean over its own 2B rows, each scored against the 2·world·B
embeddings gathered from all ranks (gradients flow through the gather to their owners). So:

* the global loss (one process on the concatenated batch) = mean over ranks of the per-rank losses
  (``distributed.all_reduce_mean(loss)`` for logging);
* after ``loss.backward()`` on every rank, the gradient reaching a rank's local embeddings is
  ``world_size ×`` the global-loss gradient (the gather's backward sums what all ranks' losses send), and
  averaging parameter gradients over ranks (what DDP, DeepSpeed and Accelerate do) yields exactly the
  gradient of the global loss. Do not sum gradients across ranks, and do not rescale the loss.

The loss is computed in (at least) float32 with autocast disabled, whatever the embeddings' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F

from dist_cardio.distributed import all_gather_with_grad, get_rank, get_world_size


DCLW_SIGMA = 0.5
"""σ of DCLW's positive-pair weighting (Yeh et al. 2022 use 0.5)."""


@dataclass(frozen=True)
class LossConfig:
    """Contrastive objective: ``kind`` at ``temperature`` plus ``cos_weight`` × mean(1 − cos(z1, z2))."""

    kind: Literal["nt_xent", "dcl", "dclw"] = "nt_xent"
    """``nt_xent`` (SimCLR); ``dcl``: the positive pair left out of the denominator (Yeh et al. 2022,
    decoupled contrastive learning: no negative-positive coupling, so small batches learn faster);
    ``dclw``: DCL with the positive term weighted by ``2 − n·softmax(cos/σ)`` over the batch's n pairs."""
    temperature: float = 0.1
    """Softmax temperature of the contrastive term (SimCLR: 0.1 for large batches, 0.5 for small ones)."""
    cos_weight: float = 0.5
    """λ of the hybrid loss's cosine term (0 = plain NT-Xent); the paper gives no value, so tune it."""
    gather: bool = True
    """Use every rank's embeddings as negatives (global batch) instead of the local batch only."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.cos_weight < 0:
            raise ValueError(f"cos_weight must be ≥ 0, got {self.cos_weight}")
        if self.kind not in ("nt_xent", "dcl", "dclw"):
            raise ValueError(f"kind must be nt_xent, dcl or dclw, got {self.kind!r}")


def _check(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be [B, D] with equal shapes, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _at_least_fp32(z: torch.Tensor) -> torch.Tensor:
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _scores(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool) -> tuple[torch.Tensor, ...]:
    """(logits ``[2B, 2n]`` with each row's own column at −inf, positive column per row, k1, k2, local ids).

    Normalised in ≥ fp32; the keys ``k1``/``k2`` ``[n, D]`` are the gathered views (n = world·B, rank-major).
    """
    z1 = F.normalize(_at_least_fp32(z1), dim=1)
    z2 = F.normalize(_at_least_fp32(z2), dim=1)
    b = z1.shape[0]
    rank, world = (get_rank(), get_world_size()) if gather else (0, 1)
    if world > 1:
        # One collective for both views: [world·B, 2D], rank-major, then split back.
        both = all_gather_with_grad(torch.cat([z1, z2], dim=1))
        k1, k2 = both[:, : z1.shape[1]], both[:, z1.shape[1]:]
    else:
        k1, k2 = z1, z2
    n = world * b
    queries = torch.cat([z1, z2])  # [2B, D]
    keys = torch.cat([k1, k2])  # [2n, D]: view-1 block of every rank, then view-2 block
    logits = queries @ keys.T / temperature
    local = torch.arange(b, device=z1.device) + rank * b
    self_col = torch.cat([local, local + n])
    pos_col = torch.cat([local + n, local])
    rows = torch.arange(2 * b, device=z1.device)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[rows, self_col] = True
    return logits.masked_fill(mask, float("-inf")), pos_col, k1, k2, local


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = True) -> torch.Tensor:
    """NT-Xent (SimCLR) over the two views ``z1[i] ↔ z2[i]``; returns this rank's mean over its 2B rows.

    Each local row's positive is the other view of the same image; the negatives are all other
    embeddings of the global batch (``gather=True``) or of the local batch. Embeddings are L2-normalised
    here, so pass raw projections.
    """
    _check(z1, z2, temperature)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        logits, pos_col, _, _, _ = _scores(z1, z2, temperature, gather)
        return F.cross_entropy(logits, pos_col)


def dcl(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = True,
        sigma: float | None = None) -> torch.Tensor:
    """Decoupled contrastive loss (Yeh et al. 2022); this rank's mean over its 2B rows, as :func:`nt_xent`.

    Row i with positive p: ``−w_i·s_ip + log Σ_{k ∉ {i, p}} exp(s_ik)`` where ``s = cos/τ``: NT-Xent
    without the positive in the denominator. ``w_i = 1`` (DCL), or with ``sigma`` (DCLW)
    ``w_i = 2 − n·softmax_j(cos(z1_j, z2_j)/σ)_i`` over the n pairs of the (global) batch. Unlike NT-Xent
    the value can be negative; a collapsed network sits at ``ln(2n − 2)``.
    """
    _check(z1, z2, temperature)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        logits, pos_col, k1, k2, local = _scores(z1, z2, temperature, gather)
        rows = torch.arange(logits.shape[0], device=logits.device)
        positive = logits[rows, pos_col]
        pos_mask = torch.zeros_like(logits, dtype=torch.bool)
        pos_mask[rows, pos_col] = True
        negatives = torch.logsumexp(logits.masked_fill(pos_mask, float("-inf")), dim=1)
        if sigma is not None:
            weights = 2 - k1.shape[0] * torch.softmax((k1 * k2).sum(dim=1) / sigma, dim=0)
            positive = positive * weights[local].repeat(2)
        return (negatives - positive).mean()


def hybrid_loss(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, cos_weight: float = 0.5, gather: bool = True,
    kind: str = "nt_xent",
) -> torch.Tensor:
    """Contrastive term (``kind`` of :class:`LossConfig`) + λ·mean(1 − cos(z1, z2)): the cosine term pulls
    the two views together directly.

    The cosine term is a mean over local pairs, so it follows the same averaging convention as
    :func:`nt_xent` (global value = mean over ranks).
    """
    _check(z1, z2, temperature)
    if kind == "nt_xent":
        loss = nt_xent(z1, z2, temperature, gather)
    elif kind in ("dcl", "dclw"):
        loss = dcl(z1, z2, temperature, gather, DCLW_SIGMA if kind == "dclw" else None)
    else:
        raise ValueError(f"unknown loss kind {kind!r} (nt_xent, dcl, dclw)")
    if cos_weight == 0:
        return loss
    with torch.autocast(device_type=z1.device.type, enabled=False):
        cos = F.cosine_similarity(_at_least_fp32(z1), _at_least_fp32(z2), dim=1)
        return loss + cos_weight * (1.0 - cos).mean()


def embedding_spread(z: torch.Tensor) -> torch.Tensor:
    """√d × the mean per-dimension std of the L2-normalised rows of ``z`` ``[N, d]`` (no gradient).

    About 1 when the embeddings are spread over the sphere, 0 when every image maps to the same point:
    the collapse check of SimSiam (Chen & He 2021). A contrastive run whose spread stays near 0 after
    warmup has stopped learning (its NT-Xent sits at ln(2B − 1)), which the loss alone hides when the
    loss is not yet expected to fall.
    """
    with torch.no_grad():
        return F.normalize(z.detach().float(), dim=1).std(dim=0).mean() * z.shape[1] ** 0.5


def collapsed_loss(kind: str, global_batch: int) -> float:
    """The contrastive term of a collapsed network (every embedding equal; the cosine term is then 0):
    ln(2B − 1) for NT-Xent, whose denominator keeps the positive, ln(2B − 2) for DCL/DCLW."""
    return math.log(2 * global_batch - (1 if kind == "nt_xent" else 2))


def make_loss(cfg: LossConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss_fn(z1, z2)`` for the trainer and :func:`dist_cardio.train.gradcache.cached_contrastive_step`."""
    return partial(hybrid_loss, temperature=cfg.temperature, cos_weight=cfg.cos_weight, gather=cfg.gather, kind=cfg.kind)


__all__ = ["LossConfig", "DCLW_SIGMA", "nt_xent", "dcl", "hybrid_loss", "embedding_spread", "collapsed_loss", "make_loss"]
