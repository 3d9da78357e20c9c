"""`dist-cardio demo`: the whole pipeline on the built-in sample, every artifact checked, and a re-run resumes."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dist_cardio.signals.records import SUPERCLASSES
from dist_cardio.shard import read_manifest, verify_shard_set

REPO = Path(__file__).resolve().parents[1]


def demo(out: Path, *extra: str, threads: int = 1) -> subprocess.CompletedProcess:
    """The real command in its own process, as a user runs it (from a folder that is not the repository)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dist_cardio.cli", "demo", "--out", str(out), "--workers", "2",
                           "--no-progress", *extra], cwd=out.parent, env=env, capture_output=True, text=True, timeout=900)


def test_demo_rejects_bad_counts(tmp_path: Path) -> None:
    result = demo(tmp_path / "out", "--steps", "0")
    assert result.returncode == 2
    assert "--steps must be ≥ 1" in result.stderr
    assert not (tmp_path / "out").exists()


def decodable_png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.suffix == ".png", path
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        return img.size


@pytest.mark.slow
def test_demo_writes_every_artifact_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    first = demo(out, "--quick")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for i in range(1, 7):
        assert f"[{i}/6]" in first.stdout
    summary = json.loads((out / "demo.json").read_text())
    written = {name: Path(p) for name, p in summary["written"].items()}
    for name, path in written.items():
        assert path.is_file(), f"{name}: {path} missing"
        assert str(path) in first.stdout, f"{name} not printed"

    # render: all 200 sample records, labels in the contract's order
    with open(out / "render" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200 == len(list((out / "render" / "images").glob("*.png")))
    assert all(set(filter(None, r["label"].split(";"))) <= set(SUPERCLASSES) for r in rows)

    # shard: one verified set holding every image
    assert read_manifest(out / "shards")["totals"]["samples"] == 200
    assert verify_shard_set(out / "shards", progress=False).ok

    # pretrain: finite, logged losses and a loss curve
    losses = [json.loads(line)["loss"] for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(v) and v > 0 for v in losses)
    decodable_png(written["pretraining loss curve"])

    # evaluate: the test fold (strat_fold 10) of the labelled sample records, with CIs
    metrics = json.loads(written["test metrics"].read_text())
    test_rows = [r for r in rows if r["strat_fold"] == "10" and r["label"]]
    assert metrics["n"] == len(test_rows) and metrics["subset"] == "test" and metrics["multilabel"]
    assert set(metrics["classes"]) <= set(SUPERCLASSES)
    for key in ("accuracy", "macro_f1"):
        value, (lo, hi) = metrics[key]["value"], metrics[key]["ci95"]
        assert 0.0 <= lo <= value <= hi <= 1.0, (key, metrics[key])
    assert set(metrics["per_class"]) == set(metrics["classes"])
    assert summary["metrics"]["accuracy"] == metrics["accuracy"]
    for plot in ("confusion matrix", "training curves"):
        width, height = decodable_png(written[plot])
        assert width > 200 and height > 200

    # explain: one overlay per explained test image, and the audit lists them
    overlays = [p for name, p in written.items() if name.startswith("Grad-CAM")]
    assert len(overlays) == 4
    for p in overlays:
        decodable_png(p)
    with open(written["shortcut audit"], newline="") as f:
        audit = list(csv.DictReader(f))
    # a share per image, or empty where the quick model's Grad-CAM map is all zero (nothing to locate)
    assert len(audit) == 4 and all(r["outside_grid_share"] == "" or 0.0 <= float(r["outside_grid_share"]) <= 1.0
                                   for r in audit)

    # a second run into the same folder finishes, redoing nothing that is complete
    kept = {p: p.stat().st_mtime_ns for p in [*(out / "render" / "images").glob("*.png"), written["fine-tuned model"],
                                               *(out / "shards").glob("*.tar")]}
    second = demo(out, "--quick")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "0 rendered, 200 already there" in second.stdout
    assert "0 added, 200 already in the set" in second.stdout
    assert "already fine-tuned" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert json.loads((out / "demo.json").read_text())["metrics"] == summary["metrics"]

    # asking for a different pretraining length into the same folder is refused, and nothing is lost
    third = demo(out, "--quick", "--steps", "13")
    assert third.returncode == 1
    assert "dist-cardio demo: error:" in third.stderr and "Traceback" not in third.stderr
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


@pytest.mark.slow
def test_full_demo_reads_ecgs(tmp_path: Path) -> None:
    """The README's first command, whole (~5 minutes on 2 cores): it never reports a collapse and ends with a
    test macro-AUROC clearly above chance (0.78-0.80 measured; the guard is 0.70, 29 test records)."""
    out = tmp_path / "demo-output"
    result = demo(out, threads=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "have collapsed" not in result.stdout and "k-NN AUROC" in result.stdout
    metrics = json.loads((out / "demo.json").read_text())["metrics"]
    assert metrics["n"] == 29 and metrics["macro_auroc"]["value"] >= 0.70, metrics
    rows = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < math.log(2 * 16 - 1)  # the contrastive loss has left chance level
