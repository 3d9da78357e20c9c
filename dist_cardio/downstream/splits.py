"""Train/val/test splits that cannot leak: identical images and one patient's images stay together.

Hospital sets repeat the same scan many times (re-exports, copies in several folders); a random split
would put copies in train and test and report memorised accuracy. Items are therefore grouped first
(same content hash, or same patient where known) and whole groups are assigned to splits, stratified by
label with scikit-learn's `StratifiedGroupKFold`. PTB-XL comes with its own `strat_fold` split, which is
used as given — except that a group spanning folds is moved whole, so the guarantee holds there too.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from dist_cardio.atomic import atomic_write_json

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """How a hospital's images are divided; the split is saved with the run (`split.json`)."""

    mode: Literal["auto", "grouped", "strat_fold"] = "auto"
    """`grouped`: stratified split of leak groups by fraction; `strat_fold`: the data's own fold column;
    `auto`: `strat_fold` when every image has a fold, else `grouped`."""
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    """May be 0 (no held-out test set, e.g. when an external set is evaluated later)."""
    seed: int = 0
    train_folds: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    val_folds: tuple[int, ...] = (9,)
    test_folds: tuple[int, ...] = (10,)

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1) (early stopping needs a validation set), got {self.val_fraction}")
        if not 0.0 <= self.test_fraction < 1.0 or self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"test_fraction must be in [0, 1) with val_fraction + test_fraction < 1, got {self.test_fraction}")
        folds = [set(self.train_folds), set(self.val_folds), set(self.test_folds)]
        if not folds[0] or not folds[1]:
            raise ValueError("train_folds and val_folds must not be empty")
        if folds[0] & folds[1] or folds[0] & folds[2] or folds[1] & folds[2]:
            raise ValueError(f"a fold may belong to one split only: train {self.train_folds}, val {self.val_folds}, test {self.test_folds}")


@dataclass(frozen=True)
class Split:
    """One split name per item, in item order, and how it was made."""

    assignment: tuple[str, ...]
    mode: str
    moved: int = 0
    """Items moved out of their `strat_fold` split to keep a duplicate/patient group together."""

    def indices(self, name: str) -> list[int]:
        return [i for i, s in enumerate(self.assignment) if s == name]

    def counts(self) -> dict[str, int]:
        c = Counter(self.assignment)
        return {s: c.get(s, 0) for s in SPLITS}


def leak_groups(hashes: Sequence[str], patients: Sequence[str | None]) -> np.ndarray:
    """Group id per item: items sharing a content hash or a (known) patient are connected, transitively."""
    if len(hashes) != len(patients):
        raise ValueError(f"{len(hashes)} hashes but {len(patients)} patient entries")
    parent = list(range(len(hashes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[tuple[str, str], int] = {}
    for i, (h, p) in enumerate(zip(hashes, patients)):
        for key in (("sha", h), ("patient", p)):
            if key[1] in (None, ""):
                continue
            j = first_seen.setdefault(key, i)
            parent[find(i)] = find(j)
    roots = [find(i) for i in range(len(hashes))]
    _, ids = np.unique(roots, return_inverse=True)
    return ids


def make_split(
    cfg: SplitConfig,
    hashes: Sequence[str],
    patients: Sequence[str | None],
    strata: Sequence[str],
    folds: Sequence[int | None],
) -> Split:
    """Assign every item to train/val/test; `strata` is the label (combination) to balance across splits."""
    n = len(hashes)
    if not (len(patients) == len(strata) == len(folds) == n):
        raise ValueError("hashes, patients, strata and folds must have one entry per item")
    groups = leak_groups(hashes, patients)
    mode = cfg.mode
    if mode == "auto":
        mode = "strat_fold" if n and all(f is not None for f in folds) else "grouped"
    if mode == "strat_fold":
        return _fold_split(cfg, groups, folds)
    return _grouped_split(cfg, groups, strata)


def _fold_split(cfg: SplitConfig, groups: np.ndarray, folds: Sequence[int | None]) -> Split:
    fold_to_split = {f: s for s, fs in zip(SPLITS, (cfg.train_folds, cfg.val_folds, cfg.test_folds)) for f in fs}
    missing = sorted({f for f in folds if f not in fold_to_split}, key=str)
    if missing:
        raise ValueError(
            f"strat_fold values {missing} are in none of train_folds/val_folds/test_folds "
            "(set split.train_folds etc., or split.mode=grouped)"
        )
    by_fold = [fold_to_split[f] for f in folds]
    assignment = list(by_fold)
    # A group spanning splits goes whole to its majority split; ties go to the held-out side (test, val)
    # so the official evaluation folds keep their images.
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        votes = Counter(by_fold[i] for i in members)
        if len(votes) > 1:
            target = max(reversed(SPLITS), key=lambda s: votes.get(s, 0))
            for i in members:
                assignment[i] = target
    moved = sum(a != b for a, b in zip(assignment, by_fold))
    return Split(tuple(assignment), "strat_fold", moved)


def _grouped_split(cfg: SplitConfig, groups: np.ndarray, strata: Sequence[str]) -> Split:
    n_groups = len(np.unique(groups))
    assignment = np.array(["train"] * len(groups), dtype=object)
    remaining = np.arange(len(groups))
    # Carve test from everything, then val from the rest; each fraction f becomes one of round(1/f) folds.
    for name, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction / (1.0 - cfg.test_fraction))):
        if fraction == 0.0:
            continue
        k = max(2, round(1.0 / fraction))
        left = len(np.unique(groups[remaining]))
        if left < k:
            raise ValueError(
                f"only {n_groups} distinct images/patients: too few for a {name} split of {fraction:.0%} "
                f"(need at least {k} groups left, have {left}); add data or lower split.{name}_fraction"
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=cfg.seed)
            _, held = next(splitter.split(remaining, np.asarray(strata, dtype=object)[remaining], groups[remaining]))
        assignment[remaining[held]] = name
        remaining = np.delete(remaining, held)
    return Split(tuple(str(a) for a in assignment), "grouped")


def save_split(path: str | Path, split: Split, ids: Sequence[str], hashes: Sequence[str], cfg: SplitConfig) -> None:
    """Write the split with the run: item id (path or shard key) and content hash only — no patient ids."""
    doc = {
        "version": 1,
        "mode": split.mode,
        "moved_to_keep_groups_together": split.moved,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "counts": split.counts(),
        "items": [{"id": i, "sha256": h, "split": s} for i, h, s in zip(ids, hashes, split.assignment)],
    }
    atomic_write_json(Path(path), doc, newline=False, indent=1)


__all__ = ["SPLITS", "SplitConfig", "Split", "leak_groups", "make_split", "save_split"]
