"""Accelerate backend: DDP underneath, the same step semantics as the DeepSpeed engine.

The process group already exists (``distributed.py`` created it), so ``Accelerator`` joins it instead
of creating its own. ``cpu=True`` on a GPU-less host: under torchrun that gives real multi-process
gloo training (``accelerate launch --cpu`` would start a single process). bf16 runs through Accelerate's
autocast; the weights stay fp32, so checkpoints are the same as in fp32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from dist_cardio.distributed import DistInfo
from dist_cardio.engines import EngineConfig, fp32_weights
from dist_cardio.model import memory_format
from dist_cardio.schedule import apply_lr


class AccelerateEngine:
    """:class:`dist_cardio.engines.Engine` over an ``accelerate.Accelerator``."""

    name = "accelerate"

    def __init__(self, cfg: EngineConfig, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> None:
        self.device = info.device
        self.precision = cfg.resolved_precision(info.device)
        self._format = memory_format(info.device)
        self._accelerator = Accelerator(
            cpu=info.device.type == "cpu", mixed_precision="bf16" if self.precision == "bf16" else "no"
        )
        model = model.to(info.device, memory_format=self._format)
        self.model, self._optimizer = self._accelerator.prepare(model, optimizer)
        self.module: nn.Module = self._accelerator.unwrap_model(self.model)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, memory_format=self._format, non_blocking=True)

    def backward(self, loss: torch.Tensor) -> None:
        self._accelerator.backward(loss)

    def no_sync(self) -> AbstractContextManager[None]:
        return self._accelerator.no_sync(self.model)

    def step(self) -> None:
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        apply_lr(self._optimizer, lr)

    def state_dict(self) -> dict[str, Any]:
        return {"model": fp32_weights(self.module), "optimizer": self._optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self._optimizer.load_state_dict(state["optimizer"])


__all__ = ["AccelerateEngine"]
