"""`dist-cardio predict IMAGES... --checkpoint best.pt | --model model.onnx --out preds.csv`: class probabilities per image.

`--checkpoint` runs the fine-tuned PyTorch model, `--model` its ONNX export (`dist-cardio export`)
through ONNX Runtime; both prepare pages and write the CSV with the same code. The `--model` path never
imports torch, so a deployment installs only onnxruntime, numpy, Pillow and tqdm.
Unreadable files are listed (each with its reason) and get a row with an `error`; the rest are still
predicted. Exit status 1 when any file was unreadable, so scripts notice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_cardio.commands.arguments import DEVICES, at_least
from dist_cardio.downstream.page_input import image_files, reason_counts
from dist_cardio.downstream.predictions import Predictor, predict_files, write_predictions


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files and/or folders of images")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="best.pt of a fine-tuning run (or the run folder): PyTorch")
    source.add_argument("--model", type=Path, help="model.onnx written by `dist-cardio export`: ONNX Runtime, no PyTorch")
    parser.add_argument("--out", required=True, type=Path, help="CSV to write: path, prediction, error, p_<class>...")
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_model(args: argparse.Namespace) -> Predictor:
    """The ONNX or the PyTorch model; each runtime is imported only when chosen (a deployment has no torch)."""
    if args.model is not None:
        try:
            from dist_cardio.downstream.onnx_model import load_onnx
        except ModuleNotFoundError as e:
            raise ValueError(f"--model needs {e.name}, which is not installed: pip install onnxruntime==1.30.0 numpy pillow simplejpeg "
                             "tqdm (the `deploy` extra; README, 'Deploy at a hospital')") from None
        return load_onnx(args.model, args.device)
    from dist_cardio.downstream.predict import load_finetuned

    return load_finetuned(args.checkpoint, args.device)


def run(args: argparse.Namespace) -> int:
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder: give the CSV file to write, e.g. --out {args.out / 'predictions.csv'}")
    model = load_model(args)
    files = image_files(args.images)
    results, errors = predict_files(model, files, args.batch_size, progress=not args.no_progress)
    write_predictions(args.out, model, results, errors)
    if errors:  # counts only: file names may name patients; the CSV (the user's own file) has each one's reason
        print(f"dist-cardio predict: {len(errors)} unreadable images ({reason_counts([r for _, r in errors])}); "
              f"their rows in {args.out} say why", file=sys.stderr)
    print(f"predicted {len(results)} of {len(files)} images → {args.out}" + (f" ({len(errors)} unreadable)" if errors else ""))
    return 1 if errors else 0
