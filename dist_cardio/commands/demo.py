"""`dist-cardio demo`: the whole pipeline on the built-in 200 PTB-XL records, in a few minutes on a CPU.

render → shard (+ verify) → contrastive pretraining → fine-tuning on the PTB-XL superclasses (official
`strat_fold` split: folds 1-8 train, 9 validation, 10 test) → evaluation → Grad-CAM explanations. It
needs nothing but the package (the sample ships in it). Every stage resumes, so running it again into
the same folder finishes what an interrupted run left and redoes nothing that is complete.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dist_cardio.atomic import atomic_write_json
from dist_cardio.downstream.finetune import BEST, FinetuneConfig, load_finetune_config, run_finetune
from dist_cardio.downstream.gradcam import WARN_ABOVE, explain_files
from dist_cardio.downstream.metrics import metric_text, plot_confusion_matrix
from dist_cardio.downstream.predict import evaluate_data, load_finetuned
from dist_cardio.shard import ShardConfig, shard_inputs, verify_shard_set
from dist_cardio.signals.records import SAMPLE_PTBXL
from dist_cardio.signals.render import RenderConfig, render_dataset
from dist_cardio.train.checkpoint import CheckpointError
from dist_cardio.train.pretrain import PretrainConfig, load_pretrain_config, run as run_pretrain

RENDER = RenderConfig(dpi=100)
"""100 dpi: 1169×827 pages, ~20 KB PNGs, ~30 pages/s on 2 cores; the 1 mm grid is still 4 px apart."""
STEPS = 60
"""Pretraining steps of the full demo (cpu-small at 512 × 352 px, batch 16: about 2 minutes on 2 cores)."""
PRETRAIN_BATCH = 16
"""Half of cpu-small.yaml's 32: in the demo's two minutes, 60 steps of 16 took the contrastive loss below
chance (3.79 → 3.33, chance 3.43) where 30 steps of 32 had not left it yet (4.45 → 4.14, chance 4.14)."""
MAX_SIDE = 640
"""Shards keep a training-resolution copy (`shard --max-side`): 640 px holds every pixel of the 512 px views."""
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
    with step(f"shard: printouts → WebDataset shards (≤ {MAX_SIDE} px) with DALI indexes and labels, then verify"):
        build_shards([render_dir / "images"], shards, labels=render_dir / "labels.csv", workers=workers,
                     max_side=MAX_SIDE, progress=progress)
    with step(f"pretrain: SimCLR on the shards (labels unused), {steps} steps of {PRETRAIN_BATCH} (configs/pretrain/cpu-small.yaml)"):
        # The monitor scores the encoder by k-NN on the same labelled shards: pretraining never sees a label.
        pre_cfg = load_pretrain_config(CONFIGS / "pretrain" / "cpu-small.yaml",
                                       [f"data.shards={shards}", f"out={pre_dir}", f"steps={steps}",
                                        f"data.batch_size={PRETRAIN_BATCH}",
                                        f"monitor.shards={shards}", f"monitor.every={_monitor_every(steps)}"])
        pre = pretrain(pre_cfg)
        if pre["losses"]:
            chance = math.log(2 * pre["global_batch"] - 1)  # NT-Xent when every embedding is alike
            print(f"   contrastive loss {pre['losses'][0]:.3f} → {pre['losses'][-1]:.3f} (chance level {chance:.3f})")
    with step("finetune: PTB-XL superclasses, strat_fold 1-8 train / 9 validation / 10 test"):
        overrides = ["split.mode=strat_fold"] + (_QUICK_FINETUNE if quick else [])
        ft_cfg = load_finetune_config(CONFIGS / "finetune" / "cpu-small.yaml", overrides)
        if not quick:
            ft_cfg = _within_epochs(ft_cfg, FINETUNE_EPOCHS)
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
    "stages=[{epochs: 1, lr: 0.003, groups: 1}, {epochs: 1, lr: 0.002, groups: all}]",
    "n_bootstrap=200",
]
FINETUNE_EPOCHS = 20
"""The demo's budget (≤ 6 minutes on 2 cores): 20 of cpu-small.yaml's 26 fine-tuning epochs."""


def _within_epochs(cfg: FinetuneConfig, epochs: int) -> FinetuneConfig:
    """``cfg`` with its last unfreezing stage shortened so that all stages together last ``epochs``."""
    *first, last = cfg.stages
    cut = sum(s.epochs for s in cfg.stages) - epochs
    if cut <= 0:
        return cfg
    return dataclasses.replace(cfg, stages=(*first, dataclasses.replace(last, epochs=max(1, last.epochs - cut))))


def _monitor_every(steps: int) -> int:
    """k-NN monitor about three times a run, on a progress line (a multiple of log_every = 10)."""
    return max(10, 10 * round(steps / 30))


def _test_images(render_dir: Path, folds: tuple[int, ...], n: int) -> list[Path]:
    """The first `n` rendered printouts of the test folds (the model never trained on them)."""
    with open(render_dir / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["strat_fold"] and int(r["strat_fold"]) in folds]
    if not rows:
        raise StageError(f"{render_dir / 'labels.csv'}: no image in the test folds {folds}")
    return [render_dir / r["path"] for r in rows[:n]]


# --- the stages the demo chains (benchmarks/ptbxl.py chains the same ones on real data) -------------
# Each takes explicit paths, calls the stage's own API and returns what the next stage needs; every stage
# is incremental, so re-running into the same folder resumes instead of starting over.

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""The YAML configs shipped in the package (`configs/` in the repository links here)."""


class StageError(RuntimeError):
    """A stage produced nothing usable; the message names the folder and what to look at."""


class Steps:
    """Numbered step headers with the time each step took, so a long run reads as a sequence of stages."""

    def __init__(self, total: int, width: int = 78) -> None:
        self.total, self.width, self.done = total, width, 0

    @contextmanager
    def __call__(self, title: str) -> Iterator[None]:
        self.done += 1
        head = f"── [{self.done}/{self.total}] {title} "
        print(f"\n{head}{'─' * max(3, self.width - len(head))}", flush=True)
        start = time.perf_counter()
        yield
        print(f"   ({title.split(':')[0]} took {time.perf_counter() - start:.1f} s)", flush=True)


def render_printouts(source: Path, out: Path, cfg: RenderConfig, *, workers: int, vary: bool = False, seed: int = 0,
                     exclude_ids: frozenset[int] = frozenset(), limit: int | None = None) -> dict[str, Any]:
    """Render `source` (PTB-XL root, WFDB folder or .npz) into `out/images` + `out/labels.csv`; kept images are skipped."""
    summary = render_dataset(source, out, cfg, workers, limit, vary, seed, exclude_ids=exclude_ids)
    images = summary["written"] + summary["skipped"]
    print(f"   {summary['written']} rendered, {summary['skipped']} already there, {summary['failed']} unreadable → {out}")
    if images == 0:
        raise StageError(f"{out}: no printout could be rendered from {source} (see the warnings above)")
    return {**summary, "images": images, "labels": out / "labels.csv"}


def build_shards(inputs: list[Path], out: Path, *, labels: Path | None = None, workers: int = 0,
                 max_side: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Pack image folders into the shard set `out` (content already there is skipped), then verify all of it."""
    cfg = ShardConfig(labels=str(labels) if labels else None, workers=workers, max_side=max_side, progress=progress)
    summary = shard_inputs(inputs, out, cfg)
    report = verify_shard_set(out, decode=True, progress=progress)
    if not report.ok:
        raise StageError(report.text(max_problems=10))
    totals = summary["totals"]
    print(f"   {summary['added']} added, {summary['already_present']} already in the set, {summary['skipped']} skipped; "
          f"verified {totals['samples']} samples in {totals['shards']} shard(s), {totals['bytes'] / 1e6:.1f} MB → {out}")
    return summary


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Contrastive pretraining (resumes from `<cfg.out>/checkpoints/latest`); returns the run's summary."""
    summary = run_pretrain(cfg)
    out = Path(cfg.out)
    summary["loss_curve"] = out / "loss.png"
    summary["losses"] = pretrain_losses(out)
    if summary["checkpoint"] is None or summary["interrupted"]:
        raise StageError(f"{out}: pretraining stopped at step {summary['step']} without finishing; re-run to resume")
    return summary


def pretrain_losses(out: Path) -> list[float]:
    """The logged contrastive losses of a pretraining run, in step order (resumed parts included)."""
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if line.strip()]


def finetune(cfg: FinetuneConfig, checkpoint: Path | None, data: Path, out: Path, progress: bool = True) -> dict[str, Any]:
    """Fine-tune (`checkpoint` None: from scratch), or read back the summary of a run that already finished in `out`."""
    done = out / "metrics.json"
    if done.is_file() and (out / BEST).is_file():
        print(f"   already fine-tuned in {out}: kept")
        return json.loads(done.read_text())["summary"]
    return run_finetune(cfg, checkpoint, data, out, progress=progress)


def evaluate(checkpoint: Path, data: Path, out: Path, subset: str = "auto", n_bootstrap: int = 1000,
             progress: bool = True) -> dict[str, Any]:
    """Metrics with 95% CIs of a fine-tuned model on `data` (`subset` as in `predict.evaluate_data`).

    Writes `out/metrics.json` and `out/confusion_matrix.png` (recomputed on every run: it takes seconds).
    """
    metrics = evaluate_data(load_finetuned(checkpoint), data, subset, n_bootstrap, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion_matrix(metrics, str(out / "confusion_matrix.png"))
    write_json(out / "metrics.json", metrics)
    return metrics


def explain(checkpoint: Path, images: list[Path], out: Path, progress: bool = True) -> dict[str, Any]:
    """Grad-CAM overlays of `images` and the shortcut audit (attention outside the ECG grid) in `out`."""
    return explain_files(load_finetuned(checkpoint), images, out, None, WARN_ABOVE, progress=progress)


def write_json(path: Path, doc: Any) -> None:
    """Write `doc` as JSON atomically (a killed run never leaves half a file), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc, indent=1, allow_nan=False, default=str)


def metrics_table(metrics: dict[str, Any]) -> str:
    """The headline metrics and one row per class, with 95% bootstrap intervals."""
    lines = [f"   {metrics['n']} images ({metrics.get('subset', 'test')}), "
             f"{'multi' if metrics['multilabel'] else 'single'}-label; 95% bootstrap CIs in brackets"]
    for key, name in (("accuracy", "accuracy" + (" (exact match)" if metrics["multilabel"] else "")),
                      ("macro_f1", "macro-F1"), ("macro_auroc", "macro-AUROC")):
        lines.append(f"   {name:<24} {metric_text(metrics[key])}")
    lines.append(f"   {'class':<8} {'n':>4}  {'F1':<22} AUROC")
    for name, entry in metrics["per_class"].items():
        lines.append(f"   {name:<8} {entry['support']:>4}  {metric_text(entry['f1']):<22} {metric_text(entry['auroc'])}")
    return "\n".join(lines)


def usable_cpus() -> int:
    """CPUs this process may run on (the default number of render and shard workers)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
