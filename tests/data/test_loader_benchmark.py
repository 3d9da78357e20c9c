"""``benchmarks/loader.py`` cannot print nonsense: on a real shard set with fewer samples than two batches,
every contender reports a positive, finite rate over the fixed number of timed batches (crossing epochs),
and a set smaller than one batch is refused."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from dist_cardio.shard import ShardConfig, shard_inputs

REPO = Path(__file__).resolve().parents[2]
SMALL = [f"--set={key}" for key in ("data.batch_size=8", "data.num_threads=1", "augment.size=64", "augment.height=64",
                                    "model.input_size=64", "model.input_height=64")]


def benchmark(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as when run as a script: its siblings import
    spec = importlib.util.spec_from_file_location("loader_benchmark", REPO / "benchmarks" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_shards(shared_data: Path, tmp_path_factory) -> Path:
    """10 real printouts at ≤ 256 px: one batch of 8 per epoch, 2 samples left over."""
    images = sorted(p for p in (shared_data / "ecg-printouts").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    out = tmp_path_factory.mktemp("bench") / "shards"
    shard_inputs(images[:10], out, ShardConfig(max_side=256, workers=1, progress=False))
    return out


def test_every_contender_has_a_rate_on_a_set_under_two_batches(tiny_shards: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    bench = benchmark(monkeypatch)
    out = tmp_path / "loader.json"
    report = bench.main([f"--shards=tiny={tiny_shards}", "--batches=2", "--repeat=1", f"--json={out}", *SMALL])
    assert json.loads(out.read_text()) == report
    rows = report["rows"]
    expected = {bench.contender_name(c) for c in bench.CONTENDERS if c[0] != "dali" or bench.dali_installed()}
    assert {r["contender"] for r in rows} >= expected
    for r in rows:
        assert r["samples"] == 10 < 2 * report["batch_size"], r
        assert r["timed_batches"] == 2 and r["batches_per_epoch"] == 1, r
        assert r["epochs"] == 3, r  # the warm-up batch and the 2 timed ones, one epoch each
        assert all(math.isfinite(x) and x > 0 for x in r["runs"]), r
    auto = [r for r in rows if r["auto"]]
    assert len(auto) == 1
    assert report["sets"]["tiny"]["loader_images_per_s"] == auto[0]["samples_per_s"] > 0


def test_a_set_smaller_than_one_batch_is_refused(tiny_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match="fewer than batch_size 16"):
        benchmark(monkeypatch).main([f"--shards=tiny={tiny_shards}", "--batches=1", "--repeat=1", *SMALL, "--set=data.batch_size=16"])
