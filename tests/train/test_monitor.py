"""The k-NN monitor: leave-one-out votes against hand cases, and a real monitor set read from shards."""

from __future__ import annotations

import math

import numpy as np
import torch

from dist_cardio.train.monitor import knn_scores


def test_separable_features_score_one_and_random_ones_near_chance():
    labels = np.repeat(np.arange(3), 20)
    onehot = np.eye(3)[labels]
    centres = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) * 5
    feats = centres[labels] + 0.1 * torch.randn(60, 16, generator=torch.Generator().manual_seed(1))
    good = knn_scores(feats, onehot, k=5, temperature=0.07, multilabel=False)
    assert good["knn_auroc"] == 1.0 and good["knn_accuracy"] == 1.0
    aucs = [knn_scores(torch.randn(60, 16, generator=torch.Generator().manual_seed(s)), onehot, 5, 0.07, False)["knn_auroc"]
            for s in range(10)]
    assert abs(np.mean(aucs) - 0.5) < 0.08


def test_leave_one_out_an_image_never_votes_for_itself():
    # two identical points of different classes: each is the other's only neighbour → always wrong
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    onehot = np.eye(2)[[0, 1, 0, 1]]
    scores = knn_scores(feats, onehot, k=1, temperature=0.07, multilabel=False)
    assert scores["knn_accuracy"] == 0.0


def test_multilabel_skips_classes_without_both_outcomes():
    feats = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    onehot = np.zeros((8, 3))
    onehot[:4, 0] = 1
    onehot[:, 2] = 1  # every image positive: no AUROC for class 2
    scores = knn_scores(feats, onehot, k=3, temperature=0.1, multilabel=True)
    assert math.isfinite(scores["knn_auroc"]) and "knn_accuracy" not in scores
