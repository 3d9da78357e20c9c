"""The whole pipeline as a few functions: render → shard → pretrain → fine-tune → evaluate → explain.

`dist-cardio demo` and `benchmarks/ptbxl.py` chain the same stages on different data; each function
takes explicit paths, calls the stage's own API and returns what the next stage needs. Every stage is
incremental, so re-running into the same folder resumes instead of starting over: rendered images and
shards already on disk are kept, pretraining continues from its `latest` checkpoint (a finished run
just reports), and a fine-tuning whose outputs exist is read back instead of redone.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dist_cardio.downstream.finetune import BEST, FinetuneConfig, run_finetune
from dist_cardio.downstream.gradcam import WARN_ABOVE, explain_files
from dist_cardio.downstream.metrics import plot_confusion_matrix
from dist_cardio.downstream.predict import evaluate_data, load_finetuned
from dist_cardio.train.pretrain import PretrainConfig, run as run_pretrain
from dist_cardio.signals.render import RenderConfig, render_dataset
from dist_cardio.shard import ShardConfig, shard_inputs, verify_shard_set

CONFIGS = Path(__file__).resolve().parent / "configs"
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
    """Write `doc` as JSON under a temporary name, then rename (a killed run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False, default=str) + "\n")
    os.replace(tmp, path)


def metric_line(metrics: dict[str, Any], key: str) -> str:
    """`0.812 [0.700, 0.905]` for one `{"value", "ci95"}` entry of `metrics.evaluate_predictions`."""
    value, (lo, hi) = metrics[key]["value"], metrics[key]["ci95"]
    if value is None:
        return "undefined"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{value:.3f}"


def metrics_table(metrics: dict[str, Any]) -> str:
    """The headline metrics and one row per class, with 95% bootstrap intervals."""
    lines = [f"   {metrics['n']} images ({metrics.get('subset', 'test')}), "
             f"{'multi' if metrics['multilabel'] else 'single'}-label; 95% bootstrap CIs in brackets"]
    for key, name in (("accuracy", "accuracy" + (" (exact match)" if metrics["multilabel"] else "")),
                      ("macro_f1", "macro-F1"), ("macro_auroc", "macro-AUROC")):
        lines.append(f"   {name:<24} {metric_line(metrics, key)}")
    lines.append(f"   {'class':<8} {'n':>4}  {'F1':<22} AUROC")
    for name, entry in metrics["per_class"].items():
        lines.append(f"   {name:<8} {entry['support']:>4}  {metric_line(entry, 'f1'):<22} {metric_line(entry, 'auroc')}")
    return "\n".join(lines)


def usable_cpus() -> int:
    """CPUs this process may run on (the default number of render and shard workers)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


__all__ = [
    "CONFIGS", "StageError", "Steps", "render_printouts", "build_shards", "pretrain", "pretrain_losses", "finetune",
    "evaluate", "explain", "write_json", "metric_line", "metrics_table", "usable_cpus",
]
