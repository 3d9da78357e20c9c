"""Contrastive (SimCLR) pretraining of SimCardioNet: config, the training loop, resume, SIGTERM.

``run(cfg)`` joins the process group of whatever launched it (torchrun, SLURM/submitit, or nothing) via
``distributed.py``, resumes from ``<out>/checkpoints/latest`` when it exists, and trains with the chosen
engine: LARS, the LR precomputed per step from the global batch, gradient caching when a rank's batch
does not fit one forward. On SIGTERM (SLURM preemption or time limit) every rank finishes its step, rank
0 saves ``latest`` and ``run`` returns ``{"interrupted": True, ...}``, so a requeued job carries on.

Outputs in ``<out>``: ``config.yaml``, ``metrics.jsonl`` (one row per ``log_every`` steps), TensorBoard
events in ``tensorboard/``, ``checkpoints/`` and, at the end, ``loss.png`` and ``summary.json``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_cardio import distributed
from dist_cardio.train.checkpoint import CheckpointConfig, CheckpointError, CheckpointManager, rng_state, set_rng_state
from dist_cardio.config import dump_yaml, load_config, to_dict
from dist_cardio.data import AugmentConfig, LoaderConfig, contrastive_loader
from dist_cardio.train.engines import Engine, EngineConfig, build_engine, zero_lars_refusal
from dist_cardio.train.gradcache import cached_contrastive_step
from dist_cardio.train.lars import LarsConfig, build_lars
from dist_cardio.train.losses import LossConfig, embedding_spread, make_loss
from dist_cardio.model import ModelConfig, SimCardioNet
from dist_cardio.train.schedule import ScheduleConfig, scaled_lr, warmup_cosine, warmup_steps


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run depends on (``configs/pretrain/*.yaml``)."""

    data: LoaderConfig
    """Shards and batching (``batch_size`` is per rank: global batch = batch_size × ranks)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: LarsConfig = field(default_factory=LarsConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    steps: int | None = None
    """Optimizer steps of the whole run; exactly one of ``steps`` and ``epochs`` is set."""
    epochs: int | None = None
    grad_cache_chunk: int | None = None
    """Images per forward pass when gradient caching (None: the rank's 2×batch views in one pass)."""
    log_every: int = 10
    """One progress line, metrics row and TensorBoard point per N steps."""
    out: str = "runs/pretrain"
    """Output folder (checkpoints, logs); a run whose ``out`` holds a checkpoint resumes from it."""
    seed: int = 0
    """Seeds the model's initialisation (same on every rank) and each rank's RNG (seed + rank)."""

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of steps and epochs")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs < 1):
            raise ValueError(f"steps/epochs must be ≥ 1, got steps={self.steps} epochs={self.epochs}")
        if self.grad_cache_chunk is not None and self.grad_cache_chunk < 1:
            raise ValueError(f"grad_cache_chunk must be ≥ 1 image (or null), got {self.grad_cache_chunk}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be ≥ 1, got {self.log_every}")
        if self.model.input_size != self.augment.size:
            raise ValueError(f"model.input_size ({self.model.input_size}) must equal augment.size ({self.augment.size})")
        if self.engine.backend == "deepspeed" and self.engine.zero_stage > 0:
            raise ValueError(zero_lars_refusal(self.engine.zero_stage))


def load_pretrain_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """``PretrainConfig`` from YAML plus ``key.sub=value`` overrides (strict: see ``config.py``)."""
    return load_config(PretrainConfig, path, overrides)


# --- derived values -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Values derived once from the config and the world size, logged at start and checked on resume."""

    world_size: int
    per_rank_batch: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    lrs: np.ndarray

    def describe(self, cfg: PretrainConfig, precision: str) -> str:
        chunk = cfg.grad_cache_chunk or 2 * self.per_rank_batch
        return (
            f"global batch {self.global_batch} ({self.per_rank_batch} per rank × {self.world_size} ranks); "
            f"peak LR {self.peak_lr:.4g} ({cfg.schedule.scaling} scaling of base {cfg.schedule.base_lr:g}), "
            f"warmup {self.warmup_steps} steps, cosine to {self.lrs[-1]:.3g}; {self.total_steps} steps "
            f"({self.total_steps / self.steps_per_epoch:.2f} epochs of {self.steps_per_epoch}); "
            f"{chunk} images per forward; engine {cfg.engine.backend} ZeRO {cfg.engine.zero_stage} {precision}"
        )


def make_plan(cfg: PretrainConfig, world_size: int, steps_per_epoch: int) -> Plan:
    """Global batch, step counts and the per-step LR array (scaled by the global batch)."""
    global_batch = cfg.data.batch_size * world_size
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    warmup = warmup_steps(cfg.schedule, steps_per_epoch, total)
    peak = scaled_lr(cfg.schedule.base_lr, global_batch, cfg.schedule.scaling)
    lrs = warmup_cosine(peak, total, warmup, peak * cfg.schedule.final_lr_ratio)
    return Plan(world_size, cfg.data.batch_size, global_batch, steps_per_epoch, total, warmup, peak, lrs)


# --- SIGTERM --------------------------------------------------------------------------------------------


class StopSignal:
    """Turns SIGTERM into a flag read at the end of each step (installed for the run, then restored)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> StopSignal:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGTERM, self._previous)


# --- logging --------------------------------------------------------------------------------------------


class RunLog:
    """Rank 0's outputs: progress line, ``metrics.jsonl``, TensorBoard. Other ranks log nothing."""

    def __init__(self, out: Path, enabled: bool, start_step: int, total_steps: int) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.metrics = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides the events logged after the checkpoint it resumes from.
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def _truncate(self, step: int) -> None:
        """Keep only rows up to ``step`` (a run killed after its last checkpoint logged steps it will redo)."""
        if not self.metrics.exists():
            return
        rows = [line for line in self.metrics.read_text().splitlines() if _row_step(line) <= step]
        tmp = self.metrics.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        os.replace(tmp, self.metrics)

    def text(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def row(self, row: dict[str, float | int]) -> None:
        if not self.enabled:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key in ("loss", "spread", "lr", "images_per_s", "data_s", "step_s"):
            self.tb.add_scalar(f"pretrain/{key}", row[key], row["step"])
        eta = (self.total - row["step"]) * row["step_s"]
        self.text(
            f"step {row['step']}/{self.total} | loss {row['loss']:.4f} | spread {row['spread']:.3f} | lr {row['lr']:.4g} | "
            f"{row['images_per_s']:.1f} img/s | data {1000 * row['data_s']:.0f} ms | "
            f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


COLLAPSED_SPREAD = 0.05
"""Below this :func:`~dist_cardio.train.losses.embedding_spread` after warmup, the run has collapsed."""


def collapse_warning(spread: float, loss: float, global_batch: int) -> str:
    """What a collapsed run means and what to change (printed once, after warmup)."""
    return (
        f"warning: the embeddings have collapsed (spread {spread:.3f} < {COLLAPSED_SPREAD}; loss {loss:.4f}, chance "
        f"ln(2·{global_batch} − 1) = {np.log(2 * global_batch - 1):.4f}): every image maps to about the same point, "
        "so the network is no longer learning. The views are too different for this model and input size "
        "(raise augment.crop_scale's lower bound, soften colour jitter, or use a larger model.input_size) "
        "or the LR is too high (lower schedule.base_lr)."
    )


def _row_step(line: str) -> float:
    """A metrics row's step; a torn last line (killed mid-write) counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def plot_loss_curve(metrics: Path, png: Path) -> None:
    """``loss.png`` from ``metrics.jsonl`` (the whole run, resumed parts included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, (ax, ax_spread) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(3, 1.4))
    ax.plot(steps, [r["loss"] for r in rows], lw=1.2)
    ax.set(ylabel="contrastive loss", title="SimCardioNet pretraining")
    ax.grid(alpha=0.3)
    ax_spread.plot(steps, [r.get("spread", float("nan")) for r in rows], lw=1.2, color="tab:green")
    ax_spread.axhline(COLLAPSED_SPREAD, color="tab:red", lw=0.8, ls="--", label="collapsed below")
    ax_spread.set(xlabel="step", ylabel="embedding spread", ylim=(0, None))
    ax_spread.legend(fontsize=8, loc="upper right")
    ax_spread.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# --- checkpoint state -----------------------------------------------------------------------------------


def _engine_tag(cfg: PretrainConfig, precision: str) -> str:
    return f"{cfg.engine.backend}/zero{cfg.engine.zero_stage}/{precision}"


def _check_compatible(state: dict[str, Any], cfg: PretrainConfig, plan: Plan, tag: str, path: Path) -> None:
    """Refuse to resume into a run that would silently differ from the one that wrote the checkpoint."""
    fix = f"resume with the config it was written with (saved in its 'config'), or use a new --out than {cfg.out}"
    if state["world_size"] != plan.world_size:
        raise CheckpointError(f"{path}: written by {state['world_size']} ranks, this run has {plan.world_size} "
                              f"(data positions and RNG are per rank); {fix}")
    if state["engine"] != tag:
        raise CheckpointError(f"{path}: written by engine {state['engine']}, this run uses {tag}; {fix}")
    saved = state["config"]
    for section in ("model", "loss", "optim"):
        if saved[section] != to_dict(getattr(cfg, section)):
            raise CheckpointError(f"{path}: '{section}' differs from the checkpoint's; {fix}")
    lrs = state["schedule"]["lr"]
    if lrs.shape[0] != plan.total_steps or not np.allclose(lrs.numpy(), plan.lrs):
        raise CheckpointError(f"{path}: the LR schedule differs (global batch, steps or schedule changed); {fix}")
    if state["step"] > plan.total_steps:
        raise CheckpointError(f"{path}: at step {state['step']}, beyond this run's {plan.total_steps} steps; {fix}")


def _save(manager: CheckpointManager, engine: Engine, loader: Any, cfg: PretrainConfig, plan: Plan, tag: str, step: int) -> Path:
    """Gather per-rank state (RNG, data position), rank 0 writes; every rank waits until ``latest`` is on disk."""
    rngs, data = distributed.all_gather_object(rng_state()), distributed.all_gather_object(loader.state_dict())
    path = manager.latest
    if distributed.is_main():
        path = manager.save(
            {
                **engine.state_dict(),
                "schedule": {"lr": torch.from_numpy(plan.lrs)},
                "rng": rngs, "data": data, "world_size": plan.world_size, "engine": tag, "config": to_dict(cfg),
            },
            step,
        )
    distributed.barrier()
    return path


# --- the run --------------------------------------------------------------------------------------------


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _batches(loader: Any) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    """(epoch, batch) forever: the loader continues its current (possibly resumed) epoch, then the next."""
    while True:
        for batch in loader:
            yield loader.epoch, batch


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Train (or resume) as ``cfg`` says; returns a summary (steps, final loss, checkpoint, interrupted)."""
    owns_group = not distributed.is_initialized()
    info = distributed.init_distributed(require_group=cfg.engine.backend == "deepspeed")
    try:
        return _train(cfg, info)
    finally:
        if owns_group:
            distributed.cleanup()


def _train(cfg: PretrainConfig, info: distributed.DistInfo) -> dict[str, Any]:
    out = Path(cfg.out)
    _seed(cfg.seed)  # identical initial weights on every rank
    model = SimCardioNet(cfg.model)
    engine = build_engine(cfg.engine, model, build_lars(model, cfg.optim), info, cfg.data.batch_size)
    tag = _engine_tag(cfg, engine.precision)
    loader = contrastive_loader(cfg.data, cfg.augment, info.rank, info.world_size)
    plan = make_plan(cfg, info.world_size, len(loader))
    manager = CheckpointManager(out / "checkpoints", cfg.checkpoint.keep)

    state = manager.load_latest()
    start = 0
    if state is None:
        _seed(cfg.seed + info.rank)
    else:
        _check_compatible(state, cfg, plan, tag, manager.latest)
        start = state["step"]
        engine.load_state_dict(state)
        try:
            loader.load_state_dict(state["data"][info.rank])  # epoch, batch position, DALI's reader state
        except ValueError as e:
            raise CheckpointError(f"{manager.latest}: its data position does not fit this loader ({e})") from None
        set_rng_state(state["rng"][info.rank])
        del state

    log = RunLog(out, info.is_main, start, plan.total_steps)
    if info.is_main:
        (out / "config.yaml").write_text(dump_yaml(cfg))
    log.text(("resuming at step %d: " % start if start else "") + plan.describe(cfg, engine.precision))
    contrastive = make_loss(cfg.loss)
    spread = [torch.zeros(())]

    def loss_fn(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        spread[0] = embedding_spread(torch.cat([z1, z2]))  # called once per step, on all local embeddings
        return contrastive(z1, z2)

    warned = False
    chunk = cfg.grad_cache_chunk or 2 * cfg.data.batch_size
    step, interrupted, last_saved, last_loss = start, False, start, None
    window: list[float] = []
    spreads: list[float] = []
    data_s = step_s = 0.0
    t_window = time.perf_counter()
    batches = _batches(loader)
    try:
        with StopSignal() as stop:
            while step < plan.total_steps:
                t0 = time.perf_counter()
                epoch, (view1, view2) = next(batches)
                data_s += time.perf_counter() - t0
                engine.set_lr(plan.lrs[step])
                loss = cached_contrastive_step(engine.model, engine.prepare(view1), engine.prepare(view2), chunk,
                                               loss_fn, engine.backward, engine.no_sync)
                engine.step()
                step += 1
                # One small all-reduce per step: the logged loss (mean over ranks) and whether any rank got SIGTERM.
                flag = torch.tensor(float(stop.requested), device=loss.device)
                synced = distributed.all_reduce_mean(torch.stack([loss.float(), spread[0].to(loss.device), flag]))
                last_loss = float(synced[0])
                window.append(last_loss)
                spreads.append(float(synced[1]))
                interrupted = bool(synced[2] > 0) and step < plan.total_steps  # a finished run is not interrupted
                step_s += time.perf_counter() - t0
                if step % cfg.log_every == 0 or step == plan.total_steps or interrupted:
                    elapsed = time.perf_counter() - t_window
                    n = len(window)
                    row = {
                        "step": step, "epoch": epoch, "loss": sum(window) / n, "spread": sum(spreads) / n,
                        "lr": float(plan.lrs[step - 1]), "images_per_s": n * plan.global_batch / elapsed,
                        "data_s": data_s / n, "step_s": step_s / n,
                    }
                    log.row(row)
                    if not warned and step > plan.warmup_steps and row["spread"] < COLLAPSED_SPREAD:
                        warned = True
                        log.text(collapse_warning(row["spread"], row["loss"], plan.global_batch))
                    window, spreads, data_s, step_s, t_window = [], [], 0.0, 0.0, time.perf_counter()
                if step % cfg.checkpoint.every == 0 or step == plan.total_steps or interrupted:
                    _save(manager, engine, loader, cfg, plan, tag, step)
                    last_saved = step
                if interrupted:
                    log.text(f"SIGTERM: stopped after step {step}, checkpoint {manager.latest}")
                    break
    finally:
        log.close()

    summary = {
        "step": step, "total_steps": plan.total_steps, "resumed_from": start or None,
        "final_loss": last_loss,
        "checkpoint": str(manager.latest) if last_saved else None, "interrupted": interrupted, "out": str(out),
        "global_batch": plan.global_batch, "per_rank_batch": plan.per_rank_batch, "peak_lr": plan.peak_lr,
        "rank": info.rank,
    }
    if info.is_main:
        if log.metrics.exists():
            plot_loss_curve(log.metrics, out / "loss.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = ["PretrainConfig", "load_pretrain_config", "run", "make_plan", "Plan", "plot_loss_curve"]
