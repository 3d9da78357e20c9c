"""The benchmarks' one loader clock: a fixed number of batches after a warm-up batch, over epochs as needed.

A set with fewer batches per epoch than the count is read over as many epochs as it takes (iterating a
finished epoch starts the next), so a small set is not timed on a few stragglers, and each epoch turn costs
here what it costs a training run. The warm-up batch (pipeline build, worker start-up, first fill) is not
timed. Used by ``loader.py``, ``feeding.py`` and ``gpu_check.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from dist_cardio.data import ShardLoader


def timed(loader: ShardLoader, batches: int) -> dict:
    """Samples/s of a two-view loader over ``batches`` batches after one warm-up batch."""
    if batches < 1 or len(loader) < 1:
        raise ValueError(f"need batches >= 1 and a loader with at least one batch per epoch "
                         f"(got {batches} and {len(loader)})")
    shape = (loader.plan.cfg.batch_size, 3, *loader.plan.aug.shape)
    first_epoch = loader.epoch
    stream = _endless(loader)
    try:
        views = next(stream)
        _check(views, shape)
        _sync(views)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            views = next(stream)
            _check(views, shape)
        _sync(views)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        stream.close()
    samples = batches * shape[0]  # cpu: this process only (DALI's threads, not DataLoader workers)
    return {"samples_per_s": samples / wall, "seconds": wall, "cpu_ms_per_sample": 1000 * cpu / samples,
            "epochs": loader.epoch - first_epoch + 1}


def _endless(loader: ShardLoader) -> Iterator[tuple[torch.Tensor, ...]]:
    while True:
        yield from loader  # iterating a finished epoch starts the next one


def _check(views: tuple[torch.Tensor, ...], shape: tuple[int, ...]) -> None:
    if len(views) != 2 or any(tuple(v.shape) != shape for v in views):
        raise RuntimeError(f"loader gave {[tuple(v.shape) for v in views]}, expected two views of {shape}")


def _sync(views: tuple[torch.Tensor, ...]) -> None:
    """DALI ``mixed`` works on its own CUDA streams: a clock read after this is fair."""
    if views[0].is_cuda:
        torch.cuda.synchronize()
