"""Hostile image files in front of `finetune`, `evaluate`, `predict` and `explain`: a FIFO named like an image (used to
hang), a link to /dev/zero (used to read without end), a link out of the data folder, a JPEG cut mid-stream (used to be
predicted as if whole), an empty file under a patient's name. Each is refused and listed in the run's own report; the
console names no file; nothing hangs."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from dist_cardio import cli

PATIENT = "Smith_John_1950-03-02"
CUT_JPEG = "cut-scan.jpg"


def hostile_files(folder: Path, shared_data: Path, outside: Path) -> dict[str, str]:
    """Put the hostile files into `folder`; returns name → what its refusal says."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    outside.mkdir(parents=True, exist_ok=True)
    shutil.copy(shared_data / "ecg-printouts" / "ecg00001.png", outside / "elsewhere.png")
    (folder / "away.png").symlink_to(outside / "elsewhere.png")
    scan = (shared_data / "ecg-printouts" / "ecg00005.jpg").read_bytes()
    (folder / CUT_JPEG).write_bytes(scan[: len(scan) // 3] + scan[-1000:])
    (folder / f"{PATIENT}.png").write_bytes(b"")
    return {"fifo.png": "not a regular file", "zero.png": "not a regular file", "away.png": "outside the input folder",
            CUT_JPEG: "undecodable JPEG", f"{PATIENT}.png": "empty"}


@pytest.fixture
def hostile_hospital(finetuned, shared_data, tmp_path) -> tuple[Path, dict[str, str]]:
    """The fine-tuned model's hospital folder plus hostile files in its NORM class."""
    _, hospital = finetuned
    copy = tmp_path / "hospital"
    shutil.copytree(hospital, copy)
    expected = hostile_files(copy / "NORM", shared_data, tmp_path / "outside")
    expected["zero.png"] = "outside the input folder"  # /dev/zero is outside too: refused before its kind is looked at
    return copy, expected


def assert_console_names_no_file(text: str, names: dict[str, str]) -> None:
    for name in (*names, PATIENT, "Smith"):
        assert name not in text, (name, text[-2000:])


def reasons_in(report: Path) -> dict[str, str]:
    return {Path(line.split("\t")[0]).name: line.split("\t")[1] for line in report.read_text().splitlines()}


@pytest.mark.timeout(300)
def test_finetune_lists_hostile_files_in_its_report_and_names_none_on_the_console(hostile_hospital, tmp_path, capfd, caplog):
    data, expected = hostile_hospital
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        rc = cli.main(["finetune", "--from-scratch", "--data", str(data), "--out", str(out), "--config",
                       "configs/finetune/tiny.yaml", "--set", "stages=[{epochs: 1, lr: 0.003}]", "--no-progress"])
    console = capfd.readouterr()
    assert rc == 0, console.err[-2000:]
    reasons = reasons_in(out / "unreadable.txt")
    assert set(reasons) == set(expected)
    for name, says in expected.items():
        assert says in reasons[name], (name, reasons[name])
    assert_console_names_no_file(console.out + console.err + caplog.text, expected)
    assert f"left out {len(expected)} unreadable images" in caplog.text and str(out / "unreadable.txt") in caplog.text


@pytest.mark.timeout(300)
def test_evaluate_reports_hostile_files_beside_its_metrics(finetuned, hostile_hospital, tmp_path, capfd, caplog):
    run, _ = finetuned
    data, expected = hostile_hospital
    out = tmp_path / "eval"
    with caplog.at_level(logging.INFO):
        rc = cli.main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--subset", "all", "--out", str(out),
                       "--n-bootstrap", "0", "--no-progress"])
    console = capfd.readouterr()
    assert rc == 0, console.err[-2000:]
    assert set(reasons_in(out / "unreadable.txt")) == set(expected)
    assert json.loads((out / "metrics.json").read_text())["left_out"]["unreadable"] == len(expected)
    assert_console_names_no_file(console.out + console.err + caplog.text, expected)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", ["predict", "explain"])
def test_predict_and_explain_refuse_hostile_files_and_exit_1(command, finetuned, shared_data, tmp_path, capfd, caplog):
    run, hospital = finetuned
    incoming = tmp_path / "incoming"
    shutil.copy(next(hospital.rglob("*.png")), tmp_path / "good.png")
    expected = hostile_files(incoming, shared_data, tmp_path / "outside")
    expected.pop("away.png")  # predict and explain read what they are given, links included (no data root)
    (incoming / "away.png").unlink()
    out = tmp_path / ("p.csv" if command == "predict" else "explain")
    with caplog.at_level(logging.INFO):
        rc = cli.main([command, str(tmp_path / "good.png"), str(incoming), "/dev/zero", "--checkpoint", str(run),
                       "--out", str(out), "--no-progress"])
    console = capfd.readouterr()
    assert rc == 1, console.err[-2000:]
    expected["zero"] = "not a regular file"  # /dev/zero named directly
    if command == "predict":
        with open(out) as f:
            rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
        assert rows["good.png"]["error"] == "" and rows["good.png"]["prediction"]
        got = {name: rows[name]["error"] for name in rows if name != "good.png"}
    else:
        audit = json.loads((out / "audit.json").read_text())
        assert audit["images"] == 1
        got = {Path(item["path"]).name: item["reason"] for item in audit["unreadable"]}
    assert set(got) == set(expected)
    for name, says in expected.items():
        assert says in got[name], (name, got[name])
    assert f"{len(expected)} unreadable images" in console.err
    assert_console_names_no_file(console.out + console.err + caplog.text, expected)
