"""Grad-CAM maps for the classifier, and the shortcut audit: how much attention lies outside the ECG grid.

Maps come from the `grad-cam` package (`pytorch_grad_cam.GradCAM`) on `Classifier.cam_layer`, the last
convolutional map before the attention blocks; gradients flow back through the attention, so the map
reflects what the pooled features used. The audit compares a map with the grid box found on the page
(`page.find_grid`): attention mass in the header, footer or margins means the model may be reading the
patient id, date or printed heart rate instead of the ECG.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from tqdm import tqdm

from dist_cardio.atomic import atomic_write_json
from dist_cardio.model import Classifier
from dist_cardio.downstream.page import GridBox, draw_box, find_grid
from dist_cardio.downstream.page_input import read_pages
from dist_cardio.downstream.predict import FinetunedModel

log = logging.getLogger(__name__)

WARN_ABOVE = 0.2
"""Default audit threshold: more than this share of Grad-CAM mass outside the grid is flagged. A map
spread evenly over a rendered page leaves ~13% outside its grid (`outside_area`); a cpu-small model that
learned a header banner put ~22% there on the banner's pages (tests/test_gradcam.py)."""


def gradcam_maps(classifier: Classifier, batch: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
    """Grad-CAM for class `targets[i]` of image `batch[i]`: float32 `[B, S, S]` in [0, 1] (input resolution)."""
    if len(targets) != len(batch):
        raise ValueError(f"{len(targets)} targets for {len(batch)} images")
    was_training = classifier.training
    try:
        with GradCAM(model=classifier, target_layers=[classifier.cam_layer]) as cam:
            maps = cam(input_tensor=batch, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        classifier.train(was_training)
        classifier.zero_grad(set_to_none=True)
    return np.asarray(maps, dtype=np.float32)


def resize_map(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """A map `[h, w]` stretched to `height × width` (bilinear), the geometry the model saw the page in."""
    return np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR))


def outside_share(cam: np.ndarray, grid: GridBox) -> float | None:
    """Share of the map's mass outside the grid box (0 = all inside); None for an all-zero map."""
    cam = np.clip(cam, 0.0, None)
    total = float(cam.sum())
    if total <= 0.0:
        return None
    return float(cam[~grid.mask(*cam.shape)].sum()) / total


def overlay(page: Image.Image, cam: np.ndarray, image_weight: float = 0.55) -> Image.Image:
    """The page with the map (same size as the page) blended on top as a heat map."""
    rgb = np.asarray(page.convert("RGB"), dtype=np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(rgb, np.clip(cam, 0.0, 1.0), use_rgb=True, image_weight=image_weight))


def page_map(model: FinetunedModel, cam: np.ndarray, page: Image.Image, grid: GridBox) -> np.ndarray:
    """A map at model input resolution, placed on the page as the model saw it (zero where cropped away)."""
    if model.page.mode != "crop":
        return resize_map(cam, page.width, page.height)
    x0, y0, x1, y1 = grid.pixels(page.width, page.height)
    full = np.zeros((page.height, page.width), dtype=np.float32)
    full[y0:y1, x0:x1] = resize_map(cam, x1 - x0, y1 - y0)
    return full


def explain_files(model: FinetunedModel, files: list[Path], out: str | Path, target: str | None = None,
                  warn_above: float = WARN_ABOVE, progress: bool = True) -> dict[str, Any]:
    """Grad-CAM overlay per image (`out/<name>.gradcam.png`) and the shortcut audit (`audit.csv`, `audit.json`).

    The map explains `target` (a class name) or, by default, the predicted class (multi-label: the most
    probable one). Returns the audit summary; unreadable files are listed in it and skipped.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if target is not None and target not in model.classes:
        raise ValueError(f"--target {target!r} is not a class of this model ({', '.join(model.classes)})")
    rows, used_names = [], set()
    # The audit needs the page at grid-search size; the model gets exactly what it got in fine-tuning.
    audit_side = max(model.decode_side, model.page.detect_side)
    pages, errors = read_pages(files, audit_side, model.decode_side)
    for file, (page, seen) in tqdm(pages, desc="explain", unit="img", disable=not progress):
        grid = find_grid(page, model.page)  # fractions of the page: valid at both sizes
        batch = model.tensor([model.page_copy(seen, grid)])
        probs = model.probabilities(batch)[0]
        cls = model.classes.index(target) if target is not None else int(np.argmax(probs))
        cam = page_map(model, gradcam_maps(model.classifier, batch, [cls])[0], page, grid)
        share = outside_share(cam, grid)
        name = _unique_name(file, used_names)
        draw_box(overlay(page, cam), grid).save(out / name)
        rows.append({
            "path": str(file), "overlay": name, "class": model.classes[cls], "probability": float(probs[cls]),
            "outside_grid_share": share, "outside_area": float(1.0 - grid.mask(page.height, page.width).mean()),
            "grid_detected": grid.detected,
            "flagged": share is not None and share > warn_above,
        })
    shares = [r["outside_grid_share"] for r in rows if r["outside_grid_share"] is not None]
    summary = {
        "images": len(rows),
        "mean_outside_grid_share": float(np.mean(shares)) if shares else None,
        "mean_outside_area": float(np.mean([r["outside_area"] for r in rows])) if rows else None,
        "warn_above": warn_above,
        "flagged": [r["path"] for r in rows if r["flagged"]],
        "grid_not_detected": [r["path"] for r in rows if not r["grid_detected"]],
        "unreadable": [{"path": str(f), "reason": reason} for f, reason in errors],
        "per_image": rows,
    }
    _write_audit(out, rows, summary)
    mean = summary["mean_outside_grid_share"]
    if mean is not None and mean > warn_above:
        log.warning("on average %.0f%% of Grad-CAM attention lies outside the ECG grid (header, footer, margins): "
                    "the model may use a shortcut; fine-tune with page.mode=crop or mask", 100 * mean)
    if summary["flagged"]:  # a count: names may name patients; audit.csv lists them
        log.warning("%d images have more than %.0f%% of the attention outside the ECG grid (flagged in %s)",
                    len(summary["flagged"]), 100 * warn_above, out / "audit.csv")
    return summary


def _unique_name(file: Path, used: set[str]) -> str:
    name, n = f"{file.stem}.gradcam.png", 2
    while name in used:
        name, n = f"{file.stem}-{n}.gradcam.png", n + 1
    used.add(name)
    return name


def _write_audit(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    tmp = out / f".audit.csv.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "audit.csv")
    atomic_write_json(out / "audit.json", summary, newline=False, indent=1)


__all__ = ["WARN_ABOVE", "gradcam_maps", "resize_map", "outside_share", "overlay", "page_map", "explain_files"]
