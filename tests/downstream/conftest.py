"""Shared downstream fixtures: one quick fine-tuned model on real rendered PTB-XL pages for the session (the tests
that use it only read its run folder)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from dist_cardio.downstream.finetune import load_finetune_config, run_finetune
from dist_cardio.signals.render import RenderConfig, render_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def finetuned(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, hospital folder): a quick single-label fine-tune on class folders of rendered PTB-XL pages."""
    rendered = tmp_path_factory.mktemp("rendered")
    render_dataset(shared_data / "ptbxl-500", rendered, RenderConfig(dpi=60), workers=1, limit=80)
    hospital = tmp_path_factory.mktemp("hospital")
    with open(rendered / "labels.csv") as f:
        for row in csv.DictReader(f):
            if row["label"] in ("NORM", "MI", "STTC"):
                (hospital / row["label"]).mkdir(exist_ok=True)
                shutil.copy(rendered / row["path"], hospital / row["label"])
    cfg = load_finetune_config(REPO / "configs" / "finetune" / "tiny.yaml",
                               ['stages=[{epochs: 1, lr: 0.003, groups: 1}, {epochs: 1, lr: 0.001}]', "n_bootstrap=20"])
    run = tmp_path_factory.mktemp("run")
    run_finetune(cfg, None, hospital, run, progress=False)
    return run, hospital
