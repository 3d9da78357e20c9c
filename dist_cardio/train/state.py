"""The pretraining run's resumable state as one object, saved and restored by the checkpoint manager.

``TrainState`` holds what a resumed run needs to continue exactly where it stopped: the engine (model and
optimizer), the per-step LR array, the step, every rank's RNG and data position. ``state_dict()`` is
collective (each rank contributes its RNG and loader state; rank 0 gets the whole document, the other
ranks None); ``load_state_dict()`` refuses a checkpoint that would make this run silently differ.
The document keeps the keys checkpoints have always had (``model``, ``optimizer``, ``schedule``, ``rng``,
``data``, ``world_size``, ``engine``, ``config``; the manager adds ``format`` and ``step``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dist_cardio import distributed
from dist_cardio.train.checkpoint import CheckpointError, rng_state, set_rng_state
from dist_cardio.train.engines import Engine

COMPARED_SECTIONS = ("model", "loss", "optim")
"""Config sections a resumed run must share with the checkpoint (the rest may change, e.g. ``log_every``)."""


class TrainState:
    """Engine + LR array + step + per-rank RNG + data position of one rank, for ``CheckpointManager``."""

    def __init__(self, engine: Engine, loader: Any, lrs: np.ndarray, rank: int, world_size: int, tag: str,
                 config: dict[str, Any]) -> None:
        self.engine, self.loader, self.lrs = engine, loader, lrs
        self.rank, self.world_size, self.tag, self.config = rank, world_size, tag, config
        self.step = 0

    def state_dict(self) -> dict[str, Any] | None:
        """Collective: gathers every rank's RNG and data position; the whole state on rank 0, else None."""
        rngs, data = distributed.all_gather_object(rng_state()), distributed.all_gather_object(self.loader.state_dict())
        if not distributed.is_main():
            return None
        return {
            **self.engine.state_dict(),
            "schedule": {"lr": torch.from_numpy(self.lrs)},
            "rng": rngs, "data": data, "world_size": self.world_size, "engine": self.tag, "config": self.config,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check compatibility, then restore weights, optimizer, step, this rank's data position and RNG."""
        self._check_compatible(state)
        self.step = state["step"]
        self.engine.load_state_dict(state)
        try:
            self.loader.load_state_dict(state["data"][self.rank])  # epoch, batch position, DALI's reader state
        except ValueError as e:
            raise CheckpointError(f"its data position does not fit this loader ({e})") from None
        set_rng_state(state["rng"][self.rank])

    def _check_compatible(self, state: dict[str, Any]) -> None:
        """Refuse to resume into a run that would silently differ from the one that wrote the checkpoint."""
        fix = (f"resume with the config it was written with (saved in its 'config'), or use a new --out than "
               f"{self.config['out']}")
        if state["world_size"] != self.world_size:
            raise CheckpointError(f"written by {state['world_size']} ranks, this run has {self.world_size} "
                                  f"(data positions and RNG are per rank); {fix}")
        if state["engine"] != self.tag:
            raise CheckpointError(f"written by engine {state['engine']}, this run uses {self.tag}; {fix}")
        for section in COMPARED_SECTIONS:
            if state["config"][section] != self.config[section]:
                raise CheckpointError(f"'{section}' differs from the checkpoint's; {fix}")
        lrs = state["schedule"]["lr"]
        if lrs.shape[0] != len(self.lrs) or not np.allclose(lrs.numpy(), self.lrs):
            raise CheckpointError(f"the LR schedule differs (global batch, steps or schedule changed); {fix}")
        if state["step"] > len(self.lrs):
            raise CheckpointError(f"at step {state['step']}, beyond this run's {len(self.lrs)} steps; {fix}")


__all__ = ["TrainState", "COMPARED_SECTIONS"]
