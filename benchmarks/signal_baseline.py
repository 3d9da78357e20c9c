"""The information ceiling of the PTB-XL benchmark: a plain 1-D CNN on the 100 Hz signals themselves.

    python benchmarks/signal_baseline.py [--data-root ../shared/data] [--seeds 3] [--json PATH]

Same records (`ptbxl-500`), same labels (the five superclasses, multi-label) and the same official folds
as `benchmarks/ptbxl.py` (1-8 train, 9 selects the epoch, 10 test; folds 9+10 reported too), the same
metrics with the same bootstrap. If the image models fall far below this row, the pages lose the
information the signals carry (geometry, recipe); if they approach it, the printouts are read.

Model: five conv layers (12 → 32 → 64 → 128 → 128 → 128 channels, kernel 7, stride 2, BatchNorm, ReLU),
global average pooling, a linear head; AdamW with a one-cycle LR, random time shifts. A few minutes on
one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dist_cardio.downstream.metrics import evaluate_predictions, metric_text, point_metrics
from dist_cardio.signals.records import SUPERCLASSES, list_records, load_record

REPO = Path(__file__).resolve().parents[1]
TEST_SETS = {"fold10": (10,), "folds9-10": (9, 10)}
TRAIN_FOLDS = tuple(range(1, 9))
SELECTION_FOLD = 9
METRICS = ("accuracy", "macro_f1", "macro_auroc")
SAMPLES = 1000
"""10 s at 100 Hz: every PTB-XL record."""


def load_signals(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signals [N, 12, 1000] float32 per-lead standardised, multi-hot labels [N, 5], strat_fold [N]) of the
    labelled records; records without a superclass are left out, as the image benchmark leaves them out."""
    xs, ys, folds = [], [], []
    for ref in list_records(root, rate=100):
        if not ref.labels or not ref.meta.get("strat_fold"):
            continue
        signal = load_record(ref).signal_mv[:SAMPLES].T
        signal = np.pad(signal, ((0, 0), (0, SAMPLES - signal.shape[1])))
        xs.append((signal - signal.mean(axis=1, keepdims=True)) / (signal.std(axis=1, keepdims=True) + 1e-3))
        ys.append([c in ref.labels for c in SUPERCLASSES])
        folds.append(int(ref.meta["strat_fold"]))
    return np.stack(xs).astype(np.float32), np.array(ys, np.float32), np.array(folds)


def signal_cnn(n_classes: int = len(SUPERCLASSES)) -> nn.Sequential:
    """Five stride-2 conv blocks, global average pooling, linear head (~0.3 M parameters)."""
    layers: list[nn.Module] = []
    widths = (12, 32, 64, 128, 128, 128)
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [nn.Conv1d(c_in, c_out, 7, stride=2, padding=3, bias=False), nn.BatchNorm1d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(widths[-1], n_classes))


def _probs(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(x))).numpy()


def train_one(x: np.ndarray, y: np.ndarray, folds: np.ndarray, seed: int, epochs: int = 40,
              batch: int = 32, lr: float = 3e-3) -> nn.Module:
    """Train on folds 1-8; returns the model of the epoch with the best fold-9 macro-AUROC."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train, val = np.isin(folds, TRAIN_FOLDS), folds == SELECTION_FOLD
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    model = signal_cnn()
    steps = epochs * int(np.ceil(len(xt) / batch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    loss_fn = nn.BCEWithLogitsLoss()
    best, best_state = -np.inf, None
    for _ in range(epochs):
        model.train()
        for idx in np.array_split(rng.permutation(len(xt)), int(np.ceil(len(xt) / batch))):
            shift = int(rng.integers(-100, 101))  # up to 1 s: the beat, not its position, carries the label
            loss = loss_fn(model(torch.roll(xt[idx], shift, dims=2)), yt[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        score = point_metrics(y[val].astype(np.int64), _probs(model, x[val]), True)["macro_auroc"]
        if score > best:
            best, best_state = score, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model


def run_baseline(root: Path, seeds: int, n_bootstrap: int = 1000, epochs: int = 40) -> dict[str, Any]:
    """Per seed and test set, metrics with 95% bootstrap CIs (as `evaluate_predictions` writes them)."""
    torch.set_num_threads(1)
    x, y, folds = load_signals(root)
    runs = []
    for seed in range(seeds):
        model = train_one(x, y, folds, seed, epochs)
        runs.append({test: evaluate_predictions(y[np.isin(folds, f)].astype(np.int64), _probs(model, x[np.isin(folds, f)]),
                                                SUPERCLASSES, True, n_bootstrap=n_bootstrap, seed=seed, progress=False)
                     for test, f in TEST_SETS.items()})
    return {"runs": runs, "n_train": int(np.isin(folds, TRAIN_FOLDS).sum()),
            "n": {test: int(np.isin(folds, f).sum()) for test, f in TEST_SETS.items()}}


def seed_stats(runs: list[dict[str, Any]], test: str, metric: str) -> tuple[float | None, float | None]:
    """Mean and sample sd over seeds (sd None for one seed); None where the metric was undefined."""
    values = [r[test][metric]["value"] for r in runs if r[test][metric]["value"] is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder holding ptbxl-500/ (default ../shared/data)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (default 3)")
    parser.add_argument("--json", type=Path, help="write the per-seed metrics here")
    args = parser.parse_args(argv)
    root = args.data_root / "ptbxl-500"
    if not root.is_dir():
        print(f"benchmarks/signal_baseline.py: error: {root}: missing (pass --data-root)", file=sys.stderr)
        return 2
    tic = time.perf_counter()
    result = run_baseline(root, args.seeds)
    for test in TEST_SETS:
        print(f"{test:<10} " + "  ".join(f"{m} {metric_text(result['runs'][0][test][m])}" for m in METRICS))
        stats = {m: seed_stats(result["runs"], test, m) for m in METRICS}
        print(f"{'':<10} " + "  ".join(f"{m} {mean:.3f} ± {sd or 0:.3f}" if mean is not None else f"{m} n/a" for m, (mean, sd) in stats.items()))
    print(f"{args.seeds} seed(s), {time.perf_counter() - tic:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
