"""Classification metrics with bootstrap 95% confidence intervals, computed by scikit-learn.

Hospital test sets are small (PTB-XL ids 1-500 give ~50 test records), so a point estimate alone
misleads: every metric is reported with a percentile bootstrap interval. When images come in groups
(a patient's several ECGs), the bootstrap resamples groups, not images: the splits keep a patient's
images together, so they are not independent draws, and resampling images narrows the intervals falsely.
Macro means (F1, AUROC) run over the classes present in the labels, and the result says which were absent:
a class with no positive case has no recall to average.
Single-label: predictions are the argmax. Multi-label (PTB-XL superclasses): a class is predicted when its
sigmoid probability reaches `threshold`; accuracy is then exact-match (subset) accuracy.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    hamming_loss,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)
from tqdm import tqdm


def predictions(probs: np.ndarray, multilabel: bool, threshold: float = 0.5) -> np.ndarray:
    """Class ids (single-label) or a 0/1 matrix (multi-label) from probabilities."""
    return (probs >= threshold).astype(np.int64) if multilabel else probs.argmax(axis=1)


def point_metrics(y_true: np.ndarray, probs: np.ndarray, multilabel: bool, threshold: float = 0.5) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/AUROC and macro AUROC for one set of predictions.

    AUROC of a class absent (or always present) in `y_true` is undefined: NaN, left out of the macro mean;
    macro-F1 likewise averages the classes with at least one positive (an absent class's F1 is 0 by
    convention, whatever the model does, and would pull the mean down).
    """
    n_classes = probs.shape[1]
    labels = list(range(n_classes))
    y_pred = predictions(probs, multilabel, threshold)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    onehot = y_true if multilabel else np.eye(n_classes, dtype=np.int64)[y_true]
    positives = onehot.sum(axis=0)
    defined = (positives > 0) & (positives < len(onehot))
    auroc = np.full(n_classes, math.nan)
    if defined.sum() == 1:
        c = int(np.flatnonzero(defined)[0])
        auroc[c] = roc_auc_score(onehot[:, c], probs[:, c])
    elif defined.any():  # one call for all classes: sklearn's input checks dominate the bootstrap's cost
        auroc[defined] = roc_auc_score(onehot[:, defined], probs[:, defined], average=None)
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1[support > 0].mean()) if (support > 0).any() else math.nan,
        "macro_auroc": float(np.nanmean(auroc)) if np.isfinite(auroc).any() else math.nan,
        "precision": precision.astype(float),
        "recall": recall.astype(float),
        "f1": f1.astype(float),
        "auroc": auroc,
        "support": support.astype(int),
    }
    if multilabel:
        out["hamming_loss"] = float(hamming_loss(y_true, y_pred))
    return out


def _ci(samples: list[float] | np.ndarray) -> list[float | None]:
    values = np.asarray(samples, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return [None, None]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _num(value: float) -> float | None:
    """JSON has no NaN: undefined metrics become null."""
    return float(value) if math.isfinite(value) else None


def evaluate_predictions(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    multilabel: bool,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = True,
    groups: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Metrics as a JSON-ready dict: every metric is `{"value", "ci95": [lo, hi]}` (None where undefined).

    `groups` (e.g. pseudonymous patient ids; None entries are groups of one): the bootstrap draws groups.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=float)
    if len(y_true) == 0:
        raise ValueError("no samples to evaluate")
    if probs.shape != (len(y_true), len(classes)):
        raise ValueError(f"probabilities of shape {probs.shape}, expected ({len(y_true)}, {len(classes)})")
    point = point_metrics(y_true, probs, multilabel, threshold)
    rng = np.random.default_rng(seed)
    scalar_keys = ["accuracy", "macro_f1", "macro_auroc"] + (["hamming_loss"] if multilabel else [])
    per_class_keys = ["precision", "recall", "f1", "auroc"]
    boot: dict[str, list] = {k: [] for k in scalar_keys + per_class_keys}
    members = _group_members(groups, len(y_true))
    units = len(y_true) if members is None else len(members)
    for _ in tqdm(range(n_bootstrap), desc="bootstrap", unit="resample", disable=not progress, leave=False):
        drawn = rng.integers(0, units, units)
        idx = drawn if members is None else np.concatenate([members[g] for g in drawn])
        m = point_metrics(y_true[idx], probs[idx], multilabel, threshold)
        for k in boot:
            boot[k].append(m[k])
    result: dict[str, Any] = {
        "n": int(len(y_true)),
        "multilabel": multilabel,
        "classes": list(classes),
        "n_bootstrap": n_bootstrap,
        "bootstrap_unit": "image" if members is None else f"group ({units} groups)",
        "absent_classes": [name for name, n in zip(classes, point["support"]) if n == 0],
    }
    if multilabel:
        result["threshold"] = threshold
    for k in scalar_keys:
        result[k] = {"value": _num(point[k]), "ci95": _ci(boot[k]) if n_bootstrap else [None, None]}
    per_class: dict[str, Any] = {}
    for c, name in enumerate(classes):
        entry: dict[str, Any] = {"support": int(point["support"][c])}
        for k in per_class_keys:
            samples = [b[c] for b in boot[k]]
            entry[k] = {"value": _num(point[k][c]), "ci95": _ci(samples) if n_bootstrap else [None, None]}
        per_class[name] = entry
    result["per_class"] = per_class
    y_pred = predictions(probs, multilabel, threshold)
    if multilabel:
        result["confusion_matrix"] = multilabel_confusion_matrix(y_true, y_pred, labels=list(range(len(classes)))).tolist()
    else:
        result["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=list(range(len(classes)))).tolist()
    return result


def _group_members(groups: Sequence[str | None] | None, n: int) -> list[np.ndarray] | None:
    """Indices per group, in first-seen order (an image without a group is a group of one); None when every
    group is a single image, so the bootstrap draws images."""
    if groups is None:
        return None
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} samples")
    members: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(("image", i) if g is None else ("group", g), []).append(i)
    return None if len(members) == n else [np.array(v) for v in members.values()]


def plot_confusion_matrix(result: dict[str, Any], path: str) -> None:
    """PNG of the confusion matrix (single-label) or one 2×2 matrix per class (multi-label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = result["classes"]
    cm = np.asarray(result["confusion_matrix"])
    if result["multilabel"]:
        fig, axes = plt.subplots(1, len(classes), figsize=(2.6 * len(classes), 2.8), squeeze=False)
        for ax, name, m in zip(axes[0], classes, cm):
            _draw_matrix(ax, m, ["no", "yes"], name)
    else:
        side = max(3.5, 0.6 * len(classes) + 2)
        fig, ax = plt.subplots(figsize=(side, side))
        _draw_matrix(ax, cm, classes, f"confusion matrix (n={result['n']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_matrix(ax: Any, m: np.ndarray, names: Sequence[str], title: str) -> None:
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    top = m.max() if m.size else 0
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(int(v)), ha="center", va="center", color="white" if v > top / 2 else "black", fontsize=8)


def metric_text(entry: dict[str, Any]) -> str:
    """`0.812 [0.700, 0.905]` for one `{"value", "ci95"}` entry of `evaluate_predictions`."""
    value, (lo, hi) = entry["value"], entry["ci95"]
    if value is None:
        return "undefined"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{value:.3f}"


__all__ = ["predictions", "point_metrics", "evaluate_predictions", "plot_confusion_matrix", "metric_text"]
