"""Metrics against hand-computed references and scikit-learn, and the bootstrap's behaviour."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, hamming_loss, precision_recall_fscore_support, roc_auc_score

from dist_cardio.downstream import metrics
from dist_cardio.downstream.metrics import evaluate_predictions, plot_confusion_matrix, point_metrics

# Six images, three classes; predictions (argmax): 0, 1, 1, 2, 2, 2.
Y_SINGLE = np.array([0, 0, 1, 1, 2, 2])
P_SINGLE = np.array([
    [0.7, 0.2, 0.1],
    [0.3, 0.6, 0.1],
    [0.2, 0.5, 0.3],
    [0.1, 0.3, 0.6],
    [0.1, 0.2, 0.7],
    [0.1, 0.2, 0.7],
])

# Four images, two labels; thresholded at 0.5: [1,0], [0,1], [1,1], [0,0].
Y_MULTI = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
P_MULTI = np.array([[0.9, 0.2], [0.4, 0.8], [0.6, 0.7], [0.1, 0.3]])


def test_single_label_matches_hand_computed_reference():
    m = point_metrics(Y_SINGLE, P_SINGLE, multilabel=False)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class 0: TP 1, FP 0, FN 1; class 1: TP 1, FP 1, FN 1; class 2: TP 2, FP 1, FN 0
    assert m["precision"] == pytest.approx([1.0, 0.5, 2 / 3])
    assert m["recall"] == pytest.approx([0.5, 0.5, 1.0])
    assert m["f1"] == pytest.approx([2 / 3, 0.5, 0.8])
    assert m["macro_f1"] == pytest.approx(59 / 90)
    # AUROC by counting correctly ordered (positive, negative) pairs: 8/8, 6/8, 8/8
    assert m["auroc"] == pytest.approx([1.0, 0.75, 1.0])
    assert m["macro_auroc"] == pytest.approx(11 / 12)
    assert list(m["support"]) == [2, 2, 2]


def test_multi_label_matches_hand_computed_reference():
    m = point_metrics(Y_MULTI, P_MULTI, multilabel=True, threshold=0.5)
    assert m["accuracy"] == pytest.approx(0.5)  # exact-match rows 0 and 3
    assert m["precision"] == pytest.approx([0.5, 1.0])
    assert m["recall"] == pytest.approx([0.5, 1.0])
    assert m["macro_f1"] == pytest.approx(0.75)
    assert m["hamming_loss"] == pytest.approx(2 / 8)
    assert m["auroc"] == pytest.approx([0.75, 1.0])
    assert m["macro_auroc"] == pytest.approx(0.875)


def test_report_is_json_ready_with_confusion_matrix_and_cis(tmp_path):
    r = evaluate_predictions(Y_SINGLE, P_SINGLE, ["a", "b", "c"], multilabel=False, n_bootstrap=200, progress=False)
    json.dumps(r, allow_nan=False)
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert r["accuracy"]["value"] == pytest.approx(4 / 6)
    for key in ("accuracy", "macro_f1", "macro_auroc"):
        lo, hi = r[key]["ci95"]
        assert lo <= r[key]["value"] <= hi
        assert lo < hi  # six images: the interval must be wide
    assert r["per_class"]["b"]["auroc"]["value"] == pytest.approx(0.75)
    plot_confusion_matrix(r, str(tmp_path / "cm.png"))
    assert (tmp_path / "cm.png").stat().st_size > 1000

    rm = evaluate_predictions(Y_MULTI, P_MULTI, ["x", "y"], multilabel=True, n_bootstrap=50, progress=False)
    assert np.array(rm["confusion_matrix"]).shape == (2, 2, 2)
    plot_confusion_matrix(rm, str(tmp_path / "cm_multi.png"))
    assert (tmp_path / "cm_multi.png").stat().st_size > 1000


def test_bootstrap_is_reproducible_and_degenerate_for_perfect_predictions():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    probs = np.eye(3)[y] * 0.6 + rng.random((300, 3)) * 0.5
    a = evaluate_predictions(y, probs, ["a", "b", "c"], False, n_bootstrap=100, seed=7, progress=False)
    b = evaluate_predictions(y, probs, ["a", "b", "c"], False, n_bootstrap=100, seed=7, progress=False)
    assert a == b
    perfect = evaluate_predictions(y, np.eye(3)[y], ["a", "b", "c"], False, n_bootstrap=100, progress=False)
    assert perfect["macro_f1"]["ci95"] == [1.0, 1.0]
    assert perfect["accuracy"]["value"] == 1.0


def test_undefined_auroc_is_null_and_left_out_of_the_macro_mean():
    y = np.array([0, 0, 1, 1])  # class 2 never occurs
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.4, 0.3]])
    r = evaluate_predictions(y, probs, ["a", "b", "c"], False, n_bootstrap=20, progress=False)
    assert r["per_class"]["c"]["auroc"]["value"] is None
    assert r["macro_auroc"]["value"] == pytest.approx(1.0)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        evaluate_predictions(Y_SINGLE, P_SINGLE[:, :2], ["a", "b", "c"], False, n_bootstrap=0)


def test_macro_f1_averages_the_classes_present_and_names_the_absent_ones():
    y = np.array([0, 0, 1, 1])  # class c never occurs and is never predicted
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    r = evaluate_predictions(y, probs, ["a", "b", "c"], False, n_bootstrap=50, progress=False)
    assert r["macro_f1"]["value"] == pytest.approx(1.0)  # not 2/3: c has no case to recall
    assert r["absent_classes"] == ["c"] and r["per_class"]["c"]["support"] == 0
    assert r["macro_f1"]["ci95"] == [1.0, 1.0]  # resamples missing a class do not drop to 0.5 either


def test_bootstrap_resamples_patients_when_images_come_in_groups():
    """12 patients × 8 images; a patient's images are all right or all wrong (what a model does with one person's
    ECGs). Resampling images treats 96 images as independent and gives a far too narrow interval."""
    rng = np.random.default_rng(3)
    right = np.repeat(rng.permutation([True] * 6 + [False] * 6), 8)
    y = np.tile([0, 1], 48)
    probs = np.where(right[:, None], np.eye(2)[y], np.eye(2)[1 - y]) * 0.8 + 0.1
    patients = [f"pt{i // 8}" for i in range(96)]
    by_image = evaluate_predictions(y, probs, ["a", "b"], False, n_bootstrap=400, progress=False)
    by_patient = evaluate_predictions(y, probs, ["a", "b"], False, n_bootstrap=400, progress=False, groups=patients)
    assert by_image["bootstrap_unit"] == "image" and by_patient["bootstrap_unit"] == "group (12 groups)"
    assert by_image["accuracy"]["value"] == by_patient["accuracy"]["value"] == pytest.approx(0.5)
    width = {k: r["accuracy"]["ci95"][1] - r["accuracy"]["ci95"][0] for k, r in (("image", by_image), ("patient", by_patient))}
    # 95 % binomial half-widths: 1.96·√(.25/96) ≈ 0.10 for images, 1.96·√(.25/12) ≈ 0.28 for patients
    assert width["image"] < 0.25 and width["patient"] > 0.45, width
    ungrouped = evaluate_predictions(y, probs, ["a", "b"], False, n_bootstrap=400, progress=False, groups=[None] * 96)
    assert ungrouped["bootstrap_unit"] == "image" and ungrouped["accuracy"] == by_image["accuracy"]


def _sklearn_metrics(y_true: np.ndarray, probs: np.ndarray, multilabel: bool, threshold: float) -> dict:
    """The reference: scikit-learn per metric, as `point_metrics` computed it before it was vectorised."""
    n_classes = probs.shape[1]
    y_pred = (probs >= threshold).astype(np.int64) if multilabel else probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(n_classes)), average=None, zero_division=0)
    onehot = y_true if multilabel else np.eye(n_classes, dtype=np.int64)[y_true]
    auroc = np.array([roc_auc_score(onehot[:, c], probs[:, c]) if 0 < onehot[:, c].sum() < len(onehot) else math.nan
                      for c in range(n_classes)])
    out = {
        "accuracy": accuracy_score(y_true, y_pred),
        "macro_f1": f1[support > 0].mean() if (support > 0).any() else math.nan,
        "macro_auroc": np.nanmean(auroc) if np.isfinite(auroc).any() else math.nan,
        "precision": precision, "recall": recall, "f1": f1, "auroc": auroc, "support": support,
    }
    if multilabel:
        out["hamming_loss"] = hamming_loss(y_true, y_pred)
    return out


def _random_case(rng: np.random.Generator, n: int, multilabel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Five classes, probabilities on a 0.1 grid (many ties); class 3 never occurs, and in multi-label class 1
    occurs in every image (AUROC undefined both ways)."""
    probs = rng.integers(0, 11, (n, 5)) / 10
    if not multilabel:
        return rng.choice([0, 1, 2, 4], n), probs
    y = (rng.random((n, 5)) < 0.4).astype(np.int64)
    y[:, 3], y[:, 1] = 0, 1
    return y, probs


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_point_metrics_equal_scikit_learn(multilabel, threshold):
    rng = np.random.default_rng(11)
    for n in [3, 5, 8, 40, 300] * 4:  # small sets also give classes absent by chance, or a single defined AUROC
        y, probs = _random_case(rng, n, multilabel)
        ours, ref = point_metrics(y, probs, multilabel, threshold), _sklearn_metrics(y, probs, multilabel, threshold)
        assert list(ours) == list(ref)
        for k in ref:
            assert np.allclose(ours[k], ref[k], rtol=1e-12, atol=0, equal_nan=True), (n, k, ours[k], ref[k])
        assert isinstance(ours["accuracy"], float) and ours["support"].dtype.kind == "i"


def _first_seen_members(groups: list) -> list[np.ndarray]:
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(("image", i) if g is None else g, []).append(i)
    return [np.array(v) for v in members.values()]


def _sklearn_bootstrap_cis(y, probs, multilabel, threshold, n_bootstrap, seed, groups) -> dict[str, np.ndarray]:
    """Percentile CIs from a plain loop: one draw and one scikit-learn evaluation per resample."""
    members = None if groups is None else _first_seen_members(groups)
    units = len(y) if members is None else len(members)
    rng = np.random.default_rng(seed)
    samples: dict[str, list] = {}
    for _ in range(n_bootstrap):
        drawn = rng.integers(0, units, units)
        idx = drawn if members is None else np.concatenate([members[g] for g in drawn])
        for k, v in _sklearn_metrics(y[idx], probs[idx], multilabel, threshold).items():
            samples.setdefault(k, []).append(v)
    cis = {}
    for k, v in samples.items():
        values = np.array(v, dtype=float).reshape(n_bootstrap, -1)
        cis[k] = np.array([np.percentile(col[np.isfinite(col)], [2.5, 97.5]) if np.isfinite(col).any()
                           else [math.nan, math.nan] for col in values.T])
    return cis


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("unit", ["image", "group"])
def test_bootstrap_cis_equal_a_per_resample_scikit_learn_loop(multilabel, unit, monkeypatch):
    rng = np.random.default_rng(5)
    y, probs = _random_case(rng, 40, multilabel)
    groups = None if unit == "image" else [None if g > 12 else f"pt{g}" for g in rng.integers(0, 16, 40)]
    classes = list("abcde")
    ref = _sklearn_bootstrap_cis(y, probs, multilabel, 0.4, 100, 3, groups)
    results = [evaluate_predictions(y, probs, classes, multilabel, 0.4, 100, 3, False, groups)]
    monkeypatch.setattr(metrics, "_CHUNK_BYTES", 7 * metrics._ARRAYS_PER_CHUNK * 8 * 40)  # chunks of 7 resamples
    results.append(evaluate_predictions(y, probs, classes, multilabel, 0.4, 100, 3, False, groups))
    expected_unit = "image" if groups is None else f"group ({len(_first_seen_members(groups))} groups)"
    assert results[0]["bootstrap_unit"] == expected_unit
    for r in results:
        for k in ["accuracy", "macro_f1", "macro_auroc"] + (["hamming_loss"] if multilabel else []):
            assert np.allclose(np.array(r[k]["ci95"], dtype=float), ref[k][0], equal_nan=True), (k, r[k], ref[k])
        for k in ["precision", "recall", "f1", "auroc"]:
            ours = np.array([r["per_class"][c][k]["ci95"] for c in classes], dtype=float)
            assert np.allclose(ours, ref[k], equal_nan=True), (k, ours, ref[k])
