"""`dist-cardio evaluate --checkpoint best.pt --data DATA`: metrics with 95% CIs and a confusion matrix."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dist_cardio.atomic import atomic_write_json
from dist_cardio.commands.arguments import DEVICES, at_least
from dist_cardio.downstream.metrics import metric_text, plot_confusion_matrix
from dist_cardio.downstream.predict import evaluate_data, load_finetuned


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="best.pt of a fine-tuning run (or the run folder)")
    parser.add_argument("--data", required=True, type=Path, help="labelled images, in any form `finetune --data` takes")
    parser.add_argument("--subset", choices=("auto", "all", "train", "val", "test"), default="auto",
                        help="auto: the model's own test images when DATA is its fine-tuning set, else all images")
    parser.add_argument("--out", type=Path, help="folder for metrics.json and confusion_matrix.png (default: beside the checkpoint)")
    parser.add_argument("--n-bootstrap", type=at_least(0), default=1000, help="bootstrap resamples for the 95%% intervals (0: none)")
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    model = load_finetuned(args.checkpoint, args.device)
    ckpt_dir = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    out = args.out or ckpt_dir / f"evaluation-{args.data.stem}-{args.subset}"
    metrics = evaluate_data(model, args.data, args.subset, args.n_bootstrap, args.batch_size, progress=not args.no_progress,
                            report=out / "unreadable.txt")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics, newline=False, indent=1, allow_nan=False)
    plot_confusion_matrix(metrics, str(out / "confusion_matrix.png"))
    print(f"{metrics['n']} images ({metrics['subset']}), {'multi' if metrics['multilabel'] else 'single'}-label:")
    for key in ("accuracy", "macro_f1", "macro_auroc"):
        print(f"  {key:<12} {metric_text(metrics[key])}")
    for name, entry in metrics["per_class"].items():
        print(f"  {name:<12} F1 {metric_text(entry['f1'])}  AUROC {metric_text(entry['auroc'])}  (n={entry['support']})")
    print(f"→ {out / 'metrics.json'}, {out / 'confusion_matrix.png'}")
    return 0
