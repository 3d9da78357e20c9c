"""Accelerate backend: DDP underneath, the same step semantics as the DeepSpeed engine.

The process group already exists (``distributed.py`` created it), so ``Accelerator`` joins it instead
of creating its own. ``cpu=True`` on a GPU-less host: under torchrun that gives real multi-process
gloo training (``accelerate launch --cpu`` would start a single process). bf16 runs through Accelerate's
autocast; the weights stay fp32, so checkpoints are the same as in fp32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from accelerate import Accelerator
from torch import nn

from dist_cardio.distributed import DistInfo
from dist_cardio.train.engines import Engine, EngineConfig


class AccelerateEngine(Engine):
    """:class:`dist_cardio.train.engines.Engine` over an ``accelerate.Accelerator``."""

    name = "accelerate"

    def __init__(self, cfg: EngineConfig, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> None:
        self.device = info.device
        self.precision = cfg.resolved_precision(info.device)
        self.memory_format = cfg.resolved_memory_format(info.device)
        self._accelerator = Accelerator(
            cpu=info.device.type == "cpu", mixed_precision="bf16" if self.precision == "bf16" else "no"
        )
        model = model.to(info.device, memory_format=self.memory_format)
        self.model, self.optimizer = self._accelerator.prepare(model, optimizer)
        self.module: nn.Module = self._accelerator.unwrap_model(self.model)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, memory_format=self.memory_format, non_blocking=True)

    def backward(self, loss: torch.Tensor) -> None:
        self._accelerator.backward(loss)

    def no_sync(self) -> AbstractContextManager[None]:
        return self._accelerator.no_sync(self.model)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


__all__ = ["AccelerateEngine"]
