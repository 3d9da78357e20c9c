"""Metrics against hand-computed references on fixed predictions, and the bootstrap's behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest

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
