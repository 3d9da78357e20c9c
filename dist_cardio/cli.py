"""`dist-cardio` entry point: a table of subcommands, each a module in `dist_cardio.commands`.

Command modules are imported only when their command runs, so `dist-cardio --help` does not pay for
importing torch, DALI or DeepSpeed. Each module defines `configure(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys


COMMANDS: dict[str, str] = {
    "render": "render 12-lead ECG signals (WFDB, .mat, .npz) into paper-like printout images",
    "shard": "pack image folders/archives into deduplicated, incremental WebDataset shards",
    "verify": "re-read a shard set: checksums, DALI index files, every image decodes",
    "pretrain": "contrastive (SimCLR) pretraining of SimCardioNet with DeepSpeed or Accelerate",
    "finetune": "fine-tune a pretrained checkpoint on one hospital's labelled images",
    "evaluate": "metrics with confidence intervals and a confusion matrix for a fine-tuned model",
    "predict": "class probabilities (CSV) for new images",
    "export": "a fine-tuned model as one ONNX file that predicts without PyTorch (ONNX Runtime)",
    "explain": "Grad-CAM overlays and a shortcut audit (attention outside the ECG grid)",
    "submit": "submit pretraining or per-hospital fine-tuning jobs to SLURM through submitit",
    "jobs": "list the jobs submitted from a job folder: state, requeues, last step, logs",
    "demo": "run the whole pipeline on the built-in PTB-XL sample",
}


def _load(name: str):
    return importlib.import_module(f"dist_cardio.commands.{name.replace('-', '_')}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="dist-cardio",
        description="Pretrain SimCardioNet on unlabeled ECG images across GPU nodes, then fine-tune per hospital.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen command's module is imported (and configures its parser).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            try:
                _load(name).configure(p)
            except ModuleNotFoundError as e:  # e.g. a deployment install (no torch) asked to train or export
                print(f"dist-cardio {name}: error: needs {e.name}, which is not installed here (an install with only the "
                      "`deploy` extra runs `predict --model`; README, 'Deploy at a hospital')", file=sys.stderr)
                return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(_load(args.command).run(args) or 0)
    # Bad input (ConfigError is a ValueError, bad data, paths) is one line naming the file, never a traceback.
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as e:
        print(f"dist-cardio {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"dist-cardio {args.command}: error: {e.filename or 'an output file'}: {e.strerror}; free space and re-run "
              "(completed outputs are kept)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dist-cardio {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
