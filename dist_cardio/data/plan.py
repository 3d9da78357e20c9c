"""What the loader facade hands a backend: ``LoaderConfig`` (the ``data:`` section), the resolved
``LoaderPlan`` of one rank, and the ``Backend`` protocol both pipelines implement.

Kept apart from ``loader.py`` so that the backends (``dali_pipeline.py``, ``torchvision_pipeline.py``)
import these types without importing the facade that imports them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from dist_cardio.data.augment import AugmentConfig
from dist_cardio.data.shardset import ShardView, rank_span


@dataclass(frozen=True)
class LoaderConfig:
    """Where the shards are and how one rank batches them (``data:`` section of the configs)."""

    shards: str = ""
    """Shard folder written by ``dist-cardio shard`` (or any folder of WebDataset ``*.tar`` files)."""
    batch_size: int = 32
    """Samples per batch on each rank; the global batch is ``batch_size × world_size``."""
    num_threads: int = 2
    """DALI CPU worker threads, or DataLoader worker processes for the torchvision backend."""
    backend: Literal["auto", "dali", "torchvision"] = "auto"
    """``auto``: DALI on a GPU (nvJPEG). On a CPU the faster decoder for the shards at hand
    (``benchmarks/loader.py``): the torchvision path when most pages are JPEGs with ≥ 4× the pixels the
    smallest crop needs (its DCT-scaled decode skips them; DALI's CPU decoder decodes every pixel), else
    DALI. The torchvision fallback whenever DALI is not installed (same augmentations)."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where DALI decodes and augments: ``auto`` is the GPU when CUDA is available (nvJPEG ``mixed``
    decoding, outputs on the rank's current CUDA device), else DALI's CPU-only mode."""
    decode: Literal["auto", "full", "crop", "reduced"] = "auto"
    """How much of a ~2200×1600 page is decoded for 224² views. ``full``: decode the page once, cut both
    views from it. ``crop``: fused decode + random crop per view (DALI ``decoders.image_random_crop``),
    which never materialises the whole page. ``reduced``: JPEG DCT-scaled decode down to the smallest
    size that still holds the smallest crop at full output resolution (torchvision backend only).
    ``auto``: DALI CPU → ``full`` (measured: two fused crop decodes cost more than one full decode on
    CPU, because libjpeg still entropy-decodes every row above a crop's bottom edge); DALI GPU → ``crop``
    (a decoded page is 11.6 MB of GPU memory, 3 GB per 256-image batch, which the fused path never
    allocates); torchvision → ``reduced`` (fewer pixels is the lever for a CPU decoder)."""
    seed: int = 0
    """Base seed of shuffling and augmentation; each (epoch, rank) derives its own from it."""
    shuffle: bool = True
    """Shuffle in training: tar order per epoch (all ranks alike) plus a sample buffer per rank (DALI),
    or one global permutation per epoch (torchvision)."""
    shuffle_buffer: int = 512
    """DALI reader shuffle buffer in samples; it holds encoded images (~1.4 MB each at full size)."""
    prefetch: int = 2
    """Batches prepared ahead (DALI ``prefetch_queue_depth``; DataLoader ``prefetch_factor``)."""
    check: Literal["auto", "always", "never"] = "auto"
    """Pre-check images before reading: ``auto`` checks shards not validated when written (no manifest
    listing them), ``always`` all shards, ``never`` none (a bad image then stops DALI mid-epoch)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")


@dataclass(frozen=True)
class LoaderPlan:
    """What a backend needs to build one rank's epochs (resolved from the configs)."""

    shard_set: ShardView
    cfg: LoaderConfig
    aug: AugmentConfig
    rank: int
    world_size: int
    train: bool
    views: int
    """2 for contrastive pairs, 1 for labelled batches."""
    with_json: bool
    backend: str
    device: str
    decode: str

    @property
    def batches(self) -> int:
        """Batches per epoch on this rank: full batches only in training, all samples in evaluation."""
        n, b = self.shard_set.total, self.cfg.batch_size
        if self.train:
            return (n // self.world_size) // b
        start, stop = rank_span(n, self.rank, self.world_size)
        return -(-(stop - start) // b)


class Backend(Protocol):
    def epoch(self, epoch: int, start: int, restore: bytes | None) -> Iterator[tuple[Any, ...]]:
        """Batches ``start..`` of ``epoch``: ``(view1, view2)`` or ``(images, json_bytes_list)``."""

    def checkpoint(self) -> bytes | None:
        """Engine state after the last batch the live epoch yielded (None: the position alone suffices)."""


__all__ = ["LoaderConfig", "LoaderPlan", "Backend"]
