"""The torchvision fallback: same shards, same augmentations (``augment.py``), no DALI needed.

Samples are read straight from the tars at the offsets the ``.idx`` files give, so a rank can take any
part of any epoch: the order is one seeded permutation per epoch split into contiguous rank parts, and
each sample's augmentation is drawn from a generator seeded by (seed, epoch, sample). A resumed epoch is
therefore just "skip the first k batches" — no decoding — and needs no saved engine state; the number of
DataLoader workers does not change a single pixel.

Decoding is the CPU cost: with ``decode: reduced`` a JPEG is decoded through PIL's DCT scaling
(``Image.draft``) to the smallest power-of-two reduction that still holds the smallest allowed crop at
full output resolution, so views are the same and a 2339×1654 page costs ~4× fewer pixels.
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import sys
import weakref
from collections.abc import Iterator

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dist_cardio.data.augment import AugmentConfig
from dist_cardio.data.plan import LoaderPlan
from dist_cardio.data.shardset import Sample, ShardDataError, rank_span
from dist_cardio.shard.imagecheck import open_image


class ColourJitter(torch.nn.Module):
    """Brightness, saturation, hue, contrast in this fixed order (as the DALI pipeline), with probability p.

    torchvision's ``ColorJitter`` shuffles the order per call; a fixed order keeps both backends alike.
    """

    def __init__(self, aug: AugmentConfig) -> None:
        super().__init__()
        self.aug = aug

    def forward(self, img: Image.Image) -> Image.Image:
        a = self.aug
        if torch.rand(()) >= a.jitter_p:
            return img
        if a.brightness:
            img = F.adjust_brightness(img, _uniform(1 - a.brightness, 1 + a.brightness))
        if a.saturation:
            img = F.adjust_saturation(img, _uniform(1 - a.saturation, 1 + a.saturation))
        if a.hue:
            img = F.adjust_hue(img, _uniform(-a.hue, a.hue))
        if a.contrast:
            img = F.adjust_contrast(img, _uniform(1 - a.contrast, 1 + a.contrast))
        return img


class ToRGB(torch.nn.Module):
    """Any PIL mode (P, RGBA, L, I;16) → RGB, as DALI's decoder outputs."""

    def forward(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")


def build_torchvision_transform(aug: AugmentConfig, train: bool) -> T.Compose:
    """PIL image → normalised float32 tensor ``[3, H, W]`` (``aug.shape``); one random view per call when ``train``.

    Every augmentation runs on the PIL image (Pillow's uint8 C code is several times faster than the
    same ops on float tensors, e.g. hue); only the finished view becomes a tensor.
    """
    tail = [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(aug.mean, aug.std)]
    if not train:
        return T.Compose([ToRGB(), T.Resize(aug.shape, antialias=True), *tail])
    steps: list[torch.nn.Module] = [
        ToRGB(),
        T.RandomResizedCrop(aug.shape, scale=aug.crop_scale, ratio=aug.crop_ratio, antialias=True),
    ]
    if aug.rotation:
        # Nearest neighbour, torchvision's default for rotations (and ~9× cheaper than linear in DALI on CPU).
        steps.append(T.RandomRotation(aug.rotation, interpolation=T.InterpolationMode.NEAREST, fill=aug.rotation_fill))
    if aug.jitters:
        steps.append(ColourJitter(aug))
    if aug.grayscale_p:
        steps.append(T.RandomGrayscale(aug.grayscale_p))
    if aug.blur_p:
        steps.append(T.RandomApply([T.GaussianBlur(aug.blur_kernel, sigma=aug.blur_sigma)], p=aug.blur_p))
    if aug.hflip_p:
        steps.append(T.RandomHorizontalFlip(aug.hflip_p))
    if aug.vflip_p:
        steps.append(T.RandomVerticalFlip(aug.vflip_p))
    return T.Compose(steps + tail)


def decode_page(data: bytes, aug: AugmentConfig | None = None, train: bool = True) -> Image.Image:
    """Decode image bytes to RGB. With ``aug``, a JPEG is DCT-scaled down as far as the views allow: in
    training while the smallest crop keeps ≥ the view's long side in px, in evaluation while the page keeps
    ≥ the view's height and width."""
    img = open_image(data)
    if aug is not None and img.format in ("JPEG", "MPO"):
        w, h = img.size
        out_h, out_w = aug.shape
        f = math.sqrt(aug.min_source_area() / (w * h)) if train else max(out_w / w, out_h / h)
        if f < 1.0:
            img.draft("RGB", (math.ceil(w * f), math.ceil(h * f)))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


class SampleViews(Dataset):
    """``(epoch, sample id)`` → the sample's view(s) (+ json bytes), drawn from a generator seeded by
    (seed, epoch, sample id): the same pixels whichever worker, and however many, makes them."""

    def __init__(self, plan: LoaderPlan, samples: list[Sample]) -> None:
        self.tars = [str(t) for t in plan.shard_set.tars]
        self.samples = samples
        self.transform = build_torchvision_transform(plan.aug, plan.train)
        self.views = plan.views
        self.with_json = plan.with_json
        self.seed = plan.cfg.seed
        self.reduce = plan.aug if plan.decode == "reduced" else None
        self.train = plan.train
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __del__(self) -> None:
        for fd in self._fds.values():
            os.close(fd)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.tars[shard], os.O_RDONLY)
        return os.pread(fd, size, offset)

    def __getitem__(self, index: tuple[int, int]) -> tuple:
        epoch, sample_id = index
        s = self.samples[sample_id]
        try:
            img = decode_page(self._read(s.shard, s.image.offset, s.image.size), self.reduce, self.train)
        except Exception as e:  # Pillow raises many types for damaged data; name the sample whatever it was
            raise ShardDataError(f"{self.tars[s.shard]}: sample {s.key}: {e}") from None
        seed = np.random.SeedSequence([self.seed, epoch, sample_id]).generate_state(2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed[0]) << 32 | int(seed[1]))
            views = tuple(self.transform(img) for _ in range(self.views))
        if self.with_json:
            meta = self._read(s.shard, s.json.offset, s.json.size) if s.json else b"{}"
            return (*views, meta)
        return views


def _collate(items: list[tuple]) -> tuple:
    first = items[0]
    tensors = tuple(torch.stack([it[i] for it in items]) for i in range(len(first)) if isinstance(first[i], torch.Tensor))
    metas = [it[-1] for it in items] if isinstance(first[-1], bytes) else None
    return (*tensors, metas) if metas is not None else tensors


class EpochBatches:
    """Batch sampler whose batches the backend sets per epoch (a persistent DataLoader keeps its sampler)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchvisionBackend:
    """Epochs of one rank through one DataLoader whose ``num_threads`` worker processes live across epochs.

    Workers are forked, except in a process that has loaded DALI: its thread pools may hold locks at the
    moment of a fork, which can deadlock the child, so workers then come from a clean forkserver.
    """

    def __init__(self, plan: LoaderPlan) -> None:
        self.plan = plan
        self.samples = plan.shard_set.all_samples()
        self._sampler = EpochBatches()
        self._loader: DataLoader | None = None
        self._ahead: tuple[int, Iterator[tuple]] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Sample ids this rank reads in ``epoch``, in order."""
        p, n = self.plan, len(self.samples)
        ids = np.random.default_rng([p.cfg.seed, epoch]).permutation(n) if p.train and p.cfg.shuffle else np.arange(n)
        start, stop = rank_span(n, p.rank, p.world_size)
        ids = ids[start:stop]
        return ids[: p.batches * p.cfg.batch_size] if p.train else ids

    def epoch(self, epoch: int, start: int, restore: bytes | None) -> Iterator[tuple]:
        ahead, self._ahead = self._ahead, None
        batches = ahead[1] if ahead is not None and ahead[0] == epoch and start == 0 else self._started(epoch, start)
        for i in range(len(self._sampler)):
            batch = next(batches)
            if self.plan.train and i == len(self._sampler) - 1:
                # Start the next epoch's batches in the workers while this last one trains (the persistent
                # workers are idle otherwise): a set of few batches per epoch would wait for each first batch.
                self._ahead = (epoch + 1, self._started(epoch + 1, 0))
            yield batch

    def _started(self, epoch: int, start: int) -> Iterator[tuple]:
        """The DataLoader's iterator over ``epoch`` from batch ``start``; the workers begin at once."""
        b = self.plan.cfg.batch_size
        ids = self.order(epoch).tolist()
        self._sampler.batches = [[(epoch, i) for i in ids[j : j + b]] for j in range(start * b, len(ids), b)]
        if self._loader is None:
            context = "forkserver" if "nvidia.dali" in sys.modules else None
            self._loader = DataLoader(
                SampleViews(self.plan, self.samples), batch_sampler=self._sampler, num_workers=self.plan.cfg.num_threads,
                collate_fn=_collate, prefetch_factor=self.plan.cfg.prefetch, pin_memory=torch.cuda.is_available(),
                persistent_workers=True, multiprocessing_context=context,
                # Its own generator: an iterator's worker base seed must not be drawn from the global RNG, whose
                # state a checkpoint restores (a resumed run would draw at another step and train differently).
                generator=torch.Generator().manual_seed(self.plan.cfg.seed), worker_init_fn=_ignore_sigterm,
            )
            _with_workers.add(self)
        return iter(self._loader)

    def checkpoint(self) -> bytes | None:
        return None

    def close(self) -> None:
        """Stop the workers now. They ignore SIGTERM, so the DataLoader's own shutdown, whose last resort is
        terminate(), cannot be left to multiprocessing's exit hook: it would wait on them forever."""
        loader, self._loader, self._ahead = self._loader, None, None
        batches = getattr(loader, "_iterator", None)
        if batches is None:
            return
        batches._shutdown_workers()
        for worker in batches._workers:
            if worker.is_alive():
                worker.kill()
                worker.join()


def _close_all() -> None:
    for backend in list(_with_workers):
        backend.close()


# Backends whose workers may be alive. Registered here, after multiprocessing's own exit hook (torch imports
# it first), so this one runs before it: atexit runs hooks last-registered first.
_with_workers: weakref.WeakSet[TorchvisionBackend] = weakref.WeakSet()
atexit.register(_close_all)


def _ignore_sigterm(worker_id: int) -> None:
    """SIGTERM (SLURM preemption, scancel, a launcher) reaches the whole process group: a worker that died of it
    would fail the trainer's step before it could save. The trainer finishes its step and the backend's
    ``close`` (at the latest at exit) stops the workers."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _uniform(lo: float, hi: float) -> float:
    return float(torch.empty(()).uniform_(lo, hi))
