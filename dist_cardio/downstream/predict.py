"""A fine-tuned model and the images it is asked about: loading, preprocessing, class probabilities.

`evaluate`, `predict` and `explain` all go through `load_finetuned` and `FinetunedModel.inputs`, so an
image is prepared exactly as in fine-tuning (page crop/mask, working size, evaluation transform).
Unreadable files do not stop a batch: each is reported with its reason and the others are predicted.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dist_cardio.config import from_dict
from dist_cardio.data import AugmentConfig, build_torchvision_transform
from dist_cardio.downstream.finetune import FORMAT
from dist_cardio.downstream.finetune_model import targets_for
from dist_cardio.downstream.hospital_data import decode_image, decode_side, load_images, model_image, read_hospital
from dist_cardio.downstream.metrics import evaluate_predictions
from dist_cardio.model import Classifier, ModelConfig, SimCardioNet
from dist_cardio.downstream.page import GridBox, PageConfig
from dist_cardio.shard.imagecheck import BadImage
from dist_cardio.shard.sources import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


@dataclass
class FinetunedModel:
    classifier: Classifier
    classes: list[str]
    multilabel: bool
    threshold: float
    page: PageConfig
    image_cache: int
    """Width of the page copy the transform reads (at the input's aspect), as in fine-tuning."""
    split: dict[str, str]
    """Content hash → split of the images it was fine-tuned on (to evaluate on its test images only)."""
    transform: Any
    device: torch.device

    @property
    def input_shape(self) -> tuple[int, int]:
        """``(height, width)`` of the classifier's input (from its own config)."""
        return self.classifier.cfg.input_shape

    @property
    def decode_side(self) -> int:
        return decode_side(self.page, self.image_cache)

    def inputs(self, pages: list[Image.Image]) -> torch.Tensor:
        """Decoded pages → the normalised batch the classifier takes."""
        return torch.stack([self.transform(self.page_copy(p)) for p in pages]).to(self.device)

    def page_copy(self, page: Image.Image, grid: GridBox | None = None) -> Image.Image:
        """The page cropped/masked and resized exactly as in fine-tuning (what the transform reads)."""
        return model_image(page, self.page, self.image_cache, grid, self.input_shape)

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        self.classifier.eval()
        with torch.no_grad():
            logits = self.classifier(batch).float()
        return (torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)).cpu().numpy()


def load_finetuned(path: str | Path, device: str | torch.device = "cpu") -> FinetunedModel:
    """A `best.pt` written by `dist-cardio finetune` (a run folder holding one works too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fine-tuned checkpoint (pass the best.pt of a `dist-cardio finetune` run)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged or foreign files raise many types
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fine-tuned dist_cardio model (a pretraining checkpoint? fine-tune it first)")
    source = str(path)
    model_cfg = from_dict(ModelConfig, state["model_config"], source)
    classifier = Classifier(SimCardioNet(model_cfg), len(state["classes"]))
    classifier.load_state_dict(state["model"])
    device = torch.device(device)
    classifier.to(device).eval()
    augment = from_dict(AugmentConfig, state["augment"], source)
    return FinetunedModel(
        classifier=classifier,
        classes=list(state["classes"]),
        multilabel=bool(state["multilabel"]),
        threshold=float(state["threshold"]),
        page=from_dict(PageConfig, state["page"], source),
        image_cache=int(state["image_cache"]),
        split=dict(state["split"]),
        transform=build_torchvision_transform(augment, train=False),
        device=device,
    )


def image_files(inputs: list[str | Path]) -> list[Path]:
    """Files named directly, plus the images inside named folders (recursively, sorted)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.exists():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image or folder")
    return files


def read_pages(files: list[Path], *sides: int) -> tuple[list[tuple[Path, tuple[Image.Image, ...]]], list[tuple[Path, str]]]:
    """Each readable file decoded once per size in `sides` (long side at most that), and (file, reason) for the rest."""
    pages, errors = [], []
    for f in files:
        try:
            data = f.read_bytes()
            decoded = {side: decode_image(data, side) for side in dict.fromkeys(sides)}
            pages.append((f, tuple(decoded[side] for side in sides)))
        except (OSError, BadImage) as e:
            errors.append((f, getattr(e, "strerror", None) or str(e)))
    return pages, errors


def predict_files(model: FinetunedModel, files: list[Path], batch_size: int = 32,
                  progress: bool = True) -> tuple[list[tuple[Path, np.ndarray]], list[tuple[Path, str]]]:
    """Probabilities per readable file, and (file, reason) per unreadable one."""
    results, errors = [], []
    for start in tqdm(range(0, len(files), batch_size), desc="predict", unit="batch", disable=not progress):
        pages, bad = read_pages(files[start : start + batch_size], model.decode_side)
        errors += bad
        if pages:
            probs = model.probabilities(model.inputs([p for _, (p,) in pages]))
            results += [(f, row) for (f, _), row in zip(pages, probs)]
    return results, errors


def write_predictions(path: str | Path, model: FinetunedModel, results: list[tuple[Path, np.ndarray]],
                      errors: list[tuple[Path, str]]) -> None:
    """CSV: `path`, `prediction` (`;`-joined for multi-label), `error`, one probability column per class.

    Unreadable files get a row too, with the reason in `error` and empty probabilities.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "prediction", "error", *(f"p_{c}" for c in model.classes)])
        for file, probs in results:
            if model.multilabel:
                predicted = ";".join(c for c, p in zip(model.classes, probs) if p >= model.threshold)
            else:
                predicted = model.classes[int(np.argmax(probs))]
            writer.writerow([str(file), predicted, "", *(f"{p:.6f}" for p in probs)])
        for file, reason in errors:
            writer.writerow([str(file), "", reason, *([""] * len(model.classes))])
    os.replace(tmp, path)


def evaluate_data(model: FinetunedModel, data: str | Path, subset: str = "auto", n_bootstrap: int = 1000,
                  batch_size: int = 32, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Metrics (with bootstrap CIs) of `model` on a hospital data set, or on one split of it.

    `subset`: `all`; `train`/`val`/`test` (images of the model's own split, matched by content hash);
    `auto`: the model's test images when the data is the set it was fine-tuned on (its validation
    images when it had no test split), else all images (an external hospital).
    """
    hospital = read_hospital(data)
    known = set(model.classes)
    items = [it for it in hospital.items if set(it.labels) <= known]
    unknown = len(hospital.items) - len(items)
    if not items:
        raise ValueError(f"{data}: no image has labels this model knows ({', '.join(model.classes)})")
    if unknown:
        log.warning("%d images have labels the model does not know (it knows %s): left out", unknown, ", ".join(model.classes))
    loaded = load_images(items, model.page, model.image_cache, progress, model.input_shape).unique()
    for item_id, reason in loaded.errors:
        log.warning("left out unreadable image %s: %s", item_id, reason)
    splits = [model.split.get(h) for h in loaded.hashes]
    if subset == "auto":
        held_out = "test" if "test" in model.split.values() else "val"
        subset = held_out if any(s is not None for s in splits) else "all"
    chosen = [i for i, s in enumerate(splits) if subset == "all" or s == subset]
    if not chosen:
        raise ValueError(f"{data}: no image of the model's {subset!r} split is in this data set (use --subset all)")
    targets = targets_for([loaded.items[i].labels for i in chosen], model.classes, model.multilabel)
    probs = []
    for start in tqdm(range(0, len(chosen), batch_size), desc=f"evaluate ({subset})", unit="batch", disable=not progress):
        batch = torch.stack([model.transform(loaded.images[i]) for i in chosen[start : start + batch_size]])
        probs.append(model.probabilities(batch.to(model.device)))
    metrics = evaluate_predictions(targets.numpy().astype(np.int64), np.concatenate(probs), model.classes, model.multilabel,
                                   model.threshold, n_bootstrap, seed, progress)
    metrics["subset"] = subset
    metrics["left_out"] = {"unknown_labels": unknown, "unreadable": len(loaded.errors), "copies": loaded.copies,
                           "without_label": hospital.unlabeled}
    return metrics


__all__ = ["FinetunedModel", "load_finetuned", "image_files", "read_pages", "predict_files", "write_predictions", "evaluate_data"]
