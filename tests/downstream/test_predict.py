"""Commands that read a fine-tuned model: predict (survives bad files), evaluate, explain.

The `finetuned` fixture (a quick fine-tune on rendered PTB-XL pages) is in `conftest.py`."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_cardio import cli
from dist_cardio.downstream.gradcam import explain_files
from dist_cardio.downstream.page import PageConfig
from dist_cardio.downstream.page_input import image_files
from dist_cardio.downstream.predict import evaluate_data, load_finetuned
from dist_cardio.downstream.predictions import predict_files


def _bad_files(folder: Path, good: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    truncated = folder / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:700])
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    text = folder / "notes.png"
    text.write_text("patient called, rescan tomorrow\n")
    return [truncated, empty, text]


def test_predict_survives_corrupt_files(finetuned, tmp_path):
    run, hospital = finetuned
    good = sorted(hospital.rglob("*.png"))[:5]
    bad = _bad_files(tmp_path / "incoming", good[0])
    model = load_finetuned(run / "best.pt")
    results, errors = predict_files(model, good[:2] + bad + good[2:], batch_size=3, progress=False)
    assert [f for f, _ in results] == good
    assert {f for f, _ in errors} == set(bad)
    reasons = dict(errors)
    assert "truncated PNG" in reasons[bad[0]] and "not an image" in reasons[bad[2]]
    probs = np.stack([p for _, p in results])
    assert probs.shape == (5, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    out = tmp_path / "preds.csv"
    code = cli.main(["predict", *map(str, good), str(tmp_path / "incoming"), "--checkpoint", str(run),
                     "--out", str(out), "--no-progress"])
    assert code == 1  # some files unreadable: still a CSV for the rest
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    by_path = {Path(r["path"]).name: r for r in rows}
    assert by_path["truncated.png"]["error"] and by_path["truncated.png"]["p_MI"] == ""
    for f in good:
        row = by_path[f.name]
        assert row["error"] == "" and row["prediction"] in ("MI", "NORM", "STTC")
        assert sum(float(row[f"p_{c}"]) for c in ("MI", "NORM", "STTC")) == pytest.approx(1.0, abs=1e-4)


def test_predict_rejects_a_missing_path_and_a_non_checkpoint(finetuned, tmp_path):
    run, _ = finetuned
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        image_files([tmp_path / "nowhere.png"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_finetuned(tmp_path / "junk.pt")
    assert cli.main(["predict", str(run), "--checkpoint", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "p.csv")]) == 2


def test_evaluate_finds_the_runs_test_images_and_matches_finetune(finetuned, tmp_path):
    run, hospital = finetuned
    model = load_finetuned(run)
    metrics = evaluate_data(model, hospital, "auto", n_bootstrap=20, progress=False)
    reported = json.loads((run / "metrics.json").read_text())
    assert metrics["subset"] == "test"
    assert metrics["n"] == reported["summary"]["images"]["test"]
    assert metrics["macro_f1"]["value"] == pytest.approx(reported["test"]["macro_f1"]["value"])
    assert metrics["confusion_matrix"] == reported["test"]["confusion_matrix"]
    everything = evaluate_data(model, hospital, "all", n_bootstrap=0, progress=False)
    assert everything["n"] == sum(reported["summary"]["images"][s] for s in ("train", "val", "test"))

    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(hospital), "--out", str(out),
                     "--n-bootstrap", "30", "--no-progress"]) == 0
    written = json.loads((out / "metrics.json").read_text())
    assert set(written["per_class"]) == {"MI", "NORM", "STTC"}
    lo, hi = written["accuracy"]["ci95"]
    assert lo <= written["accuracy"]["value"] <= hi
    assert (out / "confusion_matrix.png").stat().st_size > 1000


def test_explain_writes_overlays_and_the_audit(finetuned, tmp_path, caplog):
    run, hospital = finetuned
    pages = sorted(hospital.rglob("*.png"))[:3]
    bad = _bad_files(tmp_path / "bad", pages[0])[:1]
    out = tmp_path / "explain"
    with caplog.at_level(logging.WARNING):
        code = cli.main(["explain", *map(str, pages + bad), "--checkpoint", str(run), "--out", str(out),
                         "--warn-above", "0", "--no-progress"])
    assert code == 1  # one file unreadable, as predict
    audit = json.loads((out / "audit.json").read_text())
    assert audit["images"] == 3 and audit["unreadable"][0]["path"] == str(bad[0])
    shares = [r["outside_grid_share"] for r in audit["per_image"]]
    assert audit["mean_outside_grid_share"] == pytest.approx(np.mean(shares))
    # the model was fine-tuned on pages cropped to the grid: it cannot attend outside it
    assert shares == [0.0, 0.0, 0.0]
    assert audit["flagged"] == [] and "lies outside" not in caplog.text
    for page, row in zip(pages, audit["per_image"]):
        overlay = Image.open(out / row["overlay"])
        with Image.open(page) as original:  # the whole page, at the size the grid was searched at
            assert max(overlay.size) == min(max(original.size), 512)
            assert overlay.width / overlay.height == pytest.approx(original.width / original.height, rel=0.01)
        assert row["class"] in ("MI", "NORM", "STTC") and row["grid_detected"]
    with open(out / "audit.csv") as f:
        assert len(list(csv.DictReader(f))) == 3

    # the same weights fed whole pages (page.mode none): attention can now fall on header and margins
    whole = dataclasses.replace(load_finetuned(run), page=PageConfig(mode="none"))
    with caplog.at_level(logging.WARNING):
        summary = explain_files(whole, pages, tmp_path / "whole", warn_above=0.0, progress=False)
    shares = [r["outside_grid_share"] for r in summary["per_image"]]
    assert all(0.0 < s < 1.0 for s in shares), shares
    assert summary["flagged"] == [str(p) for p in pages]
    assert "attention lies outside the ECG grid" in caplog.text
