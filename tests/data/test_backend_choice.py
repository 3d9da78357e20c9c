"""What ``backend: auto`` decodes with on a CPU, and the start-up hint to store training-resolution shards,
on real rendered PTB-XL pages: full-size JPEGs, full-size PNGs and a ``--max-side`` copy."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dist_cardio.data import LoaderConfig, contrastive_loader
from dist_cardio.shard import ShardConfig, shard_inputs
from dist_cardio.signals.render import RenderConfig, render_dataset
from dist_cardio.train.pretrain import load_pretrain_config

REPO = Path(__file__).resolve().parents[2]
AUG = load_pretrain_config(REPO / "configs" / "pretrain" / "cpu-small.yaml", ["data.shards=x"]).augment


@pytest.fixture(scope="module")
def page_sets(shared_data: Path, tmp_path_factory) -> dict[str, Path]:
    """Six PTB-XL records at 200 dpi (2339 × 1654 px, as a scanner writes them) as JPEG and PNG, and the
    JPEGs again sharded at ``--max-side 640``."""
    work = tmp_path_factory.mktemp("pages")
    sets = {}
    for fmt in ("jpg", "png"):
        render_dataset(shared_data / "ptbxl-500", work / fmt, RenderConfig(dpi=200, format=fmt), limit=6)
        sets[f"{fmt}-full"] = work / f"shards-{fmt}"
        shard_inputs([work / fmt / "images"], sets[f"{fmt}-full"], ShardConfig(workers=1, progress=False))
    sets["jpg-640"] = work / "shards-640"
    shard_inputs([work / "jpg" / "images"], sets["jpg-640"], ShardConfig(max_side=640, workers=1, progress=False))
    return sets


def loader_for(shards: Path, backend: str = "auto"):
    return contrastive_loader(LoaderConfig(shards=str(shards), backend=backend, batch_size=2, num_threads=1), AUG, 0, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU auto is DALI's nvJPEG for every set")
def test_auto_takes_the_dct_scaled_decoder_for_large_jpegs_and_dali_otherwise(page_sets):
    # DALI's CPU decoder decodes every pixel of a 3.9 MP page; PIL's DCT scaling decodes a quarter of them
    # and the smallest crop still holds ≥ 512 px. A PNG or a 640 px copy gives DCT scaling nothing to skip.
    assert loader_for(page_sets["jpg-full"]).plan.backend == "torchvision"
    assert loader_for(page_sets["jpg-full"]).plan.decode == "reduced"
    assert loader_for(page_sets["png-full"]).plan.backend == "dali"
    assert loader_for(page_sets["jpg-640"]).plan.backend == "dali"


def test_oversized_pages_get_a_max_side_hint_once_at_start(page_sets, caplog):
    caplog.set_level(logging.WARNING, logger="dist_cardio.data.loader")
    loader_for(page_sets["png-full"])
    hints = [r.getMessage() for r in caplog.records if "--max-side" in r.getMessage()]
    assert len(hints) == 1
    assert "2339 × 1654" in hints[0] and str(page_sets["png-full"]) in hints[0]
    side = int(hints[0].rsplit("--max-side ", 1)[1])
    assert side % 64 == 0 and 1024 <= side < 2339  # every pixel a view can use, and fewer than stored

    caplog.clear()
    loader_for(page_sets["jpg-640"])  # already at training resolution
    loader_for(page_sets["jpg-full"])  # auto decodes these JPEGs DCT-scaled: nothing more to gain
    assert not [r for r in caplog.records if "--max-side" in r.getMessage()]

    loader_for(page_sets["jpg-full"], backend="dali")  # DALI decodes every pixel of them
    assert [r for r in caplog.records if "--max-side" in r.getMessage()]


def test_the_suggested_max_side_keeps_the_smallest_crop_at_full_resolution(page_sets, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dist_cardio.data.loader")
    loader_for(page_sets["png-full"])
    side = int(next(r.getMessage() for r in caplog.records if "--max-side" in r.getMessage()).rsplit(" ", 1)[1])
    w, h = side, round(side * 1654 / 2339)
    assert w * h >= AUG.min_source_area()
    caplog.clear()
    resharded = tmp_path / "resharded"
    shard_inputs([page_sets["png-full"].parent / "png" / "images"], resharded,
                 ShardConfig(max_side=side, workers=1, progress=False))
    loader_for(resharded)
    assert not [r for r in caplog.records if "--max-side" in r.getMessage()]
