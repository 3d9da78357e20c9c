"""`dist-cardio finetune --checkpoint PRETRAINED --data HOSPITAL --out DIR`: gradual-unfreezing fine-tuning."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dist_cardio.downstream.finetune import load_finetune_config, run_finetune


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="pretraining checkpoint (file, its checkpoints/ folder or the run folder); 'none' = from scratch")
    parser.add_argument("--from-scratch", action="store_true", help="random initialisation (the baseline for pretraining)")
    parser.add_argument("--data", required=True, type=Path,
                        help="the hospital's images: a folder of class sub-folders, a CSV path,label[,strat_fold,patient], "
                             "a folder with labels.csv (dist-cardio render output), or a labelled shard set")
    parser.add_argument("--out", required=True, type=Path, help="output folder (best.pt, metrics.json, plots, split.json)")
    parser.add_argument("--config", type=Path, help="YAML with FinetuneConfig fields (e.g. configs/finetune/cpu-small.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set page.mode=crop --set patience=2")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    named_none = args.checkpoint is not None and args.checkpoint.lower() == "none"
    if args.from_scratch and args.checkpoint is not None and not named_none:
        raise SystemExit("dist-cardio finetune: error: --from-scratch and --checkpoint PATH exclude each other")
    if args.checkpoint is None and not args.from_scratch:
        raise SystemExit("dist-cardio finetune: error: give --checkpoint PATH, or --from-scratch (or --checkpoint none)")
    checkpoint = None if args.from_scratch or named_none else args.checkpoint
    cfg = load_finetune_config(args.config, args.set)
    summary = run_finetune(cfg, checkpoint, args.data, args.out, progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    return 0
