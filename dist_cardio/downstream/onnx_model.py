"""An exported classifier (`dist-cardio export`) run by ONNX Runtime: what a hospital deploys without PyTorch.

The `.onnx` file is self-describing: its metadata holds the class names, the task, the threshold and
how a page becomes the input (`page_input.InputSpec`: grid crop/mask, working copy, input geometry,
normalisation), so `predict --model` needs nothing else and prepares pages with the same code as
`predict --checkpoint`. This module imports onnxruntime, numpy and Pillow, never torch.

Metadata (`metadata_props`, every value a JSON text): `dist_cardio_format`, `classes` (list, the order of
the output's columns), `task` (`single-label`: softmax, the prediction is the most probable class;
`multi-label`: sigmoid, every class at or above `threshold`), `threshold`, `input_shape` ([height,
width]), `mean`, `std` (RGB scaled to [0, 1], minus mean, over std), `image_cache`, `page`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dist_cardio.downstream.page_input import InputSpec

FORMAT = "dist_cardio.onnx/1"
INPUT = "image"
"""float32 ``[batch, 3, height, width]``, normalised (see `InputSpec.array`)."""
OUTPUT = "probabilities"
"""float32 ``[batch, classes]``."""
TASKS = {False: "single-label", True: "multi-label"}


def model_metadata(classes: list[str], multilabel: bool, threshold: float, spec: InputSpec) -> dict[str, str]:
    """The metadata an exported model carries (see the module docstring)."""
    fields = {"dist_cardio_format": FORMAT, "classes": list(classes), "task": TASKS[multilabel],
              "threshold": float(threshold), **spec.to_dict()}
    return {key: json.dumps(value) for key, value in fields.items()}


@dataclass
class OnnxModel:
    """Satisfies `predictions.Predictor`, like the PyTorch `FinetunedModel`."""

    session: ort.InferenceSession
    classes: list[str]
    multilabel: bool
    threshold: float
    spec: InputSpec

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def session_options() -> ort.SessionOptions:
    """One thread per op when OMP_NUM_THREADS says so, as torch honours it; else onnxruntime's default."""
    options = ort.SessionOptions()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        options.intra_op_num_threads = int(threads)
    return options


def _load_failure(e: Exception) -> str:
    """The reason in onnxruntime's message, without the path and the C++ source location before it."""
    reason = " ".join(str(e).split()).split("failed:", 1)[-1]
    if "onnxruntime::" in reason:
        reason = reason.rsplit(") ", 1)[-1]
    return f"{type(e).__name__}: {reason[-200:]}"


def load_onnx(path: str | Path, device: str = "cpu") -> OnnxModel:
    """A `.onnx` written by `dist-cardio export`; errors name the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX model (write one with `dist-cardio export --checkpoint best.pt --out {path.name}`)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: use cpu or cuda")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    if providers[0] not in ort.get_available_providers():
        raise ValueError(f"{path}: this onnxruntime has no {providers[0]} (install onnxruntime-gpu, or use --device cpu)")
    try:
        session = ort.InferenceSession(str(path), session_options(), providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for damaged or foreign files
        raise ValueError(f"{path}: not a loadable ONNX model ({_load_failure(e)})") from None
    meta = session.get_modelmeta().custom_metadata_map
    try:
        if json.loads(meta["dist_cardio_format"]) != FORMAT:
            raise ValueError(f"format {meta['dist_cardio_format']}, expected {FORMAT}")
        if [i.name for i in session.get_inputs()] != [INPUT] or OUTPUT not in [o.name for o in session.get_outputs()]:
            raise ValueError(f"inputs/outputs are not {INPUT!r} → {OUTPUT!r}")
        fields = {key: json.loads(meta[key]) for key in ("classes", "task", "threshold", "page", "image_cache",
                                                          "input_shape", "mean", "std")}
        spec = InputSpec.from_dict(fields)
        multilabel = {task: ml for ml, task in TASKS.items()}[fields["task"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: no dist_cardio metadata ({type(e).__name__}: {e}); export the model with "
                         "`dist-cardio export --checkpoint best.pt`") from None
    return OnnxModel(session, [str(c) for c in fields["classes"]], multilabel, float(fields["threshold"]), spec)


__all__ = ["FORMAT", "INPUT", "OUTPUT", "model_metadata", "OnnxModel", "session_options", "load_onnx"]
