"""Shards → batches for one rank: the facade the trainer and the fine-tuning helpers code against.

``contrastive_loader`` yields ``(view1, view2)``; ``labeled_loader`` yields ``(images, targets, keys)``.
Both are iterables with ``len`` (batches per epoch, equal on every rank), ``set_epoch`` and
``state_dict``/``load_state_dict`` for an exact mid-epoch resume. The engine (DALI, or the torchvision
fallback) follows the hardware and what is installed unless the config names one; the pipeline
definition is one per engine, CPU and GPU alike.

Epochs and ranks: each epoch is a fresh, seeded pass. Every rank reads a disjoint part of the shard set
(``rank``/``world_size`` come from the caller, i.e. ``distributed.py``); in training every rank yields
``(samples // world_size) // batch_size`` full batches, so no rank waits for a batch another rank does
not have. Evaluation (``train=False``) reads every sample exactly once, in order, with a partial last
batch (lengths may then differ by one batch between ranks: gather predictions after the loop).

Resume: ``state_dict()`` is a small dict (ints, strings, DALI's ~5 KB reader + RNG state), one per
rank; it records the batch size, rank count and the settings the sample order depends on, and
``load_state_dict`` refuses a state made under other settings rather than silently diverging.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import torch
from PIL import Image

from dist_cardio.config import to_dict
from dist_cardio.data.augment import AugmentConfig
from dist_cardio.data.plan import Backend, LoaderConfig, LoaderPlan
from dist_cardio.data.shardset import ShardDataError, ShardView, open_shard_set

log = logging.getLogger(__name__)

STATE_VERSION = 1
HEADER_BYTES = 1 << 16
"""Bytes read per sampled image to learn its format and size (JPEG and PNG headers come first)."""


class ShardLoader:
    """One rank's epochs over a shard set, resumable at any batch."""

    def __init__(self, plan: LoaderPlan, backend: Backend, labels: LabelCoder | None) -> None:
        self.plan = plan
        self._backend = backend
        self._labels = labels
        self._epoch = 0
        self._position = 0
        self._restore: bytes | None = None
        self._live: Iterator[tuple[Any, ...]] | None = None
        self._settings = _settings(plan, labels)

    def __len__(self) -> int:
        return self.plan.batches

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch already yielded."""
        return self._position

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch; the current epoch (e.g. a resumed one) keeps its position."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._epoch, self._position, self._restore, self._live = epoch, 0, None, None

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        """The rest of the current epoch; iterating a finished epoch starts the next one."""
        if self._position >= len(self):
            self.set_epoch(self._epoch + 1)
        if self._live is None:
            self._live = self._backend.epoch(self._epoch, self._position, self._restore if self._position else None)
        while self._position < len(self):
            try:
                raw = next(self._live)
            except BaseException:
                self._live = None  # the engine is dead (e.g. a bad image): a retry rebuilds it
                raise
            self._position += 1
            yield raw if self._labels is None else self._labels.batch(raw)
        self._live = None

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: small, and ``torch.save``-able with ``weights_only=True`` loading."""
        engine = None
        if 0 < self._position < len(self):
            engine = self._backend.checkpoint() if self._live is not None else self._restore
        return {"version": STATE_VERSION, "epoch": self._epoch, "position": self._position,
                "settings": self._settings, "engine": engine}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken; refuses a state from other settings or another rank."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a loader state of version {STATE_VERSION} (got {type(state).__name__}); "
                             "was it saved by this dist_cardio?")
        saved = state["settings"]
        for key in sorted(set(saved) | set(self._settings)):
            if saved.get(key) != self._settings.get(key):
                raise ValueError(f"loader state was saved with {key}={saved.get(key)!r}, this loader has "
                                 f"{self._settings.get(key)!r}: resuming would not continue the same sample order "
                                 "(restore the setting, or start a new run)")
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"loader state position {position} outside 0..{len(self)}")
        if 0 < position < len(self) and self.plan.backend == "dali" and not state["engine"]:
            raise ValueError("loader state lacks DALI's reader state for a mid-epoch position")
        self._epoch, self._position = int(state["epoch"]), position
        self._restore, self._live = state["engine"], None


class LabelCoder:
    """The json component's ``label`` → a class id (int64) or a multi-hot row (float32)."""

    def __init__(self, classes: Sequence[str], multilabel: bool, where: str) -> None:
        if not classes:
            raise ValueError("classes must not be empty")
        self.classes = list(classes)
        self.multilabel = multilabel
        self._index = {c: i for i, c in enumerate(self.classes)}
        self._where = where

    def batch(self, raw: tuple[torch.Tensor, list[bytes]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        images, metas = raw
        docs = [self._doc(m) for m in metas]
        keys = [str(d.get("key")) for d in docs]
        if self.multilabel:
            targets = torch.zeros(len(docs), len(self.classes), dtype=torch.float32)
            for row, (doc, key) in enumerate(zip(docs, keys)):
                for label in _as_list(doc.get("label")):
                    targets[row, self._id(label, key)] = 1.0
        else:
            ids = []
            for doc, key in zip(docs, keys):
                labels = _as_list(doc.get("label"))
                if len(labels) != 1:
                    raise ShardDataError(f"{self._where}: sample {key}: label {doc.get('label')!r} is not one class "
                                         "(single-label training; use multilabel=True or drop the sample)")
                ids.append(self._id(labels[0], key))
            targets = torch.tensor(ids, dtype=torch.int64)
        return images, targets, keys

    def _doc(self, meta: bytes) -> dict:
        try:
            doc = json.loads(meta.rstrip(b"\0"))  # DALI may hand it zero-padded
        except ValueError as e:
            raise ShardDataError(f"{self._where}: a sample's json component is not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ShardDataError(f"{self._where}: a sample's json component is not an object")
        return doc

    def _id(self, label: str, key: str) -> int:
        if label not in self._index:
            raise ShardDataError(f"{self._where}: sample {key}: label {label!r} not in classes {self.classes}")
        return self._index[label]


def contrastive_loader(cfg: LoaderConfig, aug: AugmentConfig, rank: int, world_size: int) -> ShardLoader:
    """Pairs of independently augmented views ``[B, 3, H, W]`` float32 (``aug.shape``) of this rank's part of the shards."""
    plan = _plan(cfg, aug, rank, world_size, train=True, views=2, with_json=False, keys=None)
    return ShardLoader(plan, _backend(plan), None)


def labeled_loader(cfg: LoaderConfig, aug: AugmentConfig, rank: int, world_size: int, classes: Sequence[str],
                   multilabel: bool, train: bool, keys: Collection[str] | None = None) -> ShardLoader:
    """``(images, targets, keys)`` batches; ``targets`` int64 class ids, or float32 multi-hot ``[B, C]``.

    ``keys`` restricts the loader to those samples (e.g. one fine-tuning split from ``samples.jsonl``).
    """
    plan = _plan(cfg, aug, rank, world_size, train=train, views=1, with_json=True, keys=keys)
    return ShardLoader(plan, _backend(plan), LabelCoder(classes, multilabel, str(plan.shard_set.root)))


def _plan(cfg: LoaderConfig, aug: AugmentConfig, rank: int, world_size: int, *, train: bool, views: int,
          with_json: bool, keys: Collection[str] | None) -> LoaderPlan:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if not cfg.shards:
        raise ValueError("LoaderConfig.shards is empty: set it to a shard folder (e.g. --set data.shards=PATH)")
    auto = cfg.backend == "auto"
    if not auto:  # a setting that cannot work is named before any file is opened
        backend, device, decode = _resolve(cfg, [], aug)
    shard_set = open_shard_set(cfg.shards)
    # Page headers are read only where they decide something: auto's choice, or rank 0's --max-side hint.
    pages = stored_pages(shard_set) if auto or (rank == 0 and train) else []
    if auto:
        backend, device, decode = _resolve(cfg, pages, aug)
    if keys is not None:
        shard_set = shard_set.select(keys)
    n, per_rank = shard_set.total, shard_set.total // world_size
    if train and per_rank < cfg.batch_size:
        raise ShardDataError(f"{shard_set.root}: {n} samples give each of {world_size} ranks {per_rank}, fewer than "
                             f"batch_size {cfg.batch_size}; lower batch_size or add data")
    if not train and per_rank < 1:
        raise ShardDataError(f"{shard_set.root}: {n} samples for {world_size} ranks; use fewer ranks")
    _precheck(shard_set, cfg, rank, world_size, with_json)
    plan = LoaderPlan(shard_set, cfg, aug, rank, world_size, train, views, with_json, backend, device, decode)
    if rank == 0 and train:
        hint = resolution_hint(pages, aug, decode, str(shard_set.root))
        if hint:
            log.warning(hint)
    if rank == 0:
        log.info("loader: %s on %s (decode %s), %d samples in %d shards, %d batches of %d per rank and epoch",
                 backend, device, decode, n, len(shard_set.tars), plan.batches, cfg.batch_size)
    return plan


def _precheck(shard_set: ShardView, cfg: LoaderConfig, rank: int, world_size: int, with_json: bool) -> None:
    """Check the images of unvalidated shards; each rank takes every world_size-th shard (a failure stops
    that rank with the shard and key named, and the launcher then stops the others)."""
    if cfg.check == "never":
        return
    todo = [i for i in range(len(shard_set.tars)) if cfg.check == "always" or not shard_set.validated[i]]
    mine = todo[rank::world_size]
    if mine:
        if rank == 0:
            log.warning("%s: %d shard(s) not validated at write time; checking their images first",
                        shard_set.root, len(todo))
        shard_set.check(mine, with_json, progress=rank == 0)


def _backend(plan: LoaderPlan) -> Backend:
    if plan.backend == "dali":
        from dist_cardio.data.dali_pipeline import DaliBackend

        return DaliBackend(plan)
    from dist_cardio.data.torchvision_pipeline import TorchvisionBackend

    return TorchvisionBackend(plan)


def _resolve(cfg: LoaderConfig, pages: list[tuple[str, int, int]], aug: AugmentConfig) -> tuple[str, str, str]:
    """(backend, device, decode) of this config for shards holding ``pages``."""
    backend = _resolve_backend(cfg.backend, pages, aug)
    device = _resolve_device(cfg.device, backend)
    return backend, device, _resolve_decode(cfg.decode, backend, device)


def stored_pages(shard_set: ShardView, n: int = 16) -> list[tuple[str, int, int]]:
    """``(format, width, height)`` of up to ``n`` images spread over the set, from their headers only."""
    samples = shard_set.all_samples()
    samples = samples[:: max(1, len(samples) // n)][:n]
    pages = []
    for s in samples:
        head = shard_set.read(dataclasses.replace(s.image, size=min(s.image.size, HEADER_BYTES)), s.shard)
        try:
            with Image.open(io.BytesIO(head)) as img:
                pages.append((str(img.format), *img.size))
        except (OSError, ValueError, SyntaxError):  # a header past HEADER_BYTES: judged by the others
            continue
    return pages


def _oversized_jpegs(pages: list[tuple[str, int, int]], aug: AugmentConfig) -> bool:
    """Most sampled pages are JPEGs with ≥ 4× the pixels the smallest crop needs (DCT scaling pays)."""
    big = sum(f in ("JPEG", "MPO") and w * h >= 4 * aug.min_source_area() for f, w, h in pages)
    return bool(pages) and big > len(pages) / 2


def resolution_hint(pages: list[tuple[str, int, int]], aug: AugmentConfig, decode: str, where: str) -> str | None:
    """A hint to re-shard with ``--max-side`` when the decoder works on ≥ 2× the pixels the views can use."""
    full = [(w, h) for f, w, h in pages if decode != "reduced" or f not in ("JPEG", "MPO")]
    if not full or len(full) < len(pages) / 2:
        return None
    w, h = sorted(full, key=lambda wh: wh[0] * wh[1])[len(full) // 2]
    need = aug.min_source_area()
    if w * h < 2 * need:
        return None
    side = 64 * math.ceil(math.sqrt(need * max(w, h) / min(w, h)) / 64)
    return (f"{where}: pages are stored at about {w} × {h} px, {w * h / need:.1f}× the pixels that the "
            f"{aug.size} × {aug.height} views can use, and decoding them bounds the step on a CPU. Shard a "
            f"training-resolution copy once: dist-cardio shard <your inputs> --out <new folder> --max-side {side}")


def _resolve_backend(name: str, pages: list[tuple[str, int, int]], aug: AugmentConfig) -> str:
    """``auto``: DALI on a GPU (nvJPEG); on a CPU the faster decoder for these shards: the torchvision path's
    DCT-scaled decode when most pages are JPEGs far larger than the views need (DALI's CPU decoder always
    decodes every pixel), else DALI (``benchmarks/loader.py``)."""
    if name != "auto":
        if name == "dali" and not _dali_installed():
            raise ValueError("backend 'dali' asked for but nvidia-dali is not installed "
                             "(pip install nvidia-dali-cuda130, or set backend: torchvision)")
        return name
    if not _dali_installed():
        return "torchvision"
    return "torchvision" if not torch.cuda.is_available() and _oversized_jpegs(pages, aug) else "dali"


def _dali_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("nvidia.dali") is not None


def _resolve_device(name: str, backend: str) -> str:
    cuda = torch.cuda.is_available()
    if name == "gpu" and not cuda:
        raise ValueError("device 'gpu' asked for but torch sees no CUDA device; use device: auto or cpu")
    if name == "auto":
        return "gpu" if cuda and backend == "dali" else "cpu"
    if name == "gpu" and backend != "dali":
        raise ValueError("device 'gpu' needs the DALI backend (the torchvision fallback augments on CPU)")
    return name


def _resolve_decode(name: str, backend: str, device: str) -> str:
    if name == "auto":
        if backend == "torchvision":
            return "reduced"
        return "crop" if device == "gpu" else "full"
    allowed = ("full", "crop") if backend == "dali" else ("full", "reduced")
    if name not in allowed:
        raise ValueError(f"decode {name!r} is not available with the {backend} backend (choose {' or '.join(allowed)})")
    return name


def _settings(plan: LoaderPlan, labels: LabelCoder | None) -> dict[str, Any]:
    """What the sample order and the augmentation draws depend on; compared on resume."""
    shards = hashlib.sha256(json.dumps([[t.name, c] for t, c in zip(plan.shard_set.tars, plan.shard_set.counts)])
                            .encode()).hexdigest()[:16]
    cfg = plan.cfg
    return {
        "backend": plan.backend, "device": plan.device, "decode": plan.decode, "train": plan.train,
        "views": plan.views, "rank": plan.rank, "world_size": plan.world_size, "batch_size": cfg.batch_size,
        "seed": cfg.seed, "shuffle": cfg.shuffle, "shuffle_buffer": cfg.shuffle_buffer, "shards": shards,
        "augment": json.dumps(to_dict(plan.aug), sort_keys=True),
        "classes": json.dumps(labels.classes) if labels else "",
    }


def _as_list(label: Any) -> list[str]:
    if label is None:
        return []
    return [str(x) for x in label] if isinstance(label, list) else [str(label)]


__all__ = ["LoaderConfig", "ShardLoader", "contrastive_loader", "labeled_loader", "ShardDataError"]
