"""`dist-cardio pretrain --config configs/pretrain/NAME.yaml [--set key=value ...] [--out DIR]`.

One process, or one per device under torchrun / SLURM (``torchrun --nproc_per_node N -m dist_cardio.cli
pretrain ...``). Running the same command again resumes from ``<out>/checkpoints/latest``. Exit status
143 (128 + SIGTERM) when stopped by SIGTERM after saving.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="YAML config, e.g. configs/pretrain/cpu-small.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set steps=200 --set engine.backend=accelerate")
    parser.add_argument("--out", type=Path, help="output folder (overrides the config's 'out')")


def run(args: argparse.Namespace) -> int:
    from dist_cardio.train.checkpoint import CheckpointError
    from dist_cardio.distributed import STOPPED_EXIT
    from dist_cardio.train.pretrain import load_pretrain_config, run as run_pretrain

    cfg = load_pretrain_config(args.config, args.set)
    if args.out is not None:
        cfg = dataclasses.replace(cfg, out=str(args.out))
    try:
        summary = run_pretrain(cfg)
    except CheckpointError as e:  # damaged or incompatible checkpoint: the message names file and fix
        print(f"dist-cardio pretrain: error: {e}", file=sys.stderr)
        return 2
    if summary["rank"] == 0:
        print(json.dumps(summary, indent=2))
    return STOPPED_EXIT if summary["interrupted"] else 0
