"""The geometry every command feeds the cpu-small model: the page's aspect and ≥ 1.7 px per mm of paper.

Pretraining views, fine-tuning, evaluate, predict and explain all hand the network 512 × 352 px (width ×
height) images of rendered PTB-XL pages; these tests read the shapes off the real code paths (a forward
hook on the model) and measure px/mm against the page's own ECG grid, whose size in mm the renderer fixes.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from dist_cardio.data import contrastive_loader
from dist_cardio.downstream.finetune import load_finetune_config, run_finetune
from dist_cardio.downstream.gradcam import explain_files
from dist_cardio.downstream.page import find_grid
from dist_cardio.downstream.predict import evaluate_data, load_finetuned
from dist_cardio.downstream.predictions import predict_files
from dist_cardio.model import preset
from dist_cardio.shard import ShardConfig, shard_inputs
from dist_cardio.signals.render import PAGE_MM, RenderConfig, render_dataset
from dist_cardio.train.pretrain import load_pretrain_config

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "dist_cardio" / "sample" / "ptbxl"
FLOOR = 1.7
"""px per mm below which QRS complexes (2-3 mm) and ST shifts (1 mm) are lost (README, geometry)."""
INPUT = (352, 512)


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> Path:
    """24 sample records rendered at 100 dpi, sorted into NORM / other class folders."""
    rendered = tmp_path_factory.mktemp("rendered")
    render_dataset(SAMPLE, rendered, RenderConfig(dpi=100), workers=1, limit=24)
    hospital = tmp_path_factory.mktemp("hospital")
    with open(rendered / "labels.csv") as f:
        for row in csv.DictReader(f):
            label = "NORM" if row["label"] == "NORM" else "OTHER"
            (hospital / label).mkdir(exist_ok=True)
            shutil.copy(rendered / row["path"], hospital / label)
    return hospital


@pytest.fixture(scope="module")
def finetuned(pages, tmp_path_factory) -> Path:
    """One short from-scratch cpu-small fine-tune on those pages (the real command's code path)."""
    cfg = load_finetune_config(REPO / "configs" / "finetune" / "cpu-small.yaml",
                               ["stages=[{epochs: 1, lr: 0.003, groups: all}]", "n_bootstrap=0", "batch_size=4",
                                "split.val_fraction=0.25", "split.test_fraction=0.25"])
    run = tmp_path_factory.mktemp("run")
    run_finetune(cfg, None, pages, run, progress=False)
    return run


def _record_inputs(model: torch.nn.Module) -> tuple[list[tuple[int, int]], object]:
    seen: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    return seen, handle


def test_cpu_small_geometry_keeps_the_page_aspect_and_the_trace(pages):
    """On every rendered page, the model input holds ≥ 1.7 px per mm of the grid, at the grid's aspect (±3 %)."""
    assert preset("cpu-small").input_shape == INPUT
    page_cfg = load_finetune_config(REPO / "configs" / "finetune" / "cpu-small.yaml").page
    for path in sorted(pages.rglob("*.png"))[:6]:
        with Image.open(path) as img:
            box = find_grid(img.convert("RGB"), page_cfg)
        assert box.detected, path
        left, top, right, bottom = box.box
        grid_mm = ((right - left) * PAGE_MM[0], (bottom - top) * PAGE_MM[1])
        assert INPUT[1] / grid_mm[0] >= FLOOR and INPUT[0] / grid_mm[1] >= FLOOR, grid_mm
        aspect_in, aspect_grid = INPUT[1] / INPUT[0], grid_mm[0] / grid_mm[1]
        assert abs(aspect_in / aspect_grid - 1) < 0.03, (aspect_in, aspect_grid)
    # Pretraining sees whole pages (header included): the full 297 mm width at 512 px.
    assert INPUT[1] / PAGE_MM[0] >= FLOOR


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_pretraining_views_have_the_model_input_shape(pages, tmp_path, backend):
    shards = tmp_path / "shards"
    shard_inputs([pages], shards, ShardConfig(max_side=640, workers=1, progress=False))
    cfg = load_pretrain_config(REPO / "configs" / "pretrain" / "cpu-small.yaml",
                               [f"data.shards={shards}", "data.batch_size=4", f"data.backend={backend}", "data.num_threads=1"])
    assert cfg.model.input_shape == cfg.augment.shape == INPUT
    view1, view2 = next(iter(contrastive_loader(cfg.data, cfg.augment, 0, 1)))
    assert view1.shape == view2.shape == (4, 3, *INPUT)


def test_finetune_evaluate_predict_explain_feed_the_same_geometry(finetuned, pages, tmp_path):
    model = load_finetuned(finetuned / "best.pt")
    assert model.input_shape == INPUT
    seen, handle = _record_inputs(model.classifier)
    try:
        files = sorted(pages.rglob("*.png"))[:3]
        results, errors = predict_files(model, files, batch_size=2, progress=False)
        assert len(results) == 3 and not errors
        evaluate_data(model, pages, "auto", n_bootstrap=0, progress=False)
        explain_files(model, files[:1], tmp_path / "cam", progress=False)
    finally:
        handle.remove()
    assert seen and set(seen) == {INPUT}, set(seen)
    # fine-tuning itself: the run's augment (training and validation transforms) has the same shape
    state = torch.load(finetuned / "best.pt", map_location="cpu", weights_only=True)
    assert (state["augment"]["height"], state["augment"]["size"]) == INPUT
