"""A fine-tuned model (PyTorch) and the images it is asked about: loading, class probabilities, evaluation.

`evaluate`, `predict` and `explain` all go through `load_finetuned` and `FinetunedModel.spec`, so an
image is prepared exactly as in fine-tuning (page crop/mask, working size, evaluation transform: the
torch-free `page_input.py`, which an exported ONNX model uses too). Prediction itself (batches, files
that cannot be read, the CSV) is `predictions.py`, shared with the ONNX Runtime path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dist_cardio.config import from_dict
from dist_cardio.data import AugmentConfig
from dist_cardio.downstream.finetune import FORMAT
from dist_cardio.downstream.finetune_model import targets_for
from dist_cardio.downstream.hospital_data import load_images, read_hospital, write_unreadable
from dist_cardio.downstream.metrics import evaluate_predictions
from dist_cardio.downstream.page import GridBox, PageConfig
from dist_cardio.downstream.page_input import InputSpec, reason_counts
from dist_cardio.model import Classifier, ModelConfig, SimCardioNet
from dist_cardio.train.checkpoint import FORMAT as CHECKPOINT_FORMAT, CheckpointError, load_weights, read_checkpoint

log = logging.getLogger(__name__)
FINETUNED_KEYS = ("model_config", "classes", "model", "multilabel", "threshold", "augment", "page", "image_cache", "split")
"""What `load_finetuned` reads from a `best.pt`."""


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
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    """The input normalisation it was fine-tuned with (`augment.mean` / `augment.std`)."""
    device: torch.device

    @property
    def input_shape(self) -> tuple[int, int]:
        """``(height, width)`` of the classifier's input (from its own config)."""
        return self.classifier.cfg.input_shape

    @property
    def spec(self) -> InputSpec:
        return InputSpec(self.page, self.image_cache, self.input_shape, self.mean, self.std)

    @property
    def decode_side(self) -> int:
        return self.spec.decode_side

    def page_copy(self, page: Image.Image, grid: GridBox | None = None) -> Image.Image:
        """The page cropped/masked and resized exactly as in fine-tuning."""
        return self.spec.page_copy(page, grid)

    def tensor(self, copies: list[Image.Image]) -> torch.Tensor:
        """Page copies (`page_copy`) → the normalised batch on the model's device."""
        spec = self.spec
        return torch.from_numpy(np.stack([spec.array(c) for c in copies])).to(self.device)

    def probabilities(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch).to(self.device)
        self.classifier.eval()
        with torch.no_grad():
            logits = self.classifier(batch).float()
        return (torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)).cpu().numpy()


def load_finetuned(path: str | Path, device: str | torch.device = "cpu") -> FinetunedModel:
    """A `best.pt` written by `dist-cardio finetune` (a run folder holding one works too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():  # before reading a model it could not run
        raise ValueError(f"--device {device}: no CUDA GPU is visible to PyTorch here; use --device cpu")
    fix = "pass the best.pt of a `dist-cardio finetune` run"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no fine-tuned checkpoint ({fix})")
    state = read_checkpoint(path, fix)
    if state.get("format") != FORMAT:
        kind = "a pretraining checkpoint: fine-tune it first" if state.get("format") == CHECKPOINT_FORMAT else "not a dist_cardio fine-tuned model"
        raise CheckpointError(f"{path}: {kind}; {fix}")
    missing = sorted(set(FINETUNED_KEYS) - set(state))
    if missing:
        raise CheckpointError(f"{path}: a fine-tuned model without {', '.join(missing)} (edited or damaged); {fix}")
    source = str(path)
    model_cfg = from_dict(ModelConfig, state["model_config"], source)
    classifier = Classifier(SimCardioNet(model_cfg), len(state["classes"]))
    load_weights(classifier, state["model"], path, fix)
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
        mean=augment.mean,
        std=augment.std,
        device=device,
    )


def evaluate_data(model: FinetunedModel, data: str | Path, subset: str = "auto", n_bootstrap: int = 1000,
                  batch_size: int = 32, seed: int = 0, progress: bool = True,
                  report: Path | None = None) -> dict[str, Any]:
    """Metrics (with bootstrap CIs) of `model` on a hospital data set, or on one split of it.

    `subset`: `all`; `train`/`val`/`test` (images of the model's own split, matched by content hash);
    `auto`: the model's test images when the data is the set it was fine-tuned on (its validation
    images when it had no test split), else all images (an external hospital). Unreadable images are
    listed in `report` (`unreadable.txt` of the evaluation folder) when given, counted on the console.
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
    if loaded.errors and report is not None:
        write_unreadable(report, loaded.errors)
    elif loaded.errors:
        log.warning("left out %d unreadable images (%s)", len(loaded.errors), reason_counts([r for _, r in loaded.errors]))
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
        probs.append(model.probabilities(model.tensor([loaded.images[i] for i in chosen[start : start + batch_size]])))
    metrics = evaluate_predictions(targets.numpy().astype(np.int64), np.concatenate(probs), model.classes, model.multilabel,
                                   model.threshold, n_bootstrap, seed, progress,
                                   groups=[loaded.items[i].patient for i in chosen])
    metrics["subset"] = subset
    metrics["left_out"] = {"unknown_labels": unknown, "unreadable": len(loaded.errors), "copies": loaded.copies,
                           "without_label": hospital.unlabeled}
    return metrics


__all__ = ["FinetunedModel", "load_finetuned", "evaluate_data"]
