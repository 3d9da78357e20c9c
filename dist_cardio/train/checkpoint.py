"""The one checkpoint manager: ``<dir>/step-NNNNNNNN.pt`` files, a fixed ``latest``, keep-last-k.

Why a fixed name: a preempted SLURM job is requeued with the same command and resumes with no flag,
because the trainer always looks at ``<out>/checkpoints/latest``. Writes are atomic (temp file, fsync,
rename), and ``latest`` is switched (hard link + rename) only after the new file is complete, so a
crash or a full disk mid-write never costs the last good checkpoint. Only rank 0 writes; at ZeRO
stage 0 every rank holds the whole model, and per-rank values (RNG, data position) are gathered first.

A checkpoint is one ``torch.save`` dict of tensors and plain values, read back with
``torch.load(weights_only=True)`` (nothing is unpickled) after checking the zip's CRCs. The trainer
stores ``step``, ``model`` (fp32 weights), ``optimizer``, ``schedule`` (the per-step LR array), ``rng``
and ``data`` (one entry per rank), ``world_size``, ``engine`` and ``config`` (a plain dict). Unreadable
files raise :class:`CheckpointError` naming the file and what to do; nothing is deleted or overwritten.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dist_cardio import distributed
from dist_cardio.atomic import fsync_dir

FORMAT = "dist_cardio.checkpoint/1"
LATEST = "latest"
_STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")


@dataclass(frozen=True)
class CheckpointConfig:
    """How often to save and how many step files to keep."""

    every: int = 500
    """Save every N optimizer steps (and always at the end of the run and on SIGTERM)."""
    keep: int = 3
    """Step files kept besides ``latest`` (older ones are deleted after a successful save)."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be ≥ 1 step, got {self.every}")
        if self.keep < 1:
            raise ValueError(f"keep must be ≥ 1, got {self.keep}")


class Stateful(Protocol):
    """What the manager saves and restores (the pretraining ``TrainState``)."""

    step: int

    def state_dict(self) -> dict[str, Any] | None: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix (the CLI prints it as one line)."""


def read_checkpoint(path: str | Path, fix: str) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of one checkpoint after checking its zip CRCs; every failure is one
    :class:`CheckpointError` ``"<path>: <what is wrong>; <fix>"``.

    Why the reasons are ours, not PyTorch's: checkpoints come from other sites, and PyTorch's message for a
    file holding pickled objects advises re-running with ``weights_only=False``, which would execute them.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e.strerror}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: unreadable checkpoint (not a regular file: a device, FIFO or folder); {fix}")
    try:
        if st.st_size == 0:
            raise CheckpointError("empty file, 0 bytes: a copy or save cut short")
        # torch.save writes a zip with per-member CRC32s that torch.load never checks: check them
        # first, so flipped bytes are caught here instead of becoming silently wrong weights.
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
        if bad is not None:
            raise CheckpointError(f"damaged: CRC mismatch in member {bad}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e}); {fix}") from None
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path}: unreadable checkpoint (not a PyTorch checkpoint, or cut short: no zip directory at its end); {fix}") from None
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: unreadable checkpoint (it holds Python objects other than tensors and plain values, "
                              f"refused unread: a dist-cardio checkpoint never does, the file may be malicious); {fix}") from None
    except Exception as e:  # EOFError, RuntimeError, ... for damaged members
        reason = (str(e).splitlines() or [""])[0]
        if "weights_only" in reason or len(reason) > 160:
            reason = "its contents cannot be read as tensors and plain values"
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {reason}); {fix}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a dist_cardio checkpoint (a {type(state).__name__}, not a dict); {fix}")
    return state


def load_weights(module: torch.nn.Module, weights: Any, path: str | Path, fix: str) -> None:
    """``module.load_state_dict(weights)``, with a mismatch as one line instead of PyTorch's multi-line report."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = (lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__)
        first = first.replace("copying a param with shape torch.Size", "").replace("the shape in current model is torch.Size", "model")[:200]
        raise CheckpointError(f"{path}: its weights do not fit the model config stored with them ({first}); the file "
                              f"was edited or damaged: {fix}") from None


class CheckpointManager:
    """Save and find checkpoints in one directory (rank 0 calls :meth:`save`; every rank may load)."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be ≥ 1, got {keep}")
        self.dir = Path(directory)
        self.keep = keep

    @property
    def latest(self) -> Path:
        return self.dir / LATEST

    def step_files(self) -> list[Path]:
        """Complete step files, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if _STEP_FILE.match(p.name))

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``state`` as ``step-<step>.pt``, point ``latest`` at it, prune old step files."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        final = self.dir / f"step-{step:08d}.pt"
        tmp = self.dir / f".{final.name}.tmp-{os.getpid()}"
        link = self.dir / f".{LATEST}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save({"format": FORMAT, **state, "step": step}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            link.unlink(missing_ok=True)
            os.link(final, link)  # same bytes, no copy; `latest` survives pruning of its step file
            os.replace(link, self.latest)
            fsync_dir(self.dir)
        except (OSError, RuntimeError) as e:  # a full disk: OSError from fsync, RuntimeError from torch.save's writer
            raise CheckpointError(self._unwritten(final, e)) from None
        finally:
            tmp.unlink(missing_ok=True)
            link.unlink(missing_ok=True)
        for old in self.step_files()[: -self.keep]:
            old.unlink(missing_ok=True)
        return final

    def save_state(self, state: Stateful) -> Path:
        """Collective: ``state.state_dict()`` on every rank, the rank that gets the document writes it, all
        ranks wait until ``latest`` is on disk. Returns ``latest``'s step file (``latest`` on other ranks)."""
        doc = state.state_dict()
        path = self.latest
        if doc is not None:
            path = self.save(doc, state.step)
        distributed.barrier()
        return path

    def restore(self, state: Stateful) -> bool:
        """Load ``latest`` into ``state``; False when there is none (a fresh run). Errors name ``latest``."""
        doc = self.load_latest()
        if doc is None:
            return False
        try:
            state.load_state_dict(doc)
        except CheckpointError as e:
            raise CheckpointError(f"{self.latest}: {e}") from None
        return True

    def load_latest(self) -> dict[str, Any] | None:
        """The state behind ``latest``, or None when there is none (a fresh run)."""
        if not self.latest.exists():
            return None
        return self.load(self.latest)

    def load(self, path: str | Path) -> dict[str, Any]:
        """Read and check one checkpoint file (CPU tensors, ``weights_only``)."""
        path = Path(path)
        state = read_checkpoint(path, self._fix(path))
        if state.get("format") != FORMAT or not isinstance(state.get("step"), int):
            raise CheckpointError(f"{path}: not a dist_cardio checkpoint (format {FORMAT!r} expected); {self._fix(path)}")
        return state

    def _unwritten(self, final: Path, e: BaseException) -> str:
        """One line for a save that failed: why, what is still on disk, how to go on."""
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(self.dir).free < 1 << 20
        reason = "No space left on device" if full else ((e.strerror or str(e)) if isinstance(e, OSError) else (str(e).splitlines() or [""])[0][:160])
        kept = f"{self.latest} still holds the last saved step" if self.latest.exists() else "no earlier checkpoint exists"
        return f"{final}: not written ({reason}); {kept}. Free space and re-run the same command: it resumes from there"

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of saves killed mid-write (``.step-N.pt.tmp-PID``, ``.latest.tmp-PID``): their process is gone,
        so nothing will finish or remove them. Only rank 0 of the run holding the output lock saves here."""
        for p in self.dir.glob(".*.tmp-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                p.unlink(missing_ok=True)

    def _fix(self, path: Path) -> str:
        older = [p for p in self.step_files() if not (path.exists() and p.samefile(path))]
        if older:
            return (f"it was left untouched. To resume from the previous one, replace it: "
                    f"ln -f {older[-1]} {self.latest}; or start afresh in a new output directory")
        return f"it was left untouched. Delete {path} to start afresh, or use a new output directory"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states, as tensors and plain values."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


__all__ = ["CheckpointConfig", "CheckpointError", "CheckpointManager", "read_checkpoint", "load_weights", "rng_state", "set_rng_state", "FORMAT", "LATEST"]
