"""Gradient caching: the exact contrastive gradient of a batch too large to backpropagate at once.

A contrastive loss couples every pair of the batch, so it is not a sum over micro-batches: plain
gradient accumulation would shrink the set of negatives and change the objective. Instead (Gao et al.
2021, "GradCache"):

1. pass 1, no graph: embed the batch chunk by chunk, saving the RNG state before each chunk;
2. compute the loss on leaf copies of all embeddings (gathered across ranks inside the loss) and
   backpropagate it to the embeddings only → ``dL/dz``;
3. pass 2: re-embed each chunk with the graph, replaying its RNG state (same dropout masks), and
   backpropagate the surrogate ``sum(z_chunk · dL/dz_chunk)``, whose parameter gradient is the chunk's
   share of ``dL/dθ``. Gradients accumulate over chunks; ranks synchronise once, on the last chunk.

Memory is that of one chunk plus the embeddings; compute is one extra forward.

Engine-agnostic: pass ``backward`` (``engine.backward`` / ``accelerator.backward``) and ``no_sync``, the
engine's context that skips the gradient all-reduce (DDP ``model.no_sync``, Accelerate
``lambda: accelerator.no_sync(model)``, DeepSpeed ``engine.no_sync`` at ZeRO 0/1). DeepSpeed ZeRO-2
refuses ``no_sync``: wrap the whole call in ``engine.coalesce_grad_reduction()`` instead. DeepSpeed also
needs ``"managed_gradient_accumulation": false`` (otherwise per-chunk backward calls are silently wrong
under ZeRO 1/2), then one ``engine.step()``. The loss follows the DDP averaging convention of ``losses.py``: each rank's loss
covers its local rows, and the engines' gradient averaging yields the global gradient.
BatchNorm (``norm: batch``) sees per-chunk statistics; its running statistics are updated by pass 1
only (pass 2 restores them), so they advance once per chunk as without caching.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ContextManager

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _norm_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, saved copy) of every BatchNorm running statistic, to undo pass 2's second update."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training:
            saved += [(b, b.detach().clone()) for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    return saved


def cached_contrastive_step(
    model: nn.Module,
    view1: torch.Tensor,
    view2: torch.Tensor,
    chunk_size: int,
    loss_fn: LossFn,
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[], ContextManager] | None = None,
) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradient of ``loss_fn(model(view1), model(view2))``; return the loss.

    ``view1``/``view2`` are this rank's ``[B, ...]`` inputs; the two views are embedded as one batch of
    2B images, ``chunk_size`` images per forward. With ``chunk_size ≥ 2B`` this is a plain step (one
    forward of 2B, one backward, no extra forward). ``model`` may be the DDP/DeepSpeed/Accelerate wrapper;
    ``backward(t)`` defaults to ``t.backward()``, ``no_sync()`` (entered for every chunk but the last) to
    a null context. Call the optimizer step afterwards. The returned loss is detached (this rank's value).
    """
    if view1.shape != view2.shape:
        raise ValueError(f"the two views must have equal shapes, got {tuple(view1.shape)} and {tuple(view2.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    backward = backward or torch.Tensor.backward
    no_sync = no_sync or contextlib.nullcontext
    b = view1.shape[0]
    if chunk_size >= 2 * b:
        z = model(torch.cat([view1, view2]))
        loss = loss_fn(z[:b], z[b:])
        backward(loss)
        return loss.detach()

    chunks = _chunks(view1, view2, chunk_size)
    states, embeddings = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state(chunk.device))
            embeddings.append(model(chunk))
    rng_after = _rng_state(view1.device)
    saved_norms = _norm_buffers(model)

    z = torch.cat(embeddings).detach().requires_grad_()
    loss = loss_fn(z[:b], z[b:])
    # dL/dz only: z is a leaf, so this touches no parameter (the gather's backward is a collective that
    # every rank runs here, symmetrically).
    (grad_z,) = torch.autograd.grad(loss, z)
    grads = grad_z.split(chunk_size)

    for i, (chunk, (cpu_state, cuda_state)) in enumerate(zip(chunks, states)):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, chunk.device)
        with no_sync() if i < len(chunks) - 1 else contextlib.nullcontext():
            z_chunk = model(chunk)
            surrogate = (z_chunk * grads[i].to(z_chunk.dtype)).sum()
            backward(surrogate)

    # Leave the RNG where a single pass would have left it, and BatchNorm statistics as pass 1 set them.
    torch.set_rng_state(rng_after[0])
    if rng_after[1] is not None:
        torch.cuda.set_rng_state(rng_after[1], view1.device)
    with torch.no_grad():
        for buf, copy in saved_norms:
            buf.copy_(copy)
    return loss.detach()


def _chunks(view1: torch.Tensor, view2: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The 2B images, view1's then view2's, in chunks of ``size``, as slices of the views: one concatenated
    copy would cost 1.1 GB at batch 256 of 512 × 352 views. Only a chunk that straddles the two is copied."""
    b = view1.shape[0]
    chunks = []
    for start in range(0, 2 * b, size):
        stop = min(start + size, 2 * b)
        if stop <= b:
            chunks.append(view1[start:stop])
        elif start >= b:
            chunks.append(view2[start - b : stop - b])
        else:
            chunks.append(torch.cat([view1[start:], view2[: stop - b]]))
    return chunks


__all__ = ["cached_contrastive_step"]
