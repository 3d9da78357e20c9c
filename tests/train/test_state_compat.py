"""Resuming checks the model/loss/optim sections; a key added later matches an older checkpoint at its default."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import typing
from pathlib import Path

import pytest
import torch

from dist_cardio.config import to_dict
from dist_cardio.shard import ShardConfig, shard_inputs
from dist_cardio.signals.render import RenderConfig, render_dataset
from dist_cardio.train.checkpoint import CheckpointManager
from dist_cardio.train.losses import LossConfig
from dist_cardio.train.pretrain import PretrainConfig
from dist_cardio.train.state import COMPARED_SECTIONS, SECTION_TYPES, same_section

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"


def test_section_types_are_the_pretrain_configs_own():
    hints = typing.get_type_hints(PretrainConfig)
    assert COMPARED_SECTIONS == ("model", "loss", "optim")
    assert {name: hints[name] for name in COMPARED_SECTIONS} == SECTION_TYPES


def test_a_key_missing_from_the_checkpoint_matches_only_at_its_default():
    current = to_dict(LossConfig(temperature=0.2))
    older = {k: v for k, v in current.items() if k != "kind"}  # written before `kind` existed
    assert same_section("loss", older, current)
    assert same_section("loss", current, current)
    assert not same_section("loss", older, to_dict(LossConfig(temperature=0.2, kind="dcl")))
    assert not same_section("loss", older, to_dict(LossConfig(temperature=0.5)))  # an old key still compares
    assert not same_section("loss", {**current, "removed": 1}, current)  # a key this run no longer knows
    assert not same_section("loss", older, {**current, "unknown": 1})  # a missing key without a default
    model = to_dict(dataclasses.replace(SECTION_TYPES["model"](), proj_norm=True))
    assert not same_section("model", {k: v for k, v in model.items() if k != "proj_norm"}, model)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def _pretrain(shards: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = [f"data.shards={shards}", "data.batch_size=8", "steps=4", "log_every=1", "checkpoint.every=2", *extra]
    cmd = [str(PYTHON), "-m", "dist_cardio.cli", "pretrain", "--config", str(REPO / "configs" / "pretrain" / "tiny.yaml"),
           "--out", str(out), *(a for s in sets for a in ("--set", s))]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=REPO)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_checkpoint_written_before_loss_kind_existed_resumes_and_a_changed_kind_is_refused(tmp_path):
    render_dataset(REPO / "dist_cardio" / "sample" / "ptbxl", tmp_path / "rendered", RenderConfig(dpi=50, format="jpg"), limit=16)
    shards = tmp_path / "shards"
    shard_inputs([tmp_path / "rendered" / "images"], shards, ShardConfig(max_side=256, workers=1, progress=False))
    straight = tmp_path / "straight"
    result = _pretrain(shards, straight)
    assert result.returncode == 0, result.stderr[-3000:]

    # the step-2 checkpoint as an older version of the package wrote it: no `kind` in its loss section
    state = torch.load(straight / "checkpoints" / "step-00000002.pt", map_location="cpu", weights_only=True)
    del state["config"]["loss"]["kind"]
    for name in ("old", "refused"):
        CheckpointManager(tmp_path / name / "checkpoints").save(state, 2)

    resumed = _pretrain(shards, tmp_path / "old")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 2" in resumed.stdout
    expected, got = _losses(straight), _losses(tmp_path / "old")
    assert sorted(got) == [3, 4] and all(got[s] == pytest.approx(expected[s], rel=1e-5) for s in got)

    refused = _pretrain(shards, tmp_path / "refused", "loss.kind=dcl")
    assert refused.returncode == 2
    error = refused.stderr.strip().splitlines()[-1]  # one line, the one it has always been
    assert error.startswith("dist-cardio pretrain: error: ") and "'loss' differs from the checkpoint's" in error
    assert "new --out" in error and "resuming" not in refused.stdout
