"""A fine-tuned classifier → one self-describing ONNX file, checked against PyTorch before it is put in place.

The classifier is exported with its softmax (or sigmoid) at its own input geometry, the batch size
left dynamic, by torch's `torch.export`-based ONNX exporter (it needs onnxscript; the TorchScript one is
deprecated). The metadata (`onnx_model.model_metadata`) carries everything `predict --model` needs.
Before the file replaces `out`, ONNX Runtime runs it on sample inputs (the pages given, prepared as
`predict` prepares them, and noise at another batch size): its probabilities must equal PyTorch's
within `tolerance`, else nothing is written and the error says by how much they differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from torch import nn

from dist_cardio.atomic import atomic_path
from dist_cardio.downstream.onnx_model import INPUT, OUTPUT, model_metadata, session_options
from dist_cardio.downstream.predict import FinetunedModel

TOLERANCE = 1e-4
"""Largest allowed |ONNX Runtime − PyTorch| on any probability of the sample inputs."""
DEFAULT_OPSET = 18
"""The exporter's own opset: lower ones go through ONNX's version converter, which may refuse."""


class Probabilities(nn.Module):
    """The classifier with its output activation, so the exported graph gives what the CSV reports."""

    def __init__(self, model: FinetunedModel) -> None:
        super().__init__()
        self.classifier = model.classifier
        self.multilabel = model.multilabel

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(image).float()
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)


@dataclass(frozen=True)
class ExportReport:
    path: Path
    opset: int
    max_abs_diff: float
    """Over every probability of every sample input."""
    samples: int
    """Sample inputs compared (pages plus noise)."""
    bytes: int


def sample_batches(model: FinetunedModel, pages: list[Image.Image], noise: int = 3, seed: int = 0) -> list[np.ndarray]:
    """The pages as `predict` prepares them, and `noise` inputs of Gaussian noise (another batch size)."""
    h, w = model.input_shape
    batches = [model.spec.batch(pages)] if pages else []
    batches.append(np.random.default_rng(seed).standard_normal((noise, 3, h, w), dtype=np.float32))
    return batches


def max_difference(session: ort.InferenceSession, model: FinetunedModel, batches: list[np.ndarray]) -> float:
    """Largest |ONNX Runtime − PyTorch| over the probabilities of `batches`."""
    return max(float(np.abs(session.run([OUTPUT], {INPUT: b})[0] - model.probabilities(b)).max()) for b in batches)


def export_onnx(model: FinetunedModel, out: str | Path, opset: int = DEFAULT_OPSET, pages: list[Image.Image] = (),
                tolerance: float = TOLERANCE) -> ExportReport:
    """Write `model` (loaded on the CPU) to `out` as ONNX, after the parity check on `pages` and noise."""
    out = Path(out)
    if model.device.type != "cpu":
        raise ValueError("export runs on the CPU: load the model with device='cpu'")
    out.parent.mkdir(parents=True, exist_ok=True)
    net = Probabilities(model).eval()
    example = torch.zeros(2, 3, *model.input_shape)
    try:
        program = torch.onnx.export(net, (example,), input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
                                    opset_version=opset, dynamo=True, verbose=False)
    except ImportError as e:  # the exporter imports onnxscript only when it runs
        raise ValueError(f"ONNX export needs {e.name or e}, which is not installed: pip install 'dist-cardio[export]'") from None
    except Exception as e:  # the exporter raises many types (unsupported op, opset conversion)
        raise ValueError(f"{out}: ONNX export at opset {opset} failed ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); try --opset {DEFAULT_OPSET}") from None
    program.model.metadata_props.update(model_metadata(model.classes, model.multilabel, model.threshold, model.spec))
    h, w = model.input_shape
    program.model.doc_string = (f"dist_cardio classifier: {INPUT} float32 [batch, 3, {h}, {w}] (RGB / 255, minus mean, "
                                f"over std: see metadata) -> {OUTPUT} float32 [batch, {len(model.classes)}]")
    batches = sample_batches(model, list(pages))
    with atomic_path(out) as tmp:
        program.save(tmp, external_data=False)
        session = ort.InferenceSession(str(tmp), session_options(), providers=["CPUExecutionProvider"])
        diff = max_difference(session, model, batches)
        if not diff < tolerance:
            raise ValueError(f"{out}: not written: ONNX Runtime's probabilities differ from PyTorch's by up to "
                             f"{diff:.2e} (allowed {tolerance:g}) on the sample inputs; try another --opset")
        size = tmp.stat().st_size
    return ExportReport(out, opset, diff, sum(len(b) for b in batches), size)


__all__ = ["TOLERANCE", "DEFAULT_OPSET", "Probabilities", "ExportReport", "sample_batches", "max_difference", "export_onnx"]
