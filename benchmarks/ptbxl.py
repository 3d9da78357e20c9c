"""PTB-XL benchmark: does contrastive pretraining on unlabelled printouts help superclass classification?

    python benchmarks/ptbxl.py [--profile smoke|cpu|full] [--data-root ../shared/data] [--work DIR]
                               [--workers N] [--seeds 3] [--json results.json]

Protocol (real data from `--data-root`, see its README for licences; PTB-XL: Wagner et al., Sci Data 7:154, 2020):
1. Render `ptbxl-500` (PTB-XL ecg_id 1-500, 100 Hz) as clean 12-lead printouts: the labelled hospital.
2. Render the unlabelled pool with varied layouts (`vary`: dpi, grid colour, line width, rotation, noise,
   blur, header, JPEG quality): `ptbxl-1819-preprocessed` minus the 34 ecg_ids that are also in
   `ptbxl-500` (no test record leaks into pretraining), plus the 50 Georgia records of `g12ec-50`.
3. Shard the pool (training-resolution copies) and pretrain SimCardioNet with SimCLR on it.
4. Fine-tune on the five PTB-XL superclasses (NORM, MI, STTC, CD, HYP; multi-label, sigmoid) with the
   official `strat_fold` split: folds 1-8 train, fold 9 validation (early stopping and the best epoch
   are chosen on it), fold 10 test. Two arms with the same labels and the same epoch budget:
   (a) pretrained, gradual unfreezing as configured; (b) the same network from random initialisation,
   all layers trained for the same total number of epochs (unfreezing a random encoder step by step
   would only handicap it). Each at 100% and at a seeded 25% subset of the training rows (the
   validation and test folds stay whole).
5. Evaluate every model on fold 10 (the test set proper: 64 labelled records) and on folds 9+10 (136, tighter
   intervals, but fold 9 was used for model selection, so it is slightly optimistic). Metrics:
   exact-match accuracy (all five labels right), macro-F1, macro-AUROC, each with a 95% bootstrap CI.
6. The information ceiling: a plain 1-D CNN on the 100 Hz signals of the same records, labels and folds
   (`benchmarks/signal_baseline.py`).
Seeds: pretraining runs once (seed 0); the 100 % arms once; the 25 % arms, whose comparison carries the
pretraining claim, `--seeds` times (each seed draws its own subset and fine-tunes with its own seed).
Tables give mean ± sd over seeds and every run's bootstrap CI.

How this differs from the SimCardioNet paper (~92% accuracy and F1 on all 21,837 PTB-XL records):
- Data: 500 records (the oldest, 1984-85: not a random sample) instead of 21,837, so 352 labelled
  training and 64 test records; pretraining sees ~1,800 printouts, not a large multi-hospital corpus.
- Printouts are drawn from the signals by this project's renderer, not printed by ECG carts and
  scanned, and the pool's signals are band-passed and z-scored, so their amplitudes are typical, not
  the patient's.
- Model and budget: the `cpu` profile uses the 0.48 M-parameter `cpu-small` network at 512 × 352 px
  (1.8 px/mm of ECG grid) and 400 pretraining steps at batch 32 (~7 epochs of the pool); `full` uses the `default` network
  (~4 M parameters, 768 × 544 px) and a GPU, closer to the paper's setting but still a small pool.
- Accuracy here is multi-label exact match over five classes, a stricter measure than per-label accuracy.
So the absolute numbers are far below the paper's; the comparison that matters is pretrained vs
scratch under the same conditions, and with 64 test records only CIs that do not overlap are a finding.

Profiles: `smoke` checks the script in a few minutes (tiny pool, few steps; numbers meaningless);
`cpu` fits a 2-core machine in about 90 minutes including rendering; `full` is for a GPU (200 dpi,
the 768 × 544 px `default` network, longer pretraining). Everything is cached in `--work`: a re-run skips the
rendered images, shards, finished pretraining and finished fine-tunings it finds there.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_cardio.downstream.finetune import FinetuneConfig, StageConfig, load_finetune_config
from dist_cardio.commands.demo import (
    CONFIGS,
    Steps,
    build_shards,
    evaluate,
    finetune,
    pretrain,
    render_printouts,
    usable_cpus,
    write_json,
)
from dist_cardio.downstream.metrics import metric_text
from dist_cardio.train.pretrain import PretrainConfig, load_pretrain_config
from dist_cardio.signals.records import read_id_list
from dist_cardio.signals.render import RenderConfig
# benchmarks/ is on sys.path when this script runs; the protocol (folds, test sets, metrics) is stated there once
from signal_baseline import METRICS, SELECTION_FOLD, TEST_SETS, TRAIN_FOLDS, run_baseline, seed_stats

REPO = Path(__file__).resolve().parents[1]
LABELLED = "ptbxl-500"
POOL_NPZ = "ptbxl-1819-preprocessed/ptbxl_1819_bp0.5-40_zscore_100hz_f16.npz"
POOL_WFDB = "g12ec-50"
FRACTIONS = (100, 25)
ARMS = ("pretrained", "scratch")


@dataclass(frozen=True)
class Profile:
    """Sizes and budgets of one benchmark run."""

    dpi: int
    """Base dpi of every printout (the pool's varied pages use 0.75-1.25× this)."""
    max_side: int | None
    """Pool shards store copies at most this many pixels on the long side (decode cost is the CPU bottleneck)."""
    pool_limit: int | None
    """Records of each pool source rendered (None: all)."""
    pretrain_config: str
    pretrain_steps: int
    finetune_config: str
    pretrain_overrides: tuple[str, ...] = ()
    finetune_overrides: tuple[str, ...] = ()
    n_bootstrap: int = 1000
    signal_epochs: int = 40
    """Training epochs of the signal baseline (~35 s per seed on one thread at 40)."""

    def __post_init__(self) -> None:
        if self.pretrain_steps < 1:
            raise ValueError(f"pretrain_steps must be ≥ 1, got {self.pretrain_steps}")


PROFILES = {
    "smoke": Profile(dpi=75, max_side=512, pool_limit=64, pretrain_config="tiny.yaml", pretrain_steps=8,
                     finetune_config="tiny.yaml", n_bootstrap=100, signal_epochs=2,
                     finetune_overrides=("stages=[{epochs: 1, lr: 0.003, groups: 1}, {epochs: 1, lr: 0.001, groups: all}]",)),
    "cpu": Profile(dpi=100, max_side=640, pool_limit=None, pretrain_config="cpu-small.yaml", pretrain_steps=400,
                   finetune_config="cpu-small.yaml"),
    "full": Profile(dpi=200, max_side=1024, pool_limit=None, pretrain_config="default.yaml", pretrain_steps=3000,
                    finetune_config="default.yaml"),
}


def scratch_config(cfg: FinetuneConfig, pre: PretrainConfig) -> FinetuneConfig:
    """The baseline: the pretraining architecture, all layers for the arm's total epochs at its top LR, one
    LR for every layer (discriminative LRs protect pretrained features; a random encoder has none) and a
    10 % warmup (the pretrained arm's full-network stage has one too)."""
    stage = StageConfig(epochs=sum(s.epochs for s in cfg.stages), lr=max(s.lr for s in cfg.stages), groups="all",
                        warmup=0.1)
    return dataclasses.replace(cfg, model=pre.model, stages=(stage,), lr_decay=1.0)


def write_subset(labels: Path, target: Path, keep: Any) -> int:
    """A copy of `labels` (render's labels.csv) with only the labelled rows `keep(row)` accepts; returns the rows kept."""
    with open(labels, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r["label"] and keep(r)]
        fields = reader.fieldnames
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, target)
    return len(rows)


def training_subset(labels: Path, fraction: int, seed: int) -> set[str]:
    """Paths of a seeded `fraction`% of the labelled training-fold rows (the same for both arms)."""
    with open(labels, newline="") as f:
        train = sorted(r["path"] for r in csv.DictReader(f) if r["label"] and r["strat_fold"] and int(r["strat_fold"]) in TRAIN_FOLDS)
    n = max(1, round(len(train) * fraction / 100))
    return set(np.random.default_rng(seed).permutation(train)[:n].tolist())


def label_files(render_dir: Path, seeds: int) -> dict[str, Path]:
    """The CSVs fine-tuning and evaluation read: `train-100`, `train-25-seedK` per seed (val + test folds
    whole in each), and the test sets."""
    labels = render_dir / "labels.csv"
    files: dict[str, Path] = {}
    for fraction in FRACTIONS:
        for seed in range(seeds if fraction < 100 else 1):
            chosen = training_subset(labels, fraction, seed)
            key = run_key(fraction, seed)
            files[key] = render_dir / f"labels-{key}.csv"
            n = write_subset(labels, files[key], lambda r, chosen=chosen: r["path"] in chosen or int(r["strat_fold"] or 0) not in TRAIN_FOLDS)
            print(f"   {fraction}% of the training rows (seed {seed}): {len(chosen)} ({n} rows with validation and test)")
    for name, folds in TEST_SETS.items():
        files[name] = render_dir / f"labels-{name}.csv"
        n = write_subset(labels, files[name], lambda r, folds=folds: r["strat_fold"] and int(r["strat_fold"]) in folds)
        print(f"   test set {name}: {n} labelled records")
    return files


def run_order(seeds: int) -> list[tuple[str, int, int]]:
    """(arm, label %, seed) in the order they run: the 25 % pairs seed by seed (the pretraining claim), then 100 %."""
    low = [(arm, fraction, seed) for fraction in FRACTIONS if fraction < 100 for seed in range(seeds) for arm in ARMS]
    return low + [(arm, 100, 0) for arm in ARMS]


def run_key(fraction: int, seed: int) -> str:
    """`train-100` (one run: every training row), `train-25-seed0`, … (a seeded subset per seed)."""
    return f"train-{fraction}" if fraction == 100 else f"train-{fraction}-seed{seed}"


def results_table(results: dict[str, Any]) -> str:
    """Both arms × label fractions and the signal model, per test set: mean ± sd over seeds, then the 95%
    bootstrap CI of every seed's run."""
    head = f"{'arm':<11} {'labels':>6} {'seeds':>5}  {'test set':<10} " + "  ".join(f"{m:<22}" for m in METRICS)
    lines = [head, "─" * len(head)]
    rows = [(arm, f"{fraction}%", results[arm][str(fraction)]["runs"]) for arm in ARMS for fraction in FRACTIONS]
    rows.append(("signal", "100%", results["signal_baseline"]["runs"]))
    for arm, labels, runs in rows:
        for test in TEST_SETS:
            cells = []
            for m in METRICS:
                mean, sd = seed_stats(runs, test, m)
                cells.append("n/a" if mean is None else f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else ""))
            lines.append(f"{arm:<11} {labels:>6} {len(runs):>5}  {test:<10} " + "  ".join(f"{c:<22}" for c in cells))
            for k, run in enumerate(runs):
                lines.append(f"{'':<11} {'':>6} {'#' + str(k):>5}  {'':<10} " + "  ".join(f"{metric_text(run[test][m]):<22}" for m in METRICS))
    return "\n".join(lines)


def plot_results(results: dict[str, Any], test: str, path: Path) -> None:
    """One panel per metric: pretrained vs scratch bars (mean over seeds) at each label fraction; error bars
    are the 95% bootstrap CI for a single seed, ± sd over seeds otherwise; the signal model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    x = np.arange(len(FRACTIONS))
    for ax, metric in zip(axes, METRICS):
        for k, (arm, colour) in enumerate((("pretrained", "tab:blue"), ("scratch", "tab:grey"))):
            values, lo, hi = [], [], []
            for fraction in FRACTIONS:
                runs = results[arm][str(fraction)]["runs"]
                mean, sd = seed_stats(runs, test, metric)
                mean = np.nan if mean is None else mean
                ci = runs[0][test][metric]["ci95"]
                low, high = (mean - sd, mean + sd) if sd is not None else (ci[0] if ci[0] is not None else mean, ci[1] if ci[1] is not None else mean)
                values.append(mean), lo.append(low), hi.append(high)
            values_a = np.array(values)
            ax.bar(x + (k - 0.5) * 0.38, values_a, 0.38, yerr=[values_a - np.array(lo), np.array(hi) - values_a],
                   capsize=4, color=colour, label=arm)
        signal, _ = seed_stats(results["signal_baseline"]["runs"], test, metric)
        if signal is not None:
            ax.axhline(signal, color="tab:red", ls="--", lw=1, label="1-D CNN on signals")
        ax.set_xticks(x, [f"{f}% labels" for f in FRACTIONS])
        ax.set_ylim(0, 1)
        ax.set_title(metric.replace("_", " "))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"PTB-XL superclasses, {test} (95% CI for one seed, ± sd over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_benchmark(profile: Profile, data_root: Path, work: Path, workers: int, seeds: int = 3) -> dict[str, Any]:
    """Every stage of the protocol in the module docstring; returns the full results (also in `work/results.json`)."""
    for rel in (LABELLED, POOL_NPZ, POOL_WFDB):
        if not (data_root / rel).exists():
            raise FileNotFoundError(f"{data_root / rel}: missing (pass --data-root, the folder holding {LABELLED}/ etc.)")
    started = time.perf_counter()
    seed = 0  # pretraining, rendering and the 100 % arms; the 25 % arms run seeds 0 … seeds-1
    step = Steps(6)
    render_cfg = RenderConfig(dpi=profile.dpi)
    labelled_dir, shards, pre_dir = work / "render" / LABELLED, work / "shards" / "pool", work / "pretrain"
    with step(f"render: {LABELLED} as clean printouts at {profile.dpi} dpi (the labelled hospital)"):
        render_printouts(data_root / LABELLED, labelled_dir, render_cfg, workers=workers)
        files = label_files(labelled_dir, seeds)
    with step("render: the unlabelled pool with varied layouts (PTB-XL minus ptbxl-500 ids, + Georgia)"):
        exclude = read_id_list(data_root / LABELLED / "ptbxl_database.csv")
        pool_dirs = [work / "render" / "pool-ptbxl", work / "render" / "pool-g12ec"]
        pool_cfg = dataclasses.replace(render_cfg, format="jpg")  # scan noise makes PNGs of several MB
        render_printouts(data_root / POOL_NPZ, pool_dirs[0], pool_cfg, workers=workers, vary=True, seed=seed,
                         exclude_ids=exclude, limit=profile.pool_limit)
        render_printouts(data_root / POOL_WFDB, pool_dirs[1], pool_cfg, workers=workers, vary=True, seed=seed,
                         limit=profile.pool_limit)
    with step("shard: the pool, training-resolution copies, then verify"):
        build_shards([d / "images" for d in pool_dirs], shards, workers=workers, max_side=profile.max_side)
    with step(f"pretrain: SimCLR on the pool, {profile.pretrain_steps} steps (configs/pretrain/{profile.pretrain_config})"):
        pre_cfg = load_pretrain_config(CONFIGS / "pretrain" / profile.pretrain_config,
                                       [*profile.pretrain_overrides, f"data.shards={shards}", f"out={pre_dir}",
                                        f"steps={profile.pretrain_steps}", "epochs=null", f"seed={seed}"])
        pre = pretrain(pre_cfg)
    with step(f"finetune and evaluate: pretrained vs from scratch, 25% ({seeds} seeds), then 100% of the training labels"):
        base = load_finetune_config(CONFIGS / "finetune" / profile.finetune_config,
                                    [*profile.finetune_overrides, "split.mode=strat_fold", f"n_bootstrap={profile.n_bootstrap}"])
        arms = {"pretrained": (base, pre_dir), "scratch": (scratch_config(base, pre_cfg), None)}
        results: dict[str, Any] = {arm: {str(f): {"runs": []} for f in FRACTIONS} for arm in arms}
        for arm, fraction, run_seed in run_order(seeds):
            cfg, checkpoint = arms[arm]
            key = run_key(fraction, run_seed)
            out = work / "finetune" / f"{arm}-{key}"
            print(f"   {arm}, {key} → {out}", flush=True)
            run: dict[str, Any] = {"key": key, "finetune": finetune(dataclasses.replace(cfg, seed=run_seed), checkpoint,
                                                                   files[key], out, progress=False)}
            for test in TEST_SETS:
                run[test] = evaluate(out, files[test], work / "evaluate" / f"{arm}-{key}-{test}", "all",
                                     profile.n_bootstrap, progress=False)
            results[arm][str(fraction)]["runs"].append(run)
            print(f"     fold-10 macro-AUROC {metric_text(run['fold10']['macro_auroc'])}", flush=True)
            write_json(work / "partial-results.json", results)  # what a run cut short still has
    with step(f"signal baseline: a 1-D CNN on the 100 Hz signals of the same records and folds, {seeds} seeds"):
        results["signal_baseline"] = run_baseline(data_root / LABELLED, seeds, profile.n_bootstrap, profile.signal_epochs)
    full = {
        "profile": dataclasses.asdict(profile), "seeds": seeds, "selection": f"fold {SELECTION_FOLD} (validation)",
        "test": "fold10", "pretraining": {k: pre[k] for k in ("step", "checkpoint", "global_batch")},
        "pretraining_loss": [pre["losses"][0], pre["losses"][-1]] if pre["losses"] else None,
        "results": results, "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(work / "results.json", full)
    plot_results(results, "fold10", work / "ptbxl-benchmark.png")
    return full


def headline(results: dict[str, Any], seeds: int) -> dict[str, Any]:
    """`{"pretrained"|"scratch": {"100"|"25": {"fold10"|"folds9-10": {metric: mean over seeds}}},
    "signal_baseline": {"fold10"|"folds9-10": {...}}, "seeds": n}`."""
    def means(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return {test: {m: seed_stats(runs, test, m)[0] for m in METRICS} for test in TEST_SETS}

    out: dict[str, Any] = {arm: {str(f): means(results[arm][str(f)]["runs"]) for f in FRACTIONS} for arm in ARMS}
    return {**out, "signal_baseline": means(results["signal_baseline"]["runs"]), "seeds": seeds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                        help="smoke: minutes, checks the script; cpu: ~90 min on 2 cores; full: GPU (default cpu)")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder holding ptbxl-500/, ptbxl-1819-preprocessed/, g12ec-50/ (default ../shared/data)")
    parser.add_argument("--work", type=Path,
                        help="cache of images, shards, checkpoints (default runs/bench-ptbxl-PROFILE-seedSEED)")
    parser.add_argument("--workers", type=int, default=usable_cpus(),
                        help="processes for rendering and sharding")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds of the 25%% arms (subset and fine-tuning) and of the signal model; 100%% runs once")
    parser.add_argument("--json", type=Path, help="write the headline numbers (means over seeds) here")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    work = args.work or REPO / "runs" / f"bench-ptbxl-{args.profile}"
    try:
        full = run_benchmark(profile, args.data_root, work, args.workers, args.seeds)
    except (FileNotFoundError, ValueError) as e:
        print(f"benchmarks/ptbxl.py: error: {e}", file=sys.stderr)
        return 2
    print(f"\nPTB-XL superclasses, profile {args.profile}: selection on fold {SELECTION_FOLD}, test = fold 10 "
          f"(folds 9+10 include the selection fold: optimistic). Accuracy = exact match of all 5 labels.\n")
    print(results_table(full["results"]))
    print(f"\nfull results {work / 'results.json'}; plot {work / 'ptbxl-benchmark.png'}; {full['seconds'] / 60:.1f} min")
    if args.json:
        write_json(args.json, headline(full["results"], args.seeds))
        print(f"headline numbers → {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
