"""`dist-cardio demo`: the whole pipeline on the built-in 200 PTB-XL records, in a few minutes on a CPU.

render → shard (+ verify) → contrastive pretraining → fine-tuning on the PTB-XL superclasses (official
`strat_fold` split: folds 1-8 train, 9 validation, 10 test) → evaluation → Grad-CAM explanations. It
needs nothing but the package (the sample ships in it). Every stage resumes, so running it again into
the same folder finishes what an interrupted run left and redoes nothing that is complete.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import time
from pathlib import Path

from dist_cardio.train.checkpoint import CheckpointError
from dist_cardio.downstream.finetune import load_finetune_config
from dist_cardio.pipeline import (
    CONFIGS,
    StageError,
    Steps,
    build_shards,
    evaluate,
    explain,
    finetune,
    metrics_table,
    pretrain,
    render_printouts,
    usable_cpus,
    write_json,
)
from dist_cardio.train.pretrain import load_pretrain_config
from dist_cardio.signals.records import SAMPLE_PTBXL
from dist_cardio.signals.render import RenderConfig

RENDER = RenderConfig(dpi=100)
"""100 dpi: 1169×827 pages, ~20 KB PNGs, ~30 pages/s on 2 cores; the 1 mm grid is still 4 px apart."""
STEPS = 100
"""Pretraining steps of the full demo (cpu-small, batch 32: about 2 minutes on 2 cores)."""
QUICK_STEPS = 12
EXPLAINED = 4
"""Test images that get a Grad-CAM overlay."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default ./demo-output); "
                        "running again into it resumes")
    parser.add_argument("--workers", type=int, default=usable_cpus(),
                        help="processes for rendering and sharding (default: the CPUs this process may use)")
    parser.add_argument("--steps", type=int, help=f"pretraining steps (default {STEPS}, {QUICK_STEPS} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: fewer pretraining steps, one epoch per fine-tuning stage, fewer bootstrap resamples")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="   %(message)s")
    if args.workers < 1 or (args.steps is not None and args.steps < 1):
        print("dist-cardio demo: error: --workers and --steps must be ≥ 1", file=sys.stderr)
        return 2
    try:
        written = run_demo(args.out, args.workers, args.steps or (QUICK_STEPS if args.quick else STEPS), args.quick,
                           progress=not args.no_progress)
    except (StageError, CheckpointError) as e:  # CheckpointError: --steps changed since the run in --out
        print(f"dist-cardio demo: error: {e}", file=sys.stderr)
        return 1
    print("\nwritten:")
    for name, path in written.items():
        print(f"   {name:<26} {path}")
    return 0


def run_demo(out: Path, workers: int, steps: int, quick: bool, progress: bool = True) -> dict[str, Path]:
    """Run every stage into `out`; returns the artifacts written (name → path), also saved as `out/demo.json`."""
    started = time.perf_counter()
    step = Steps(6)
    render_dir, shards, pre_dir, ft_dir = out / "render", out / "shards", out / "pretrain", out / "finetune"
    with step(f"render: the built-in sample (200 PTB-XL records) → {RENDER.dpi} dpi printouts"):
        render_printouts(SAMPLE_PTBXL, render_dir, RENDER, workers=workers)
    with step("shard: printouts → WebDataset shards with DALI indexes (unlabelled, for pretraining), then verify"):
        build_shards([render_dir / "images"], shards, workers=workers, progress=progress)
    with step(f"pretrain: SimCLR on the unlabelled shards, {steps} steps (configs/pretrain/cpu-small.yaml)"):
        pre_cfg = load_pretrain_config(CONFIGS / "pretrain" / "cpu-small.yaml",
                                       [f"data.shards={shards}", f"out={pre_dir}", f"steps={steps}"])
        pre = pretrain(pre_cfg)
        if pre["losses"]:
            chance = math.log(2 * pre["global_batch"] - 1)  # NT-Xent when every embedding is alike
            print(f"   contrastive loss {pre['losses'][0]:.3f} → {pre['losses'][-1]:.3f} (chance level {chance:.3f})")
    with step("finetune: PTB-XL superclasses, strat_fold 1-8 train / 9 validation / 10 test"):
        overrides = ["split.mode=strat_fold"] + (_QUICK_FINETUNE if quick else [])
        ft_cfg = load_finetune_config(CONFIGS / "finetune" / "cpu-small.yaml", overrides)
        finetune(ft_cfg, pre_dir, render_dir, ft_dir, progress=progress)
    with step("evaluate: held-out test fold, 95% bootstrap confidence intervals"):
        metrics = evaluate(ft_dir, render_dir, out / "evaluate", "test", 200 if quick else 1000, progress=progress)
        print(metrics_table(metrics))
    with step(f"explain: Grad-CAM overlays + shortcut audit on {EXPLAINED} test images"):
        images = _test_images(render_dir, ft_cfg.split.test_folds, EXPLAINED)
        audit = explain(ft_dir, images, out / "explain", progress=progress)
        share = audit["mean_outside_grid_share"]
        print(f"   attention outside the ECG grid: {'n/a' if share is None else f'{100 * share:.1f}%'} on average; "
              f"{len(audit['flagged'])} of {audit['images']} images flagged")

    written = {
        "labels (render)": render_dir / "labels.csv",
        "shard manifest": shards / "manifest.json",
        "pretraining checkpoint": Path(pre["checkpoint"]),
        "pretraining loss curve": pre["loss_curve"],
        "fine-tuned model": ft_dir / "best.pt",
        "training curves": ft_dir / "curves.png",
        "test metrics": out / "evaluate" / "metrics.json",
        "confusion matrix": out / "evaluate" / "confusion_matrix.png",
        "shortcut audit": out / "explain" / "audit.csv",
        **{f"Grad-CAM {Path(r['path']).stem}": out / "explain" / r["overlay"] for r in audit["per_image"]},
    }
    write_json(out / "demo.json", {"seconds": round(time.perf_counter() - started, 1), "steps": steps, "quick": quick,
                                   "metrics": {k: metrics[k] for k in ("n", "accuracy", "macro_f1", "macro_auroc")},
                                   "written": {k: str(v) for k, v in written.items()}})
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    return written


_QUICK_FINETUNE = [
    "stages=[{epochs: 1, lr: 0.001, groups: 1}, {epochs: 1, lr: 0.0003, groups: all}]",
    "n_bootstrap=200",
]


def _test_images(render_dir: Path, folds: tuple[int, ...], n: int) -> list[Path]:
    """The first `n` rendered printouts of the test folds (the model never trained on them)."""
    with open(render_dir / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["strat_fold"] and int(r["strat_fold"]) in folds]
    if not rows:
        raise StageError(f"{render_dir / 'labels.csv'}: no image in the test folds {folds}")
    return [render_dir / r["path"] for r in rows[:n]]
