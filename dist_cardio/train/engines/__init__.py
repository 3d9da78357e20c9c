"""One training loop, two backends: the small interface the trainer drives, and how to pick a backend.

The trainer only ever calls what :class:`Engine` lists (forward through ``engine.model``, ``backward``,
``no_sync``, ``step``, ``set_lr``, ``state_dict``/``load_state_dict``), so DeepSpeed and Accelerate stay
inside their adapter modules (``deepspeed_engine.py``, ``accelerate_engine.py``), imported only when
chosen. Both average gradients over ranks once per optimizer step and never clip them, so the same
seed gives the same loss sequence on either backend (``tests/test_engines.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from dist_cardio.distributed import DistInfo
from dist_cardio.model import memory_format
from dist_cardio.train.schedule import apply_lr


@dataclass(frozen=True)
class EngineConfig:
    """Which backend runs the step, its ZeRO stage and its precision."""

    backend: Literal["deepspeed", "accelerate"] = "deepspeed"
    """DeepSpeed used directly (``deepspeed.initialize``) or Accelerate (DDP underneath)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage. 1 and 2 are refused with LARS (see :func:`zero_lars_refusal`)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 on GPU, fp32 on CPU."""
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    """Layout of the inputs (and of the weights where the backend allows it): ``auto`` is channels-last on
    CUDA (faster convolutions), contiguous elsewhere; ``channels_last`` on a CPU runs the GPU's layout there."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2 (ZeRO-3/offload are not supported), got {self.zero_stage}")
        if self.backend == "accelerate" and self.zero_stage != 0:
            raise ValueError("zero_stage applies to the deepspeed backend only; set engine.backend=deepspeed or zero_stage=0")

    def resolved_precision(self, device: torch.device) -> str:
        """``fp32`` or ``bf16`` for ``device`` (``auto`` picks bf16 on CUDA only)."""
        if self.precision == "auto":
            return "bf16" if device.type == "cuda" else "fp32"
        return self.precision

    def resolved_memory_format(self, device: torch.device) -> torch.memory_format:
        """The inputs' layout on ``device`` (``auto``: :func:`dist_cardio.model.memory_format`)."""
        if self.memory_format == "auto":
            return memory_format(device)
        return torch.channels_last if self.memory_format == "channels_last" else torch.contiguous_format


def zero_lars_refusal(stage: int) -> str:
    """Why DeepSpeed ZeRO-1/2 and LARS are not combined (the one message for config and engine)."""
    return (
        f"DeepSpeed ZeRO stage {stage} with LARS is refused: ZeRO-{stage} hands the optimizer one flattened "
        "slice per param group and rank instead of whole layers, so LARS's per-layer trust ratio would "
        "silently become a per-slice ratio (wrong updates). Use engine.zero_stage=0 (the model fits one "
        "device) or engine.backend=accelerate."
    )


class Engine(ABC):
    """What the trainer needs from a backend; one instance wraps one model and its optimizer.

    The backends differ in how they run the step; the LR, the weights and the optimizer state are
    handled the same way on both, here, so a checkpoint written by one loads into the other.
    """

    name: str
    model: nn.Module
    """Callable for the forward pass (the backend's wrapper: DeepSpeed engine or DDP)."""
    module: nn.Module
    """The bare model, for weights and evaluation."""
    optimizer: torch.optim.Optimizer
    """The client optimizer (LARS), as the backend wrapped it."""
    device: torch.device
    precision: str
    memory_format: torch.memory_format
    """Layout :meth:`prepare` gives the inputs (convolutions follow a channels-last input)."""

    @abstractmethod
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Move a batch to the engine's device, dtype and memory format."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate ``d loss / d params`` locally; ranks synchronise in :meth:`step`."""

    @abstractmethod
    def no_sync(self) -> AbstractContextManager[None]:
        """Context for all but the last backward of a step (no gradient all-reduce inside)."""

    @abstractmethod
    def step(self) -> None:
        """Average gradients over ranks, apply the optimizer, clear the gradients."""

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every param group (the schedule is precomputed per step)."""
        apply_lr(self.optimizer, lr)

    def state_dict(self) -> dict[str, Any]:
        """``{"model": fp32 weights, "optimizer": ...}``: tensors and plain values only."""
        return {"model": fp32_weights(self.module), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def build_engine(
    cfg: EngineConfig, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo, micro_batch: int
) -> Engine:
    """The chosen backend around ``model`` and ``optimizer`` (``micro_batch``: images per rank and step)."""
    if cfg.backend == "deepspeed":
        from dist_cardio.train.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, optimizer, info, micro_batch)
    from dist_cardio.train.engines.accelerate_engine import AccelerateEngine

    return AccelerateEngine(cfg, model, optimizer, info)


def fp32_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with floating tensors in fp32 on the CPU (bf16 runs save fp32 weights)."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in module.state_dict().items()}


__all__ = ["EngineConfig", "Engine", "build_engine", "zero_lars_refusal", "fp32_weights"]
