"""`dist-cardio pretrain` end to end on real rendered PTB-XL shards: outputs, SIGTERM + resume, damaged checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dist_cardio.config import ConfigError
from dist_cardio.train.pretrain import load_pretrain_config
from dist_cardio.signals.render import RenderConfig, render_dataset
from dist_cardio.shard import ShardConfig, shard_inputs

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "pretrain" / "tiny.yaml"
PYTHON = REPO / ".venv" / "bin" / "python"
STEPS = 40


def _shards(records: Path, work: Path, limit: int) -> Path:
    render_dataset(records, work / "rendered", RenderConfig(dpi=50, format="jpg"), limit=limit)
    shard_inputs([work / "rendered" / "images"], work / "shards", ShardConfig(max_side=256, workers=1, progress=False, max_count=16))
    return work / "shards"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 printouts rendered from the package's PTB-XL sample, in 3 shards."""
    return _shards(REPO / "dist_cardio" / "sample" / "ptbxl", tmp_path_factory.mktemp("pretrain-data"), 48)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def _command(shards: Path, out: Path, *extra: str, launcher: tuple[str, ...] = (str(PYTHON),)) -> list[str]:
    sets = [f"data.shards={shards}", "data.batch_size=8", f"steps={STEPS}", "log_every=1", "checkpoint.every=10",
            "checkpoint.keep=2", *extra]
    return [*launcher, "-m", "dist_cardio.cli", "pretrain", "--config", str(CONFIG), "--out", str(out),
            *(a for s in sets for a in ("--set", s))]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=REPO)


def _metrics(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _latest(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "latest", map_location="cpu", weights_only=True)


def _interrupt_after(cmd: list[str], out: Path, step: int, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """Start ``cmd``, send SIGTERM once metrics.jsonl shows ``step``; returns the finished process and its output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    return proc, output


def _assert_same_run(expected_out: Path, out: Path) -> None:
    """The resumed run logged the same losses and ended with the same weights as the uninterrupted one."""
    expected, got = _metrics(expected_out), _metrics(out)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    a, b = _latest(expected_out)["model"], _latest(out)["model"]
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


@pytest.fixture(scope="module")
def straight_run(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    result = _run(_command(shards, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_run_writes_logs_curve_checkpoints_and_a_summary(straight_run):
    out = straight_run
    losses = _metrics(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 < r["spread"] < 1.5 for r in rows)  # the collapse monitor is logged on every row
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000030.pt", "step-00000040.pt"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["interrupted"] is False and summary["global_batch"] == 8
    assert summary["final_loss"] == pytest.approx(losses[STEPS], rel=1e-6)
    state = _latest(out)
    assert state["step"] == STEPS and state["config"]["data"]["batch_size"] == 8
    assert len(state["data"]) == len(state["rng"]) == 1 and state["schedule"]["lr"].shape == (STEPS,)
    assert load_pretrain_config(out / "config.yaml").steps == STEPS  # the saved config reloads as is


def test_progress_lines_and_derived_values_are_printed(shards, tmp_path):
    result = _run(_command(shards, tmp_path / "run", "steps=4", "log_every=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 8 (8 per rank × 1 ranks); peak LR 0.5657" in result.stdout  # 0.2 × √8
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all(k in lines[0] for k in ("loss", "spread", "lr", "img/s", "data", "eta"))


def test_sigterm_then_resume_gives_the_uninterrupted_run(shards, straight_run, tmp_path):
    out = tmp_path / "run"
    proc, output = _interrupt_after(_command(shards, out), out, step=12)
    assert proc.returncode == 143, output[-3000:]  # stopped cleanly by SIGTERM, after saving
    stopped = _latest(out)["step"]
    assert 12 <= stopped < STEPS
    assert f"SIGTERM: stopped after step {stopped}" in output

    result = _run(_command(shards, out))  # the same command resumes by itself
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at step {stopped}" in result.stdout
    _assert_same_run(straight_run, out)


def test_a_collapsing_run_is_flagged_once_after_warmup(shards, tmp_path):
    # Decay every weight matrix to ~0 within a few steps: all images then map to the same embedding.
    out = tmp_path / "run"
    result = _run(_command(shards, out, "steps=24", "optim.weight_decay=100", "optim.trust_coefficient=0.5"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["spread"] < 0.05 and rows[-1]["loss"] == pytest.approx(math.log(2 * 8 - 1), abs=0.01)
    assert result.stdout.count("warning: the embeddings have collapsed") == 1
    assert "warmup 12 steps" in result.stdout
    # The warning follows the progress line of the first row after warmup whose spread is below 0.05.
    first = next(r["step"] for r in rows if r["step"] > 12 and r["spread"] < 0.05)
    lines = result.stdout.splitlines()
    warned_at = next(i for i, line in enumerate(lines) if "have collapsed" in line)
    assert lines[warned_at - 1].startswith(f"step {first}/24 ")


def test_damaged_checkpoint_stops_the_run_with_a_clear_error(shards, straight_run, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    latest = out / "checkpoints" / "latest"
    data = (straight_run / "checkpoints" / "latest").read_bytes()
    latest.write_bytes(data[: len(data) // 3])
    result = _run(_command(shards, out, f"steps={STEPS + 10}"))
    assert result.returncode == 2
    assert f"{latest}: unreadable checkpoint" in result.stderr and "new output directory" in result.stderr
    assert latest.read_bytes() == data[: len(data) // 3]  # not overwritten by a fresh start
    assert not (out / "metrics.jsonl").exists()


def test_a_full_disk_stops_pretraining_in_one_line_and_the_same_command_resumes(shards, straight_run, small_disk):
    """A real tmpfs with room for 1.5 checkpoints: the first save fits, the second does not."""
    size = (straight_run / "checkpoints" / "step-00000040.pt").stat().st_size
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    out = small_disk / "run"
    out.mkdir()
    stats = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - int(1.5 * size) - 400_000))
    full = _run(_command(shards, out))
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert lines[-1].startswith(f"dist-cardio pretrain: error: {out}/checkpoints/step-00000020.pt: not written "
                                "(No space left on device)"), full.stderr[-3000:]
    assert "still holds the last saved step" in lines[-1] and "re-run the same command" in lines[-1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000010.pt"]  # no temporaries
    assert _latest(out)["step"] == 10

    filler.unlink()
    result = _run(_command(shards, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step 10" in result.stdout
    _assert_same_run(straight_run, out)


def test_resume_refuses_a_changed_batch_size(shards, straight_run, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_bytes((straight_run / "checkpoints" / "latest").read_bytes())
    result = _run(_command(shards, out, "data.batch_size=4"))
    assert result.returncode == 2
    assert "LR schedule differs" in result.stderr and "new --out" in result.stderr


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key 'optim.lr'"):
        load_pretrain_config(CONFIG, ["optim.lr=0.1"])
    with pytest.raises(ConfigError, match="exactly one of steps and epochs"):
        load_pretrain_config(CONFIG, ["epochs=3"])
    with pytest.raises(ConfigError, match="must equal the views'"):
        load_pretrain_config(CONFIG, ["augment.size=96"])
    with pytest.raises(ConfigError, match="must equal the views'"):
        load_pretrain_config(CONFIG, ["augment.height=48"])
    cfg = load_pretrain_config(REPO / "configs" / "pretrain" / "default.yaml")
    assert cfg.model.input_shape == cfg.augment.shape == (544, 768) and cfg.engine.zero_stage == 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed", "accelerate"])
def test_two_process_torchrun_sigterm_and_resume(shards, tmp_path, backend):
    torchrun = (str(REPO / ".venv" / "bin" / "torchrun"), "--standalone", "--nproc_per_node", "2")
    straight, out = tmp_path / "straight", tmp_path / "run"
    extra = (f"engine.backend={backend}", "data.batch_size=4")
    result = _run(_command(shards, straight, *extra, launcher=torchrun), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 8 (4 per rank × 2 ranks)" in result.stdout
    proc, output = _interrupt_after(_command(shards, out, *extra, launcher=torchrun), out, step=12, timeout=600)
    stopped = _latest(out)["step"]
    assert 12 <= stopped < STEPS, output[-3000:]
    assert len(_latest(out)["data"]) == 2  # each rank's data position
    result = _run(_command(shards, out, *extra, launcher=torchrun), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(straight, out)


@pytest.mark.slow
def test_loss_falls_and_knn_rises_on_real_ptbxl_printouts(shared_data, tmp_path):
    """cpu-small at its own geometry on 64 real PTB-XL records (100 dpi): the contrastive loss falls, the
    embeddings spread out, and the k-NN monitor's macro-AUROC on the labelled pages rises during the run and
    ends above chance. (An untrained network's random features already score ~0.65 here, and the first
    steps lose that before pretraining builds its own: measured 0.655 → 0.574 → 0.599 → 0.643.)"""
    work = tmp_path / "data"
    render_dataset(shared_data / "ptbxl-500", work / "rendered", RenderConfig(dpi=100), limit=64)
    shard_inputs([work / "rendered" / "images"], work / "shards",
                 ShardConfig(labels=str(work / "rendered" / "labels.csv"), max_side=640, workers=1, progress=False))
    out = tmp_path / "run"
    sets = [f"data.shards={work / 'shards'}", "data.batch_size=16", "steps=60", "log_every=10",
            f"monitor.shards={work / 'shards'}", "monitor.every=20"]
    result = _run([str(PYTHON), "-m", "dist_cardio.cli", "pretrain", "--config", str(REPO / "configs" / "pretrain" / "cpu-small.yaml"),
                   "--out", str(out), *(a for s in sets for a in ("--set", s))], timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert min(losses[-2:]) < losses[0] - 0.3, losses
    assert rows[-1]["spread"] > 0.1 and "have collapsed" not in result.stdout
    knn = [r["knn_auroc"] for r in rows if "knn_auroc" in r]
    start = json.loads((out / "summary.json").read_text())["knn_start"]["knn_auroc"]
    assert len(knn) == 3 and "k-NN AUROC" in result.stdout
    assert 0.0 < start < 1.0
    assert knn[-1] > 0.55 and knn[-1] > knn[0], (start, knn)
