"""benchmarks/gpu_check.py: its CPU mode runs every path that exists without a GPU, marks the GPU rows, and a
failure is named; the rules that judge the torchrun workers' results hold on small inputs."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
GPU_ONLY = ["dali decode, mixed (GPU)", "dali two views, mixed (GPU)", "nccl"]
NO_GPU = "not run: no GPU"


def gpu_check(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """The script as a user runs it, in its own process, from a folder that is not the repository."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--work", str(tmp_path / "work"),
                           "--json", str(tmp_path / "check.json"), *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def benchmarks(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("gpu_check"), importlib.import_module("gpu_check_train")


@pytest.mark.slow
def test_cpu_mode_runs_every_path_it_can_and_marks_the_gpu_rows(tmp_path: Path) -> None:
    result = gpu_check(tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    table = result.stdout[result.stdout.index("\ncheck "):].splitlines()
    doc = json.loads((tmp_path / "check.json").read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert doc["mode"] == "cpu" and doc["failed"] is None and doc["not_run_no_gpu"] == GPU_ONLY
    for name, row in rows.items():  # one table line per row, its status beside its name
        assert any(line.startswith(name) and row["status"] in line for line in table), name
        assert row["status"] == (NO_GPU if name in GPU_ONLY else "ok"), (name, row["status"])

    figures = {name: row["figures"] for name, row in rows.items()}
    for name, keys in {"shards": ["pages", "samples"], "dali decode, cpu": ["images_per_s"],
                       "dali two views, cpu": ["images_per_s"], "pretrain run (real loop)": ["images_per_s", "steps"],
                       "finetune": ["train_images"], "predict": ["images", "images_per_s"], "explain": ["images"]}.items():
        for key in keys:
            assert isinstance(figures[name][key], (int, float)) and figures[name][key] > 0, (name, key)
    variants = [name for name in rows if name.startswith("pretrain ") and "×" in name]
    assert len(variants) == 4 + 6 + 4  # 1 × fp32, 1 × bf16 (+ 2 contiguous), 2 × bf16
    for name in variants:
        f = figures[name]
        assert f["images_per_s"] > 0 and f["peak_mb"] > 0, name
        assert len(f["losses"]) == 4 and all(math.isfinite(x) and x > 0 for x in f["losses"]), name
    for launch, world in (("torchrun 1 × fp32", 1), ("torchrun 1 × bf16", 1), ("torchrun 2 × bf16", 2)):
        assert figures[launch]["backend"] == "gloo" and figures[launch]["world_size"] == world
    assert figures["pretrain deepspeed/plain bf16 ×1"]["param_dtype"] == "bfloat16"  # DeepSpeed casts; Accelerate autocasts
    assert figures["pretrain deepspeed/plain bf16 ×1"]["memory_format"] == "channels_last"  # the GPU's layout, run here

    tolerances = doc["tolerances"]
    for name, rtol in (("loss: deepspeed = accelerate (fp32)", tolerances["engine_rtol"]),
                       ("loss: cached = plain (fp32)", tolerances["engine_rtol"]), ("loss: bf16 ≈ fp32", tolerances["bf16_rtol"])):
        diffs = {k: v for k, v in figures[name].items() if k != "rtol"}
        assert figures[name]["rtol"] == rtol and diffs and all(0 <= v <= rtol for v in diffs.values()), (name, diffs)
    assert figures["channels-last (bf16)"]["deepspeed_x_contiguous"] > 0
    assert figures["channels-last (bf16)"]["accelerate_x_contiguous"] > 0


@pytest.mark.slow
def test_a_failure_is_named_and_blocks_only_what_needs_it(tmp_path: Path) -> None:
    (tmp_path / "data" / "ptbxl-500").mkdir(parents=True)  # a data root whose PTB-XL holds no record
    result = gpu_check(tmp_path, "--data-root", str(tmp_path / "data"))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gpu_check: FAILED at shards" in result.stderr
    doc = json.loads((tmp_path / "check.json").read_text())
    assert doc["failed"] == "shards"
    for row in doc["rows"][1:]:
        assert row["status"] == NO_GPU or row["status"].startswith("not run:"), row


def test_checks_record_status_figures_and_the_first_failure(benchmarks) -> None:
    gpu_check, train = benchmarks

    def wrong() -> None:
        raise train.CheckFailed("losses differ")

    def broken() -> None:
        raise ValueError("no such file\nsecond line")

    checks = gpu_check.Checks(gpu=False)
    checks.run("fine", lambda: {"images_per_s": 2.5})
    checks.run("gpu", lambda: {}, gpu_only=True)
    checks.run("wrong", wrong)
    checks.run("after", lambda: {}, needs=["wrong"])
    checks.run("maybe", broken, optional=True)
    checks.run("broken", broken)
    status = {r["name"]: r["status"] for r in checks.rows}
    assert status == {"fine": "ok", "gpu": NO_GPU, "wrong": "FAILED: losses differ", "after": "not run: wrong did not pass",
                      "maybe": "unsupported: ValueError: no such file", "broken": "FAILED: ValueError: no such file"}
    assert checks.first_failure()["name"] == "wrong"
    assert checks.rows[0]["figures"]["images_per_s"] == 2.5 and checks.rows[0]["figures"]["seconds"] >= 0
    assert "images_per_s=2.5" in checks.table().splitlines()[1]


def test_the_judges_of_the_worker_results(benchmarks) -> None:
    _, train = benchmarks
    assert train.agree({"plain": ([2.0, 1.0], [2.0, 1.001])}, 1e-2)["plain"] == pytest.approx(0.001 / 1.001)
    with pytest.raises(train.CheckFailed, match=r"cached: losses differ by 0.1 \(relative\) > 0.001"):
        train.agree({"plain": ([1.0], [1.0]), "cached": ([1.1], [1.0])}, 1e-3)
    laid_out = {"memory_format": "auto", "conv_inputs_channels_last": 1.0, "conv_outputs_channels_last": 1.0, "images_per_s": 30.0}
    ranks = [{"device": "cuda:0", "variants": {"deepspeed/plain": laid_out, "deepspeed/cached": {"error": "Traceback ..."},
                                                "deepspeed/plain/contiguous": {**laid_out, "memory_format": "contiguous", "images_per_s": 20.0}}}]
    assert train.channels_last(ranks) == {"variants": 1, "device": "cuda:0", "deepspeed_x_contiguous": 1.5}
    ranks[0]["variants"]["accelerate/plain"] = {**laid_out, "conv_inputs_channels_last": 0.25}  # a norm undid the layout
    with pytest.raises(train.CheckFailed, match="accelerate/plain 25% of calls"):
        train.channels_last(ranks)
    with pytest.raises(train.CheckFailed, match="expected nccl"):
        train.nccl([[{"backend": "gloo", "device_name": "cpu"}]])
