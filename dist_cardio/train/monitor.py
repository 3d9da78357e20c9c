"""See pretraining work before fine-tuning: a k-NN score of the encoder's features on a small labelled set.

The contrastive loss says whether two views of a page agree, not whether the features separate diagnoses;
a falling loss over collapsed or trivial features looks the same as real learning. Every ``every`` steps
rank 0 embeds the labelled shard set ``monitor.shards`` (whole pages at the training geometry, no
augmentation), and scores each image by its ``k`` nearest neighbours among the others (cosine
similarity, votes weighted by ``exp(sim / temperature)`` as in DINO's k-NN eval; leave-one-out, so no
image votes for itself). The score is the macro-AUROC of the neighbour votes (chance 0.5) over classes
with both positives and negatives; single-label sets also get the vote's accuracy. The pages are decoded
once at start-up and kept as float16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from dist_cardio.data import AugmentConfig, LoaderConfig, labeled_loader


@dataclass(frozen=True)
class MonitorConfig:
    """The online k-NN monitor (``monitor:`` section of the pretraining configs); off without ``shards``."""

    shards: str = ""
    """A labelled shard set (``dist-cardio shard --labels``); empty = no monitor."""
    every: int = 50
    """Steps between two scores (also scored after the last step)."""
    k: int = 10
    """Neighbours that vote."""
    temperature: float = 0.07
    """Votes are weighted by ``exp(cosine / temperature)``."""
    max_images: int = 256
    """At most this many images are kept (the first ones of the set), as float16 at the training geometry."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.k < 1 or self.max_images < 2:
            raise ValueError(f"monitor needs every ≥ 1, k ≥ 1, max_images ≥ 2; got {self.every}, {self.k}, {self.max_images}")
        if not self.temperature > 0:
            raise ValueError(f"monitor.temperature must be > 0, got {self.temperature}")

    @property
    def enabled(self) -> bool:
        return bool(self.shards)


class KnnMonitor:
    """The decoded monitor set and its labels; ``score(model)`` embeds it and returns the k-NN figures."""

    def __init__(self, cfg: MonitorConfig, aug: AugmentConfig, data: LoaderConfig) -> None:
        self.cfg = cfg
        # Read here, not through shard.read_manifest: train/ sits above data/ only (docs/ARCHITECTURE.md).
        manifest = Path(cfg.shards) / "manifest.json"
        try:
            doc = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{manifest}: monitor.shards needs a labelled shard set written by `dist-cardio shard --labels` ({e})") from None
        self.classes, self.multilabel = list(doc.get("classes") or []), bool(doc.get("multilabel"))
        if len(self.classes) < 2:
            raise ValueError(f"{cfg.shards}: monitor.shards holds {len(self.classes)} class(es); the k-NN score needs ≥ 2")
        loader_cfg = LoaderConfig(shards=cfg.shards, batch_size=min(32, cfg.max_images), num_threads=data.num_threads,
                                  backend=data.backend, device="cpu", check="never")
        images, targets = [], []
        for x, y, _ in labeled_loader(loader_cfg, aug, 0, 1, self.classes, self.multilabel, train=False):
            images.append(x.cpu().half())
            targets.append(y.cpu())
            if sum(len(t) for t in targets) >= cfg.max_images:
                break
        self.images = torch.cat(images)[: cfg.max_images]
        y = torch.cat(targets)[: cfg.max_images]
        self.onehot = (y.float() if self.multilabel else torch.nn.functional.one_hot(y, len(self.classes)).float()).numpy()
        positives = self.onehot.sum(axis=0)
        if not ((positives > 0) & (positives < len(self.onehot))).any():
            raise ValueError(f"{cfg.shards}: no class of the first {len(self.onehot)} monitor images has both positives and "
                             "negatives, so the k-NN AUROC is undefined; use a set with mixed labels")

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def score(self, model: torch.nn.Module, device: torch.device, batch: int = 32) -> dict[str, float]:
        """``{"knn_auroc"[, "knn_accuracy"]}`` of ``model.features`` (train mode restored afterwards)."""
        was_training = model.training
        dtype = next(model.parameters()).dtype  # bf16 where the engine cast the model
        model.eval()
        try:
            feats = torch.cat([model.features(self.images[i : i + batch].to(device, dtype)).float().cpu()
                               for i in range(0, len(self.images), batch)])
        finally:
            model.train(was_training)
        return knn_scores(feats, self.onehot, self.cfg.k, self.cfg.temperature, self.multilabel)


def knn_scores(features: torch.Tensor, onehot: np.ndarray, k: int, temperature: float, multilabel: bool) -> dict[str, float]:
    """Leave-one-out weighted k-NN votes over ``features`` [N, D] → macro-AUROC (and accuracy, single-label)."""
    z = torch.nn.functional.normalize(features.double(), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(-torch.inf)  # an image never votes for itself
    k = min(k, len(z) - 1)
    top, idx = sim.topk(k, dim=1)
    weights = torch.exp((top - top.max(dim=1, keepdim=True).values) / temperature).numpy()
    votes = (weights[:, :, None] * onehot[idx.numpy()]).sum(axis=1) / weights.sum(axis=1, keepdims=True)
    aucs = [roc_auc_score(onehot[:, c], votes[:, c]) for c in range(onehot.shape[1]) if 0 < onehot[:, c].sum() < len(onehot)]
    out = {"knn_auroc": float(np.mean(aucs)) if aucs else float("nan")}
    if not multilabel:
        out["knn_accuracy"] = float((votes.argmax(axis=1) == onehot.argmax(axis=1)).mean())
    return out


__all__ = ["MonitorConfig", "KnnMonitor", "knn_scores"]
