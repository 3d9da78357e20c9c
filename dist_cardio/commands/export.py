"""`dist-cardio export --checkpoint best.pt --out model.onnx [--opset N]`: a fine-tuned model for ONNX Runtime.

The parity check runs on pages rendered from the built-in PTB-XL sample (real ECGs, prepared as
`predict` prepares a scan) and on noise; `predict --model model.onnx` then needs no PyTorch.
"""

from __future__ import annotations

import argparse
import io
import itertools
from pathlib import Path

from PIL import Image

from dist_cardio.downstream.page_input import decode_image
from dist_cardio.downstream.predict import load_finetuned
from dist_cardio.signals.records import SAMPLE_PTBXL, iter_records
from dist_cardio.signals.render import RenderConfig, header_text, record_rng, render_printout

SAMPLE_PAGES = 2


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="best.pt of a fine-tuning run (or the run folder)")
    parser.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, help="ONNX opset (default 18, the exporter's own)")


def sample_pages(decode_side: int, n: int = SAMPLE_PAGES) -> list[Image.Image]:
    """`n` printouts of built-in PTB-XL records, encoded as PNG and decoded as `predict` decodes a file."""
    pages = []
    for record in itertools.islice(iter_records(SAMPLE_PTBXL), n):
        page = render_printout(record.signal_mv, record.fs, RenderConfig(), header_text(record.name, record.fs),
                               record_rng(0, record.name))
        png = io.BytesIO()
        page.save(png, format="PNG")
        pages.append(decode_image(png.getvalue(), decode_side))
    return pages


def run(args: argparse.Namespace) -> int:
    if args.out.suffix.lower() != ".onnx":
        raise ValueError(f"{args.out}: the output must be a .onnx file (e.g. --out model.onnx)")
    try:  # export-only dependencies: the `export` extra
        from dist_cardio.downstream.onnx_export import DEFAULT_OPSET, export_onnx
    except ModuleNotFoundError as e:
        raise ValueError(f"export needs {e.name}, which is not installed: pip install 'dist-cardio[export]'") from None
    model = load_finetuned(args.checkpoint, "cpu")
    report = export_onnx(model, args.out, args.opset or DEFAULT_OPSET, sample_pages(model.decode_side))
    h, w = model.input_shape
    task = "multi-label" if model.multilabel else "single-label"
    print(f"exported {args.checkpoint} → {report.path} ({report.bytes / 1e6:.2f} MB, opset {report.opset}): "
          f"input [batch, 3, {h}, {w}], {task}, classes {', '.join(model.classes)}; ONNX Runtime = PyTorch within "
          f"{report.max_abs_diff:.1e} on {report.samples} sample inputs")
    return 0
