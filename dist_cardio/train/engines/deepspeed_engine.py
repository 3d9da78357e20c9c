"""DeepSpeed backend, used directly through ``deepspeed.initialize`` (Accelerate's plugin is broken on CPU).

ZeRO stage 0 with the project's LARS as client optimizer: every rank holds whole layers, so LARS's
per-layer trust ratio is exact. Stages 1/2 are refused with LARS (see ``zero_lars_refusal``). Other
settings, each avoiding a trap seen on this DeepSpeed version:

* ``managed_gradient_accumulation: false`` — gradient caching calls ``backward`` once per chunk; in this
  mode ``backward`` only accumulates locally and ``step()`` is the single all-reduce + update. (With the
  default managed mode and ``gradient_accumulation_steps=1`` per-chunk backwards are silently wrong under
  ZeRO 1/2, and ``scale_wrt_gas`` rescales them.)
* ``gradient_clipping: 0`` — DeepSpeed clips to global norm 1.0 unless told otherwise; LARS already
  scales each layer, and the Accelerate backend does not clip, so clipping would break engine parity.
* bf16: the model is cast to bf16 (buffers too, which CPU BatchNorm needs) and DeepSpeed keeps fp32
  master copies per parameter tensor, so LARS still sees whole layers. Inputs are cast in ``prepare``.
* Channels-last applies to the inputs only; the weights stay contiguous. ``deepspeed.initialize``
  broadcasts every parameter as ``p.data.view(torch.uint8)``, which raises on channels-last strides, and
  bf16 keeps the weights as views of one flat buffer, which a later re-layout would silently detach.
  PyTorch runs a convolution channels-last when its input is (tested on CPU for every convolution;
  ``benchmarks/gpu_check.py`` measures the share on CUDA, where a layer without a channels-last kernel
  would hand the next one a contiguous tensor).

Checkpoints: ranks hold identical replicas at stage 0, so the trainer saves rank 0's state dicts
(``checkpoint.py``); DeepSpeed's own ``save_checkpoint`` (pickles, one folder per tag) is not used.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

if not torch.cuda.is_available():
    # Say so before DeepSpeed picks its accelerator (it would probe and fall back with a warning).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402  (after DS_ACCELERATOR)
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder  # noqa: E402

from dist_cardio.distributed import DistInfo  # noqa: E402
from dist_cardio.train.engines import Engine, EngineConfig, zero_lars_refusal  # noqa: E402
from dist_cardio.train.lars import LARS  # noqa: E402


def deepspeed_config(cfg: EngineConfig, precision: str, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for this engine (see the module docstring for each setting)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"buffer_dtype": "bf16"}
    return ds


def _skip_shm_comm() -> None:
    """One process has nothing to all-reduce: keep DeepSpeed from compiling its shared-memory reduce op.

    On a CPU, DeepSpeed builds that op with g++ when a process first sets up its comm layer, whatever the
    world size: 26-45 s on 2 cores in every new environment (the demo's first run paid it). Its op table
    is one module-level dict that DeepSpeed keeps for edits like this one; multi-process runs keep the op.
    """
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


class DeepSpeedEngine(Engine):
    """:class:`dist_cardio.train.engines.Engine` over a ``deepspeed.DeepSpeedEngine``."""

    name = "deepspeed"

    def __init__(
        self, cfg: EngineConfig, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo, micro_batch: int
    ) -> None:
        if cfg.zero_stage > 0 and isinstance(optimizer, LARS):
            raise ValueError(zero_lars_refusal(cfg.zero_stage))
        if info.backend is None:
            raise RuntimeError("the DeepSpeed engine needs a process group: call init_distributed(require_group=True) first")
        self.device = info.device
        self.precision = cfg.resolved_precision(info.device)
        self._dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.memory_format = cfg.resolved_memory_format(info.device)
        model = model.to(info.device)  # contiguous weights: see the module docstring
        if info.world_size == 1:
            _skip_shm_comm()
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, self.precision, micro_batch), dist_init_required=False
        )
        self._engine = engine
        self.optimizer = ds_optimizer
        self.model: nn.Module = engine
        self.module: nn.Module = engine.module

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, dtype=self._dtype, memory_format=self.memory_format, non_blocking=True)

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss)

    def no_sync(self) -> AbstractContextManager[None]:
        # Unmanaged accumulation: backward never reduces, step() does it once; nothing to suppress.
        return contextlib.nullcontext()

    def step(self) -> None:
        self._engine.step()  # all-reduce (mean), optimizer step, zero the gradients


__all__ = ["DeepSpeedEngine", "deepspeed_config"]
