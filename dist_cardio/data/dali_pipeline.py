"""The DALI engine: ``fn.readers.webdataset`` → decode → augmented views → normalised float tensors.

One pipeline definition serves both devices. With a GPU (``device: gpu``) images are decoded by nvJPEG
(``mixed``), every augmentation runs on the GPU and the batch lands on the rank's current CUDA device;
without one the same graph runs in DALI's CPU-only mode (``device_id=None``). Each epoch gets a fresh
pipeline whose seeds derive from (seed, epoch, rank): the tar order is permuted per epoch (identically
on all ranks, so their index ranges stay disjoint), the reader's shuffle buffer mixes samples within the
rank's part, and the random augmentation draws follow. Mid-epoch resume restores DALI's own checkpoint
(reader position, shuffle buffer, every operator's RNG); ``loader.py`` stores batch size and rank count
with it because DALI restores a mismatched pipeline silently.

Contrast is written with DALI arithmetic rather than ``color_twist`` so it pivots on the view's mean
grey like torchvision's (``color_twist`` pivots on mid-grey, which darkens white paper).
Rotation uses nearest-neighbour sampling (torchvision's default); DALI's linear rotation costs ~4.5 ms
per 224² view on one CPU core, nearest ~0.5 ms.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from dist_cardio.data.augment import AugmentConfig
from dist_cardio.data.plan import LoaderPlan
from dist_cardio.data.shardset import IMAGE_EXTS, ShardDataError, rank_span

GREY_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R 601 luma, as torchvision's ``rgb_to_grayscale``."""


class DaliBackend:
    """Builds and runs one rank's per-epoch DALI pipelines."""

    def __init__(self, plan: LoaderPlan) -> None:
        self.plan = plan
        self.device_id = torch.cuda.current_device() if plan.device == "gpu" else None
        self._pipe: Pipeline | None = None
        self._ahead: tuple[int, Pipeline] | None = None
        """(epoch, pipeline) started before that epoch was asked for (training: across the epoch boundary)."""

    def tar_order(self, epoch: int) -> list[int]:
        """Tar positions in reading order for ``epoch``: a seeded permutation, the same on every rank."""
        n = len(self.plan.shard_set.tars)
        if self.plan.train and self.plan.cfg.shuffle:
            return np.random.default_rng([self.plan.cfg.seed, epoch]).permutation(n).tolist()
        return list(range(n))

    def epoch(self, epoch: int, start: int, restore: bytes | None) -> Iterator[tuple]:
        p = self.plan
        if start > 0 and restore is None:
            raise ValueError(f"cannot continue epoch {epoch} of a DALI loader at batch {start} without its saved state "
                             "(load_state_dict with the state_dict taken there)")
        remaining = p.batches - start
        # No more batches are scheduled than the epoch has left: a pipeline lives for one epoch, so
        # DALI's usual run-ahead would decode `prefetch` batches at every epoch's end for nothing.
        depth = min(p.cfg.prefetch, remaining)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == epoch and start == 0 and restore is None:
            pipe = ahead[1]  # built and scheduled while the previous epoch's last batch trained
        else:
            pipe = self._started(epoch, restore, depth)
        self._pipe = pipe
        start_n, stop_n = rank_span(p.shard_set.total, p.rank, p.world_size)
        last = (stop_n - start_n) - (p.batches - 1) * p.cfg.batch_size  # valid samples in an eval epoch's last batch
        try:
            scheduled = depth
            for i in range(start, p.batches):
                outs = self._guard(epoch, pipe.outputs)
                valid = last if not p.train and i == p.batches - 1 else p.cfg.batch_size
                views = tuple(self._to_torch(o, valid) for o in outs[: p.views])
                metas = [np.asarray(outs[p.views].at(j)).tobytes() for j in range(valid)] if p.with_json else None
                if scheduled < remaining:
                    self._guard(epoch, pipe.schedule_run)
                    scheduled += 1
                elif p.train and i == p.batches - 1:
                    # The next epoch's first batches decode while this one trains: without it, a set of few
                    # batches per epoch (52 printouts at batch 32: one) waits for a whole batch every epoch.
                    self._ahead = (epoch + 1, self._started(epoch + 1, None, min(p.cfg.prefetch, p.batches)))
                yield (*views, metas) if p.with_json else views
        finally:
            if self._pipe is pipe:
                self._pipe = None

    def _started(self, epoch: int, restore: bytes | None, depth: int) -> Pipeline:
        """A built pipeline for ``epoch`` whose first ``depth`` batches are queued."""
        pipe = self._guard(epoch, lambda: self._build(epoch, restore, depth))
        self._guard(epoch, pipe.schedule_run)  # the first call queues `depth` iterations
        return pipe

    def checkpoint(self) -> bytes | None:
        return self._pipe.checkpoint() if self._pipe is not None else None

    def _build(self, epoch: int, restore: bytes | None, depth: int) -> Pipeline:
        p = self.plan
        order = self.tar_order(epoch)
        seed = zlib.crc32(f"{p.cfg.seed}/{epoch}/{p.rank}".encode()) & 0x7FFFFFFF
        pipe = _pipeline(
            p, [str(p.shard_set.tars[i]) for i in order], [str(p.shard_set.indexes[i]) for i in order], seed,
            batch_size=p.cfg.batch_size, num_threads=p.cfg.num_threads, device_id=self.device_id, seed=seed,
            prefetch_queue_depth=depth, enable_checkpointing=True, checkpoint=restore,
        )
        pipe.build()
        return pipe

    def _to_torch(self, out, valid: int) -> torch.Tensor:
        tensor = out.as_tensor()
        shape = list(tensor.shape())
        if self.device_id is None:
            target = torch.empty(shape, dtype=torch.float32)
            feed_ndarray(tensor, target)
        else:
            target = torch.empty(shape, dtype=torch.float32, device=torch.device("cuda", self.device_id))
            feed_ndarray(tensor, target, cuda_stream=torch.cuda.current_stream(self.device_id))
        return target[:valid]

    def _guard(self, epoch: int, call):
        """Run a DALI call; its errors name no file, so name the shard set and look for the bad sample."""
        try:
            return call()
        except RuntimeError as e:
            p = self.plan
            located = p.shard_set.first_problem(self.tar_order(epoch), p.with_json)
            where = located or f"no bad image found by the pre-check; run `dist-cardio verify {p.shard_set.root}`"
            raise ShardDataError(f"DALI stopped reading shard set {p.shard_set.root} (epoch {epoch}, rank {p.rank}): "
                                 f"{where}. DALI said: {_first_error_line(e)}") from e


@pipeline_def
def _pipeline(plan: LoaderPlan, paths: list[str], index_paths: list[str], reader_seed: int):
    aug, cfg = plan.aug, plan.cfg
    exts = [";".join(IMAGE_EXTS)] + (["json"] if plan.with_json else [])
    outputs = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=exts, name="reader", shard_id=plan.rank, num_shards=plan.world_size,
        random_shuffle=plan.train and cfg.shuffle, initial_fill=cfg.shuffle_buffer, seed=reader_seed,
        pad_last_batch=not plan.train, missing_component_behavior="error",
    )
    encoded, metas = (outputs[0], outputs[1:]) if plan.with_json else (outputs, [])
    decoder = "mixed" if plan.device == "gpu" else "cpu"
    size = aug.shape  # DALI sizes follow the HWC layout: (height, width)
    if not plan.train:
        views = [_normalise(fn.resize(fn.decoders.image(encoded, device=decoder, output_type=types.RGB), size=size), aug)]
    elif plan.decode == "crop":
        views = [
            augment_view(fn.resize(fn.decoders.image_random_crop(
                encoded, device=decoder, output_type=types.RGB, random_area=aug.crop_scale,
                random_aspect_ratio=aug.crop_ratio), size=size), aug)
            for _ in range(plan.views)
        ]
    else:
        page = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
        views = [
            augment_view(fn.random_resized_crop(page, size=size, random_area=aug.crop_scale,
                                                random_aspect_ratio=aug.crop_ratio, antialias=True), aug)
            for _ in range(plan.views)
        ]
    return (*views, *metas)


def augment_view(view, aug: AugmentConfig):
    """A ``shape`` (height × width) uint8 crop → rotation, colour jitter, grayscale, blur, flips → normalised float CHW.

    The jitter runs brightness → saturation, hue (and grayscale, as saturation 0) → contrast, and clamps
    to 0..255 once at the end: each clamping pass costs ~1.3 ms per 224² view in DALI's CPU arithmetic.
    Contrast and grayscale commute (both linear, one pivot for all channels), so this matches
    torchvision's order (brightness, saturation, hue, contrast, then grayscale) except where a channel
    clips in between.
    """
    if aug.rotation:
        view = fn.rotate(view, angle=_uniform(-aug.rotation, aug.rotation), keep_size=True,
                         fill_value=aug.rotation_fill, interp_type=types.INTERP_NN)
    on = fn.random.coin_flip(probability=aug.jitter_p) if aug.jitters else 0
    if aug.jitters and aug.brightness:
        view = fn.brightness_contrast(view, brightness=_maybe(on, _uniform(1 - aug.brightness, 1 + aug.brightness), 1.0))
    saturation, hue = 1.0, 0.0
    if aug.jitters and aug.saturation:
        saturation = _maybe(on, _uniform(1 - aug.saturation, 1 + aug.saturation), 1.0)
    if aug.jitters and aug.hue:
        hue = _maybe(on, _uniform(-360.0 * aug.hue, 360.0 * aug.hue), 0.0)
    if aug.grayscale_p:
        saturation = saturation * (1 - fn.random.coin_flip(probability=aug.grayscale_p))
    x = view
    recolour = (aug.jitters and (aug.saturation or aug.hue)) or aug.grayscale_p
    if recolour:
        x = fn.hsv(x, hue=hue, saturation=saturation, dtype=types.FLOAT)  # float: the clamp below saturates it
    if aug.jitters and aug.contrast:
        c = _maybe(on, _uniform(1 - aug.contrast, 1 + aug.contrast), 1.0)
        m = fn.reductions.mean(x, axes=[0, 1])
        grey = m[0] * GREY_WEIGHTS[0] + m[1] * GREY_WEIGHTS[1] + m[2] * GREY_WEIGHTS[2]
        x = dmath.clamp(x * c + grey * (1.0 - c), 0.0, 255.0)
    elif recolour:
        x = dmath.clamp(x, 0.0, 255.0)
    if aug.blur_p:
        blur_on = fn.random.coin_flip(probability=aug.blur_p)
        blurred = fn.gaussian_blur(x, sigma=_uniform(*aug.blur_sigma), window_size=aug.blur_kernel)
        x = blurred * blur_on + x * (1 - blur_on)
    if aug.vflip_p:
        x = fn.flip(x, horizontal=0, vertical=fn.random.coin_flip(probability=aug.vflip_p))
    mirror = fn.random.coin_flip(probability=aug.hflip_p) if aug.hflip_p else 0
    return _normalise(x, aug, mirror)


def _normalise(x, aug: AugmentConfig, mirror=0):
    return fn.crop_mirror_normalize(x, mean=[255.0 * m for m in aug.mean], std=[255.0 * s for s in aug.std],
                                    mirror=mirror, dtype=types.FLOAT, output_layout="CHW")


def _uniform(lo: float, hi: float):
    """A per-sample draw from [lo, hi) (DALI refuses an empty range: equal bounds give the constant)."""
    return fn.random.uniform(range=(lo, hi)) if hi > lo else lo


def _maybe(on, value, identity: float):
    """``value`` where the coin ``on`` is 1, else ``identity`` (a per-sample random apply without branching)."""
    return identity + on * (value - identity)


def _first_error_line(e: Exception) -> str:
    """DALI's operator and cause lines ("Error in CPU operator `...decoders.image`", "Failed to decode ...")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    op = next((line.rstrip(",") for line in lines if line.startswith("Error in")), "")
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
    cause = next((line for line in after if not line.startswith(("Critical error", "Current pipeline"))), type(e).__name__)
    return (f"{op}: {cause}" if op else cause)[:400]
