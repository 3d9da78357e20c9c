"""Predicting image files in batches with any runtime, and the predictions CSV.

`dist-cardio predict --checkpoint` (PyTorch) and `--model` (ONNX Runtime) differ only in the object that
turns a batch into probabilities; reading, preprocessing (`page_input.py`), batching and the CSV are
this one code, so the two write the same file. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from dist_cardio.downstream.page_input import InputSpec, read_pages


class Predictor(Protocol):
    """A fine-tuned classifier as prediction needs it (`predict.FinetunedModel`, `onnx_model.OnnxModel`)."""

    classes: list[str]
    multilabel: bool
    threshold: float

    @property
    def spec(self) -> InputSpec: ...

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """``[B, 3, H, W]`` normalised float32 → ``[B, classes]`` (softmax, or sigmoid when multi-label)."""
        ...


def predict_files(model: Predictor, files: list[Path], batch_size: int = 32,
                  progress: bool = True) -> tuple[list[tuple[Path, np.ndarray]], list[tuple[Path, str]]]:
    """Probabilities per readable file, and (file, reason) per unreadable one."""
    spec = model.spec
    results, errors = [], []
    for start in tqdm(range(0, len(files), batch_size), desc="predict", unit="batch", disable=not progress):
        pages, bad = read_pages(files[start : start + batch_size], spec.decode_side)
        errors += bad
        if pages:
            probs = model.probabilities(spec.batch([p for _, (p,) in pages]))
            results += [(f, row) for (f, _), row in zip(pages, probs)]
    return results, errors


def write_predictions(path: str | Path, model: Predictor, results: list[tuple[Path, np.ndarray]],
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


__all__ = ["Predictor", "predict_files", "write_predictions"]
