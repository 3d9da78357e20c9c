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
import random
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_cardio import distributed
from dist_cardio.atomic import output_lock
from dist_cardio.config import dump_yaml, load_config, to_dict
from dist_cardio.data import AugmentConfig, LoaderConfig, contrastive_loader
from dist_cardio.host_memory import keep_freed_memory
from dist_cardio.model import ModelConfig, SimCardioNet
from dist_cardio.train.checkpoint import CheckpointConfig, CheckpointManager
from dist_cardio.train.engines import Engine, EngineConfig, build_engine, zero_lars_refusal
from dist_cardio.train.gradcache import cached_contrastive_step
from dist_cardio.train.lars import LarsConfig, build_lars
from dist_cardio.train.losses import LossConfig, embedding_spread, make_loss
from dist_cardio.train.monitor import KnnMonitor, MonitorConfig
from dist_cardio.train.runlog import COLLAPSED_SPREAD, RunLog, collapse_warning, plot_loss_curve
from dist_cardio.train.schedule import ScheduleConfig, scaled_lr, warmup_cosine, warmup_steps
from dist_cardio.train.state import TrainState


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
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """Online k-NN score on a small labelled shard set (off unless ``monitor.shards`` is set)."""
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
        if self.model.input_shape != self.augment.shape:
            raise ValueError(f"model input {self.model.input_shape} (input_height, input_size) must equal the views' "
                             f"{self.augment.shape} (augment.height, augment.size)")
        if self.engine.backend == "deepspeed" and self.engine.zero_stage > 0:
            raise ValueError(zero_lars_refusal(self.engine.zero_stage))
        if self.monitor.enabled and self.monitor.every % self.log_every:
            raise ValueError(f"monitor.every ({self.monitor.every}) must be a multiple of log_every ({self.log_every}): "
                             "the k-NN score goes on a progress line")


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


def _engine_tag(cfg: PretrainConfig, precision: str) -> str:
    return f"{cfg.engine.backend}/zero{cfg.engine.zero_stage}/{precision}"


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
    keep_freed_memory(info.device.type)
    try:
        with output_lock(Path(cfg.out), "pretrain") if info.is_main else nullcontext():
            return _train(cfg, info)
    finally:
        if owns_group:
            distributed.cleanup()


def _train(cfg: PretrainConfig, info: distributed.DistInfo) -> dict[str, Any]:
    out = Path(cfg.out)
    _seed(cfg.seed)  # identical initial weights on every rank
    model = SimCardioNet(cfg.model)
    engine = build_engine(cfg.engine, model, build_lars(model, cfg.optim), info, cfg.data.batch_size)
    loader = contrastive_loader(cfg.data, cfg.augment, info.rank, info.world_size)
    plan = make_plan(cfg, info.world_size, len(loader))
    manager = CheckpointManager(out / "checkpoints", cfg.checkpoint.keep)
    state = TrainState(engine, loader, plan.lrs, info.rank, info.world_size, _engine_tag(cfg, engine.precision), to_dict(cfg))
    if not manager.restore(state):
        _seed(cfg.seed + info.rank)
    start = state.step

    log = RunLog(out, info.is_main, start, plan.total_steps)
    if info.is_main:
        (out / "config.yaml").write_text(dump_yaml(cfg))
    log.text(("resuming at step %d: " % start if start else "") + plan.describe(cfg, engine.precision))
    monitor = KnnMonitor(cfg.monitor, cfg.augment, cfg.data) if cfg.monitor.enabled and info.is_main else None
    score = _scorer(monitor, model)
    knn_start = score() if score is not None else None
    if knn_start is not None:
        log.text(f"k-NN monitor: {len(monitor)} labelled images of {cfg.monitor.shards}, every {cfg.monitor.every} steps; "
                 f"AUROC {knn_start['knn_auroc']:.3f} at step {start} (chance 0.5)")
    try:
        interrupted, last_saved, last_loss = _loop(cfg, plan, state, manager, log, score)
    finally:
        log.close()

    summary = {
        "step": state.step, "total_steps": plan.total_steps, "resumed_from": start or None,
        "final_loss": last_loss,
        "checkpoint": str(manager.latest) if last_saved else None, "interrupted": interrupted, "out": str(out),
        "global_batch": plan.global_batch, "per_rank_batch": plan.per_rank_batch, "peak_lr": plan.peak_lr,
        "rank": info.rank, "knn_start": knn_start,
    }
    if info.is_main:
        if log.metrics.exists():
            plot_loss_curve(log.metrics, out / "loss.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class _Window:
    """Per-step values between two progress lines, averaged into one ``metrics.jsonl`` row."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.spreads: list[float] = []
        self.data_s = self.step_s = 0.0
        self.t0 = time.perf_counter()

    def row(self, step: int, epoch: int, lr: float, global_batch: int) -> dict[str, float | int]:
        n = len(self.losses)
        return {
            "step": step, "epoch": epoch, "loss": sum(self.losses) / n, "spread": sum(self.spreads) / n,
            "lr": lr, "images_per_s": n * global_batch / (time.perf_counter() - self.t0),
            "data_s": self.data_s / n, "step_s": self.step_s / n,
        }


def _scorer(monitor: KnnMonitor | None, model: SimCardioNet):
    """``() -> {"knn_auroc", ...}`` on rank 0 when a monitor is configured, else None."""
    if monitor is None:
        return None
    return lambda: monitor.score(model, next(model.parameters()).device)


def _loop(cfg: PretrainConfig, plan: Plan, state: TrainState, manager: CheckpointManager,
          log: RunLog, score: Any = None) -> tuple[bool, int, float | None]:
    """Steps until the plan's last (or SIGTERM); returns (interrupted, last saved step, last mean loss)."""
    engine, step_of = state.engine, _step_fn(cfg, state.engine)
    warned, interrupted, last_saved, last_loss = False, False, state.step, None
    window, batches = _Window(), _batches(state.loader)
    with StopSignal() as stop:
        while state.step < plan.total_steps:
            t0 = time.perf_counter()
            epoch, (view1, view2) = next(batches)
            window.data_s += time.perf_counter() - t0
            engine.set_lr(plan.lrs[state.step])
            loss, spread = step_of(view1, view2)
            engine.step()
            state.step += 1
            # One small all-reduce per step: the logged loss (mean over ranks) and whether any rank got SIGTERM.
            flag = torch.tensor(float(stop.requested), device=loss.device)
            synced = distributed.all_reduce_mean(torch.stack([loss.float(), spread.to(loss.device), flag]))
            last_loss = float(synced[0])
            window.losses.append(last_loss)
            window.spreads.append(float(synced[1]))
            interrupted = bool(synced[2] > 0) and state.step < plan.total_steps  # a finished run is not interrupted
            window.step_s += time.perf_counter() - t0
            step, last = state.step, state.step == plan.total_steps
            if step % cfg.log_every == 0 or last or interrupted:
                row = window.row(step, epoch, float(plan.lrs[step - 1]), plan.global_batch)
                if score is not None and (step % cfg.monitor.every == 0 or last):
                    row.update(score())
                log.row(row)
                if not warned and step > plan.warmup_steps and row["spread"] < COLLAPSED_SPREAD:
                    warned = True
                    log.text(collapse_warning(row["spread"], row["loss"], plan.global_batch, cfg.loss.kind))
                window = _Window()
            if step % cfg.checkpoint.every == 0 or last or interrupted:
                manager.save_state(state)
                last_saved = step
            if interrupted:
                log.text(f"SIGTERM: stopped after step {step}, checkpoint {manager.latest}")
                break
    return interrupted, last_saved, last_loss


def _step_fn(cfg: PretrainConfig, engine: Engine):
    """``(view1, view2) -> (loss, spread)``: one gradient-cached contrastive step's forward and backward."""
    contrastive = make_loss(cfg.loss)
    chunk = cfg.grad_cache_chunk or 2 * cfg.data.batch_size
    spread = [torch.zeros(())]

    def loss_fn(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        spread[0] = embedding_spread(torch.cat([z1, z2]))  # called once per step, on all local embeddings
        return contrastive(z1, z2)

    def step(view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = cached_contrastive_step(engine.model, engine.prepare(view1), engine.prepare(view2), chunk,
                                       loss_fn, engine.backward, engine.no_sync)
        return loss, spread[0]

    return step


__all__ = ["PretrainConfig", "load_pretrain_config", "run", "make_plan", "Plan"]
