"""Recipe sweep: does the shipped small-batch contrastive recipe collapse on any data set, for any seed?

    python benchmarks/collapse.py [--data-root ../shared/data] [--work DIR] [--seeds 3] [--stop-at 60]
                                  [--pool SHARDS] [--json collapse.json]

Collapse means every image maps to about the same embedding: the spread (`embedding_spread`, logged on every
progress row) falls below `COLLAPSED_SPREAD` = 0.05 after warmup and the loss sits at ln(2·batch − 1). With the
recipe before issue 12 it depended on the data at batch 32 (the pretraining issue's closing note: the 640-page
varied pool collapsed by step 50-75, clean 50-dpi pages at 128 collapsed, 64 and 256 did not).

Each run is the real `dist-cardio pretrain` in its own process with the shipped config, on the set's shards:
- `cpu-small`: `configs/pretrain/cpu-small.yaml` as shipped (batch 32, √-scaled LR, 300-step schedule with a 10 %
  warmup), stopped by SIGTERM at `--stop-at` steps: warmup and the steps right after it at peak LR, where the
  old recipe collapsed. The schedule is the full run's, so the LR seen is the real one.
- `demo`: what `dist-cardio demo` runs on its built-in sample (batch 16, 60 steps, run to the end).
Sets: `sample` (the package's 200 PTB-XL records at 100 dpi, the demo's data), `printouts` (the 52 real
printouts and scans of `ecg-printouts`), `clean-128` (128 clean 100-dpi `ptbxl-500` pages), and `pool` when
`--pool` names a shard set (e.g. the 1,835-page varied pool that `benchmarks/ptbxl.py` writes).
Seeds change the initialisation, the data order and the augmentation draws (`seed`, `data.seed`).

Prints one row per run (loss first → last, lowest spread after warmup, collapsed or not) and writes `--json`
`{"runs": [...], "collapsed": n, "collapse_threshold": 0.05}`. Costs ~4-5 s per cpu-small step on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_cardio.commands.demo import MAX_SIDE, PRETRAIN_BATCH, RENDER, STEPS, build_shards, render_printouts, usable_cpus
from dist_cardio.signals.records import SAMPLE_PTBXL
from dist_cardio.train.runlog import COLLAPSED_SPREAD

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pretrain" / "cpu-small.yaml"


@dataclass(frozen=True)
class Recipe:
    name: str
    overrides: tuple[str, ...]
    steps: int
    """Steps of the schedule (the run's length as configured)."""
    warmup: int


RECIPES = {
    "cpu-small": Recipe("cpu-small", (), steps=300, warmup=30),
    "demo": Recipe("demo", (f"data.batch_size={PRETRAIN_BATCH}", f"steps={STEPS}"), steps=STEPS, warmup=round(0.1 * STEPS)),
}


def build_sets(data_root: Path, work: Path, pool: Path | None, workers: int) -> dict[str, Path]:
    """Shard sets by name (rendered and sharded into `work` once; a re-run reuses them)."""
    sets = {}
    for name, source, limit in (("sample", SAMPLE_PTBXL, None), ("clean-128", data_root / "ptbxl-500", 128)):
        render_dir, shards = work / "render" / name, work / "shards" / name
        if not (shards / "manifest.json").is_file():
            render_printouts(source, render_dir, RENDER, workers=workers, limit=limit)
            build_shards([render_dir / "images"], shards, workers=workers, max_side=MAX_SIDE, progress=False)
        sets[name] = shards
    shards = work / "shards" / "printouts"
    if not (shards / "manifest.json").is_file():
        build_shards([data_root / "ecg-printouts"], shards, workers=workers, max_side=MAX_SIDE, progress=False)
    sets["printouts"] = shards
    if pool is not None:
        sets["pool"] = pool
    return sets


def run_one(recipe: Recipe, shards: Path, seed: int, out: Path, stop_at: int | None) -> dict[str, Any]:
    """One real pretraining process; SIGTERM once `stop_at` steps are logged (None: to the end)."""
    sets = [f"data.shards={shards}", f"seed={seed}", f"data.seed={seed}", "log_every=5", "monitor.shards=",
            f"checkpoint.every={recipe.steps}", *recipe.overrides]
    cmd = [sys.executable, "-m", "dist_cardio.cli", "pretrain", "--config", str(CONFIG), "--out", str(out),
           *(a for s in sets for a in ("--set", s))]
    metrics = out / "metrics.jsonl"
    started = time.perf_counter()
    if not (out / "summary.json").is_file() and not _logged(metrics, stop_at):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
        with open(out.parent / f"{out.name}.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            while proc.poll() is None:
                if stop_at is not None and _logged(metrics, stop_at):
                    proc.send_signal(signal.SIGTERM)
                    break
                time.sleep(0.5)
            rc = proc.wait()
        if rc not in (0, 143):
            raise RuntimeError(f"{out}: pretraining exited {rc}; see {out.parent / f'{out.name}.log'}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if stop_at is None or r["step"] <= stop_at]
    after = [r for r in rows if r["step"] > recipe.warmup]
    lowest = min((r["spread"] for r in after), default=math.nan)
    batch = PRETRAIN_BATCH if recipe.name == "demo" else 32
    return {
        "recipe": recipe.name, "set": shards.name, "seed": seed, "steps": rows[-1]["step"], "schedule_steps": recipe.steps,
        "warmup": recipe.warmup, "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
        "chance": math.log(2 * batch - 1), "min_spread_after_warmup": lowest, "spread_last": rows[-1]["spread"],
        "collapsed": bool(lowest < COLLAPSED_SPREAD), "seconds": round(time.perf_counter() - started, 1),
    }


def _logged(metrics: Path, step: int | None) -> bool:
    if step is None or not metrics.is_file():
        return False
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    return bool(lines) and json.loads(lines[-1])["step"] >= step


def table(runs: list[dict[str, Any]]) -> str:
    head = f"{'recipe':<10} {'set':<10} {'seed':>4} {'steps':>9} {'loss first → last (chance)':<28} {'min spread':>10}  collapsed"
    lines = [head, "─" * len(head)]
    for r in runs:
        spread = r["min_spread_after_warmup"]
        lines.append(f"{r['recipe']:<10} {r['set']:<10} {r['seed']:>4} {r['steps']:>4}/{r['schedule_steps']:<4} "
                     f"{r['loss_first']:.3f} → {r['loss_last']:.3f} ({r['chance']:.3f}){'':<6} "
                     f"{f'{spread:.3f}' if math.isfinite(spread) else 'n/a':>10}  {'YES' if r['collapsed'] else 'no'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-collapse")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--stop-at", type=int, default=60, help="cpu-small runs stop after this many steps")
    parser.add_argument("--pool", type=Path, help="a further shard set to sweep (e.g. benchmarks/ptbxl.py's pool)")
    parser.add_argument("--sets", default="printouts,clean-128,sample,pool", help="comma-separated subset of the sets, in run order")
    parser.add_argument("--recipes", default="demo,cpu-small", help="comma-separated subset of: demo, cpu-small")
    parser.add_argument("--workers", type=int, default=usable_cpus())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sets = build_sets(args.data_root, args.work, args.pool, args.workers)
    chosen = [s for s in args.sets.split(",") if s in sets]
    recipes = args.recipes.split(",")
    plan = ([(RECIPES["cpu-small"], s, args.stop_at) for s in chosen] if "cpu-small" in recipes else []) + \
        ([(RECIPES["demo"], "sample", None)] if "demo" in recipes else [])
    runs = []
    for recipe, name, stop_at in plan:
        for seed in range(args.seeds):
            out = args.work / "runs" / f"{recipe.name}-{name}-seed{seed}"
            out.parent.mkdir(parents=True, exist_ok=True)
            runs.append(run_one(recipe, sets[name], seed, out, stop_at))
            print(table(runs[-1:]).splitlines()[-1], flush=True)
    print("\n" + table(runs))
    collapsed = sum(r["collapsed"] for r in runs)
    print(f"\n{collapsed} of {len(runs)} runs collapsed (spread < {COLLAPSED_SPREAD} after warmup)")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "collapsed": collapsed, "collapse_threshold": COLLAPSED_SPREAD},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
