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
from dist_cardio.config import to_dict
from dist_cardio.model import ModelConfig
from dist_cardio.train.checkpoint import CheckpointError, rng_state, set_rng_state
from dist_cardio.train.engines import Engine
from dist_cardio.train.lars import LarsConfig
from dist_cardio.train.losses import LossConfig

SECTION_TYPES: dict[str, type] = {"model": ModelConfig, "loss": LossConfig, "optim": LarsConfig}
"""Config sections a resumed run must share with the checkpoint (the rest may change, e.g. ``log_every``),
with their dataclasses (the same as ``PretrainConfig``'s fields), whose defaults :func:`same_section` reads."""
COMPARED_SECTIONS = tuple(SECTION_TYPES)


def same_section(section: str, saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a checkpoint's saved config ``section`` equals this run's (both as ``to_dict`` writes them).

    A key this run has and the checkpoint lacks was added to the config after the checkpoint was written;
    it matches when this run keeps the key's default, which is the behaviour the older run had (so adding
    an option with a behaviour-preserving default does not refuse every older checkpoint). Any other
    difference, including a key the checkpoint has and this run lacks, is a mismatch.
    """
    if not set(saved) <= set(current):
        return False
    defaults = to_dict(SECTION_TYPES[section]())
    return all(saved[key] == value if key in saved else key in defaults and defaults[key] == value
               for key, value in current.items())


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
            if not same_section(section, state["config"][section], self.config[section]):
                raise CheckpointError(f"'{section}' differs from the checkpoint's; {fix}")
        lrs = state["schedule"]["lr"]
        if lrs.shape[0] != len(self.lrs) or not np.allclose(lrs.numpy(), self.lrs):
            raise CheckpointError(f"the LR schedule differs (global batch, steps or schedule changed); {fix}")
        if state["step"] > len(self.lrs):
            raise CheckpointError(f"at step {state['step']}, beyond this run's {len(self.lrs)} steps; {fix}")


__all__ = ["TrainState", "COMPARED_SECTIONS", "SECTION_TYPES", "same_section"]
