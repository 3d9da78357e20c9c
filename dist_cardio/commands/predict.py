"""`dist-cardio predict IMAGES... --checkpoint best.pt --out preds.csv`: class probabilities per image.

Unreadable files are listed (each with its reason) and get a row with an `error`; the rest are still
predicted. Exit status 1 when any file was unreadable, so scripts notice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_cardio.downstream.predict import image_files, load_finetuned, predict_files, write_predictions


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files and/or folders of images")
    parser.add_argument("--checkpoint", required=True, type=Path, help="best.pt of a fine-tuning run (or the run folder)")
    parser.add_argument("--out", required=True, type=Path, help="CSV to write: path, prediction, error, p_<class>...")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    model = load_finetuned(args.checkpoint, args.device)
    files = image_files(args.images)
    results, errors = predict_files(model, files, args.batch_size, progress=not args.no_progress)
    write_predictions(args.out, model, results, errors)
    for file, reason in errors:
        print(f"dist-cardio predict: unreadable {file}: {reason}", file=sys.stderr)
    print(f"predicted {len(results)} of {len(files)} images → {args.out}" + (f" ({len(errors)} unreadable)" if errors else ""))
    return 1 if errors else 0
