"""Classification metrics with bootstrap 95% confidence intervals, vectorised in numpy over all resamples at once.

Hospital test sets are small (PTB-XL ids 1-500 give ~50 test records), so a point estimate alone
misleads: every metric is reported with a percentile bootstrap interval. When images come in groups
(a patient's several ECGs), the bootstrap resamples groups, not images: the splits keep a patient's
images together, so they are not independent draws, and resampling images narrows the intervals falsely.
Macro means (F1, AUROC) run over the classes present in the labels, and the result says which were absent:
a class with no positive case has no recall to average.
Single-label: predictions are the argmax. Multi-label (PTB-XL superclasses): a class is predicted when its
sigmoid probability reaches `threshold`; accuracy is then exact-match (subset) accuracy.

The metrics are computed in numpy for a whole chunk of resamples at once, not by scikit-learn per resample:
sklearn's input checks on every call made 1000 resamples cost ~15 s per evaluation, for a few microseconds of
arithmetic. A resample is represented by how often it draws each image, and every metric is a function of
those counts, so the point estimate is the same code with every count 1. The tests check the results against
scikit-learn (precision_recall_fscore_support with zero_division=0, roc_auc_score, accuracy_score, hamming_loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, multilabel_confusion_matrix
from tqdm import tqdm

_CHUNK_BYTES = 50_000_000
"""Memory budget of one chunk of resamples."""
_ARRAYS_PER_CHUNK = 8
"""Float arrays of shape (resamples, images) alive at once while a chunk is computed."""


def predictions(probs: np.ndarray, multilabel: bool, threshold: float = 0.5) -> np.ndarray:
    """Class ids (single-label) or a 0/1 matrix (multi-label) from probabilities."""
    return (probs >= threshold).astype(np.int64) if multilabel else probs.argmax(axis=1)


@dataclass(frozen=True)
class _Ranking:
    """One class's positives placed among its negatives by score, to count correctly ordered pairs."""

    negatives: np.ndarray  # negative images by ascending score
    positives: np.ndarray  # positive images
    below: np.ndarray  # per positive: how many of `negatives` score strictly lower
    not_above: np.ndarray  # per positive: how many of `negatives` score lower or equal


@dataclass(frozen=True)
class _Cases:
    """What every resample shares, one row per image; small integers as floats, so `counts @ rows` sums exactly."""

    truth: np.ndarray  # (n, classes) one-hot or multi-label truth
    predicted: np.ndarray  # (n, classes) one-hot or thresholded predictions
    exact: np.ndarray  # (n,) 1 where every label of the image is right
    wrong_labels: np.ndarray  # (n,) labels wrong per image
    rankings: list[_Ranking]
    multilabel: bool


def _prepare(y_true: np.ndarray, probs: np.ndarray, multilabel: bool, threshold: float) -> _Cases:
    """Sort and compare once; each resample then only weights the rows."""
    n_classes = probs.shape[1]
    y_pred = predictions(probs, multilabel, threshold)
    eye = np.eye(n_classes)
    truth = np.asarray(y_true, dtype=float) if multilabel else eye[y_true]
    predicted = y_pred.astype(float) if multilabel else eye[y_pred]
    wrong = (truth != predicted).sum(axis=1).astype(float)
    return _Cases(truth, predicted, (wrong == 0).astype(float), wrong,
                  [_ranking(probs[:, c], truth[:, c]) for c in range(n_classes)], multilabel)


def _ranking(scores: np.ndarray, positive: np.ndarray) -> _Ranking:
    negatives, positives = np.flatnonzero(positive == 0), np.flatnonzero(positive != 0)
    negatives = negatives[np.argsort(scores[negatives], kind="stable")]
    ranked = scores[negatives]
    return _Ranking(negatives, positives, np.searchsorted(ranked, scores[positives], side="left"),
                    np.searchsorted(ranked, scores[positives], side="right"))


def _metrics(counts: np.ndarray, cases: _Cases) -> dict[str, np.ndarray]:
    """Every metric for each row of `counts` (resamples × images: how often a resample draws each image).

    Per-class precision/recall/F1 with zero division giving 0 (sklearn's zero_division=0); macro-F1 over the
    classes with a positive case; AUROC where a class has positives and negatives, macro AUROC over those.
    """
    tp = counts @ (cases.truth * cases.predicted)
    support = counts @ cases.truth
    n_predicted = counts @ cases.predicted
    n = counts.sum(axis=1)
    f1 = _divide(2 * tp, support + n_predicted)
    auroc = np.stack([_auroc(counts, r) for r in cases.rankings], axis=1)
    out = {
        "accuracy": counts @ cases.exact / n,
        "macro_f1": _masked_mean(f1, support > 0),
        "macro_auroc": _masked_mean(auroc, np.isfinite(auroc)),
        "precision": _divide(tp, n_predicted),
        "recall": _divide(tp, support),
        "f1": f1,
        "auroc": auroc,
        "support": support,
    }
    if cases.multilabel:
        out["hamming_loss"] = counts @ cases.wrong_labels / (n * cases.truth.shape[1])
    return out


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (a class never predicted has precision 0, as sklearn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Row means over the masked entries; NaN for a row with none (np.nanmean would also warn)."""
    count = mask.sum(axis=1)
    total = np.where(mask, values, 0.0).sum(axis=1)
    return np.divide(total, count, out=np.full(len(total), math.nan), where=count > 0)


def _auroc(counts: np.ndarray, ranking: _Ranking) -> np.ndarray:
    """Mann-Whitney U / (positives · negatives) per resample, NaN without both positives and negatives.

    U counts (positive, negative) pairs with the positive scored higher, a tie as ½: the average-rank statistic,
    equal to sklearn's roc_auc_score. With drawn multiplicities as weights every sum is over integers (or
    halves), hence exact.
    """
    negatives = np.zeros((len(counts), len(ranking.negatives) + 1))
    np.cumsum(counts[:, ranking.negatives], axis=1, out=negatives[:, 1:])  # weight of the i lowest negatives
    doubled = negatives[:, ranking.below] + negatives[:, ranking.not_above]  # 2 · (lower + ½ tied) per positive
    positives = counts[:, ranking.positives]
    u = 0.5 * (positives * doubled).sum(axis=1)
    pairs = positives.sum(axis=1) * negatives[:, -1]
    return np.divide(u, pairs, out=np.full(len(u), math.nan), where=pairs > 0)


def _point(cases: _Cases) -> dict[str, Any]:
    """The metrics of the test set itself: the resample that draws every image once."""
    m = _metrics(np.ones((1, len(cases.exact))), cases)
    out: dict[str, Any] = {k: float(v[0]) if v.ndim == 1 else v[0] for k, v in m.items()}
    out["support"] = out["support"].astype(int)
    return out


def point_metrics(y_true: np.ndarray, probs: np.ndarray, multilabel: bool, threshold: float = 0.5) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/AUROC and macro AUROC for one set of predictions.

    AUROC of a class absent (or always present) in `y_true` is undefined: NaN, left out of the macro mean;
    macro-F1 likewise averages the classes with at least one positive (an absent class's F1 is 0 by
    convention, whatever the model does, and would pull the mean down).
    """
    return _point(_prepare(np.asarray(y_true), np.asarray(probs, dtype=float), multilabel, threshold))


def _resample_counts(draws: np.ndarray, group_of: np.ndarray | None) -> np.ndarray:
    """How often each image is in each resample (rows of `draws`: drawn images, or groups).

    The metrics depend only on these counts, so resamples of groups, whose lengths vary, need no padding.
    """
    k, units = draws.shape
    flat = (draws + units * np.arange(k)[:, None]).ravel()
    counts = np.bincount(flat, minlength=k * units).reshape(k, units)
    return (counts if group_of is None else counts[:, group_of]).astype(float)


def _bootstrap(cases: _Cases, members: list[np.ndarray] | None, n_bootstrap: int, seed: int,
               progress: bool) -> dict[str, np.ndarray]:
    """Metrics of `n_bootstrap` resamples (images, or groups of `members`), computed a chunk at a time so that
    memory stays near _CHUNK_BYTES; the draws are one `rng.integers` per resample, in order, as they always were."""
    n = len(cases.exact)
    units = n if members is None else len(members)
    group_of = None if members is None else _group_of(members, n)
    chunk = max(1, _CHUNK_BYTES // (_ARRAYS_PER_CHUNK * 8 * n))
    rng = np.random.default_rng(seed)
    parts = []
    with tqdm(total=n_bootstrap, desc="bootstrap", unit="resample", disable=not progress, leave=False) as bar:
        for start in range(0, n_bootstrap, chunk):
            draws = np.array([rng.integers(0, units, units) for _ in range(min(chunk, n_bootstrap - start))])
            parts.append(_metrics(_resample_counts(draws, group_of), cases))
            bar.update(len(draws))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _ci(samples: np.ndarray) -> list[float | None]:
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
    cases = _prepare(y_true, probs, multilabel, threshold)
    point = _point(cases)
    scalar_keys = ["accuracy", "macro_f1", "macro_auroc"] + (["hamming_loss"] if multilabel else [])
    per_class_keys = ["precision", "recall", "f1", "auroc"]
    members = _group_members(groups, len(y_true))
    units = len(y_true) if members is None else len(members)
    boot = _bootstrap(cases, members, n_bootstrap, seed, progress) if n_bootstrap else None
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
        result[k] = {"value": _num(point[k]), "ci95": _ci(boot[k]) if boot else [None, None]}
    per_class: dict[str, Any] = {}
    for c, name in enumerate(classes):
        entry: dict[str, Any] = {"support": int(point["support"][c])}
        for k in per_class_keys:
            entry[k] = {"value": _num(point[k][c]), "ci95": _ci(boot[k][:, c]) if boot else [None, None]}
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


def _group_of(members: list[np.ndarray], n: int) -> np.ndarray:
    """The group number of each image: a group drawn k times puts each of its images k times in the resample."""
    group_of = np.empty(n, dtype=np.int64)
    for g, images in enumerate(members):
        group_of[images] = g
    return group_of


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
