"""One writer per output folder: `pretrain` and `finetune` refuse a folder another live process writes into
(issue 14: two pretrainings into one --out both exited 0 with every step logged twice)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_cardio.atomic import LOCK
from dist_cardio.shard import ShardConfig, shard_inputs
from dist_cardio.signals.records import SAMPLE_PTBXL
from dist_cardio.signals.render import RenderConfig, render_dataset

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from pathlib import Path
from dist_cardio.atomic import output_lock
with output_lock(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dist_cardio.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> tuple[Path, Path]:
    """(rendered sample folder with labels.csv, its shard set): real pages, a few of them."""
    root = tmp_path_factory.mktemp("lock")
    render_dataset(SAMPLE_PTBXL, root / "rendered", RenderConfig(dpi=50), workers=1, limit=12)
    shard_inputs([root / "rendered" / "images"], root / "shards", ShardConfig(progress=False))
    return root / "rendered", root / "shards"


def _holder(out: Path, command: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), command], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_pretrain_and_finetune_refuse_a_folder_another_process_writes(pages, tmp_path):
    rendered, shards = pages
    out = tmp_path / "run"
    holder = _holder(out, "pretrain")
    try:
        pre = _cli("pretrain", "--config", "configs/pretrain/tiny.yaml", "--set", f"data.shards={shards}",
                   "--set", "steps=2", "--out", str(out))
        ft = _cli("finetune", "--from-scratch", "--config", "configs/finetune/tiny.yaml", "--data",
                  str(rendered / "labels.csv"), "--out", str(out), "--no-progress")
    finally:
        holder.kill()
        holder.wait()
    for result, command in ((pre, "pretrain"), (ft, "finetune")):
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last == (f"dist-cardio {command}: error: {out}: another `dist-cardio {command}` is writing here; "
                        "wait for it to finish or choose another --out"), result.stderr
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [LOCK]  # neither wrote anything


def test_a_killed_holder_leaves_no_stale_lock(pages, tmp_path):
    _, shards = pages
    out = tmp_path / "run"
    holder = _holder(out, "pretrain")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    time.sleep(0.1)
    result = _cli("pretrain", "--config", "configs/pretrain/tiny.yaml", "--set", f"data.shards={shards}",
                  "--set", "steps=2", "--set", "data.batch_size=4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "checkpoints" / "latest").is_file()
