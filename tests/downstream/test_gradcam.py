"""Grad-CAM maps and the shortcut audit: grid detection on real pages, attention mass, a planted patch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dist_cardio.downstream.finetune import load_finetune_config, run_finetune
from dist_cardio.downstream.gradcam import explain_files, gradcam_maps, outside_share, overlay, resize_map
from dist_cardio.model import Classifier, SimCardioNet, preset
from dist_cardio.downstream.page import GridBox, PageConfig, apply_page, find_grid
from dist_cardio.downstream.predict import load_finetuned
from dist_cardio.signals.records import SAMPLE_PTBXL, list_records, load_record
from dist_cardio.signals.render import GRID_BOX_MM, PAGE_MM, RenderConfig, header_text, render_dataset, render_printout

REPO = Path(__file__).resolve().parents[2]


def _page(grid: str = "red", dpi: int = 100, rotation: float = 0.0, noise: float = 0.0, header: bool = True) -> Image.Image:
    record = load_record(list_records(SAMPLE_PTBXL)[0])
    cfg = RenderConfig(dpi=dpi, grid=grid, rotation=rotation, noise=noise, header=header)
    return render_printout(record.signal_mv, record.fs, cfg, header_text(record.name, record.fs), np.random.default_rng(0))


RENDERED_BOX = tuple(GRID_BOX_MM[i] / PAGE_MM[i % 2] for i in range(4))


def test_fallback_box_default_is_the_rendered_grid():
    assert PageConfig().fallback_box == pytest.approx(RENDERED_BOX, abs=1e-3)


@pytest.mark.parametrize("grid,rotation,noise", [("red", 0.0, 0.0), ("pink", 2.0, 8.0), ("grey", -2.5, 4.0)])
def test_grid_found_on_rendered_pages(grid, rotation, noise):
    found = find_grid(_page(grid, rotation=rotation, noise=noise), PageConfig())
    assert found.detected
    # within ~2% of the page of where render.py drew it (rotation moves the corners a little)
    assert found.box == pytest.approx(RENDERED_BOX, abs=0.025)


def test_blank_page_without_grid_uses_the_fallback_box():
    cfg = PageConfig(fallback_box=(0.1, 0.2, 0.9, 0.8))
    found = find_grid(_page("none"), cfg)
    assert not found.detected and found.box == cfg.fallback_box


@pytest.mark.parametrize("name,header_bottom", [("ecg00025.jpg", 0.13), ("ecg00053.png", 0.24)])
def test_real_printout_headers_are_left_out(shared_data, name, header_bottom):
    """Two real printouts whose top part is a text header (measurements, interpretation, redactions)."""
    img = Image.open(shared_data / "ecg-printouts" / name)
    found = find_grid(img, PageConfig())
    assert found.detected
    assert found.box[1] > header_bottom  # the grid starts below the header text
    assert found.box[3] - found.box[1] > 0.6 and found.box[2] - found.box[0] > 0.9


def test_crop_and_mask_remove_the_header():
    page = _page()
    cfg_crop, cfg_mask = PageConfig(mode="crop"), PageConfig(mode="mask")
    grid = find_grid(page, cfg_crop)
    x0, y0, x1, y1 = grid.pixels(page.width, page.height)
    cropped = apply_page(page, cfg_crop, grid)
    assert cropped.size == (x1 - x0, y1 - y0)
    masked = np.asarray(apply_page(page, cfg_mask, grid))
    assert masked.shape[:2] == (page.height, page.width)
    header = np.asarray(page)[: y0 - 2]
    assert header.min() < 50  # the header text is there on the page...
    assert masked[: y0 - 2].min() == 255  # ...and painted out


def test_outside_share_counts_mass_outside_the_box():
    grid = GridBox((0.25, 0.25, 0.75, 0.75), True)
    uniform = np.ones((100, 200), np.float32)
    assert outside_share(uniform, grid) == pytest.approx(0.75)
    inside_only = np.zeros((100, 200), np.float32)
    inside_only[40:60, 80:120] = 1.0
    assert outside_share(inside_only, grid) == pytest.approx(0.0)
    header_only = np.zeros((100, 200), np.float32)
    header_only[:10] = 1.0
    assert outside_share(header_only, grid) == pytest.approx(1.0)
    assert outside_share(np.zeros((10, 10), np.float32), grid) is None


def test_maps_and_overlays_take_the_page_shape():
    page = _page()
    cam = np.zeros((8, 8), np.float32)
    cam[0, 0] = 1.0
    big = resize_map(cam, page.width, page.height)
    assert big.shape == (page.height, page.width)
    assert big[: page.height // 8, : page.width // 8].sum() > 0.5 * big.sum()
    out = overlay(page, big)
    assert out.size == page.size and out.mode == "RGB"


def _patch_batch(rng: np.random.Generator, backgrounds: list[np.ndarray], n: int, side: int = 64, patch: int = 16):
    """Real printout crops; label 1 = a blue square planted in one cell of the model's 4×4 feature grid."""
    xs, ys, cells = [], [], []
    for _ in range(n):
        bg = backgrounds[rng.integers(len(backgrounds))]
        y0, x0 = rng.integers(0, bg.shape[0] - side), rng.integers(0, bg.shape[1] - side)
        img = bg[y0 : y0 + side, x0 : x0 + side].astype(np.float32) / 255
        label, cell = int(rng.random() < 0.5), None
        if label:
            cell = tuple(int(v) for v in rng.integers(0, side // patch, 2))
            img[cell[0] * patch : (cell[0] + 1) * patch, cell[1] * patch : (cell[1] + 1) * patch] = (0.1, 0.2, 0.9)
        xs.append(torch.from_numpy((img - 0.5) / 0.25).permute(2, 0, 1))
        ys.append(label)
        cells.append(cell)
    return torch.stack(xs), torch.tensor(ys), cells


@pytest.mark.slow
def test_gradcam_highlights_a_planted_patch(shared_data):
    """A tiny model must find a planted square to classify; Grad-CAM must point at that square."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    files = sorted((shared_data / "ecg-printouts").glob("ecg0000*.*"))[:6]
    backgrounds = [np.asarray(Image.open(f).convert("RGB").resize((256, 128))) for f in files]
    model = Classifier(SimCardioNet(preset("tiny", dropout=0.0)), 2)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        x, y, _ = _patch_batch(rng, backgrounds, 32)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y, cells = _patch_batch(rng, backgrounds, 64)
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.95
    positives = [i for i in range(len(y)) if y[i] == 1]
    maps = gradcam_maps(model, x[positives], [1] * len(positives))
    assert maps.shape == (len(positives), 64, 64)
    in_cell, best = [], 0
    for cam, i in zip(maps, positives):
        per_cell = cam.reshape(4, 16, 4, 16).sum(axis=(1, 3))
        in_cell.append(per_cell[cells[i]] / cam.sum())
        best += np.unravel_index(per_cell.argmax(), per_cell.shape) == cells[i]
    assert np.mean(in_cell) > 0.3  # the cell is 1/16 of the image
    assert best / len(positives) > 0.8


@pytest.mark.slow
def test_audit_catches_a_header_shortcut_and_masking_removes_it(shared_data, tmp_path):
    """Half the pages carry a black banner in the header (the class is printed on the page, as real
    headers print a rate or an interpretation). A model fed whole pages learns the banner and the
    audit flags it; with the page masked to the grid the banner is gone and so is the shortcut."""
    rendered = tmp_path / "rendered"
    render_dataset(shared_data / "ptbxl-500", rendered, RenderConfig(dpi=60), workers=1, limit=120)
    hospital = tmp_path / "hospital"
    for i, page in enumerate(sorted((rendered / "images").glob("*.png"))):
        cls = "banner" if i % 2 else "plain"
        (hospital / cls).mkdir(parents=True, exist_ok=True)
        img = Image.open(page).convert("RGB")
        if cls == "banner":
            w, h = img.size
            ImageDraw.Draw(img).rectangle([int(0.35 * w), int(0.005 * h), int(0.75 * w), int(0.06 * h)], fill=(0, 0, 0))
        img.save(hospital / cls / page.name)
    results = {}
    for mode in ("none", "mask"):
        cfg = load_finetune_config(REPO / "configs" / "finetune" / "tiny.yaml", [f"page.mode={mode}", "n_bootstrap=0"])
        summary = run_finetune(cfg, None, hospital, tmp_path / mode, progress=False)
        split = json.loads((tmp_path / mode / "split.json").read_text())
        banner_test = [hospital / it["id"] for it in split["items"] if it["split"] == "test" and it["id"].startswith("banner/")]
        audit = explain_files(load_finetuned(tmp_path / mode), banner_test, tmp_path / mode / "explain", progress=False)
        shares = [r["outside_grid_share"] for r in audit["per_image"]]
        results[mode] = (summary["macro_f1"], float(np.mean(shares)), len(audit["flagged"]) / len(shares))
    (f1_whole, share_whole, flagged_whole), (f1_masked, share_masked, flagged_masked) = results["none"], results["mask"]
    assert f1_whole > 0.9 and f1_masked < 0.8  # the banner is learnable only when the header is visible
    assert flagged_whole >= 0.6 and flagged_masked <= 0.25
    assert share_whole > 1.5 * share_masked
