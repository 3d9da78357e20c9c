"""The pretraining part of ``gpu_check.py``: a torchrun worker that runs every engine with and without
gradient caching, how to launch it, and how to read what it found.

    python -m torch.distributed.run --standalone --nproc_per_node N benchmarks/gpu_check_train.py SPEC.json

``launch`` writes SPEC (config, overrides, engines, chunks, steps, output folder) and reads back one
``rank<r>.json`` per rank. Each rank draws its batches once from the project's loader (DALI: ``mixed`` on a
GPU) and feeds the same batches to every variant, so images/s is the training step alone (the loader has
its own rows) and the variants' losses are comparable; the batches' checksum lets the caller check that the
process of the other precision saw the same inputs. ``gpu_check.py`` turns dropout off in the overrides:
masks drawn in bf16 and in fp32 need not match, and the losses are compared to a tolerance.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from dist_cardio.atomic import atomic_write_json
from dist_cardio.data import contrastive_loader
from dist_cardio.distributed import DistInfo, cleanup, init_distributed
from dist_cardio.model import SimCardioNet
from dist_cardio.train.engines import build_engine
from dist_cardio.train.gradcache import cached_contrastive_step
from dist_cardio.train.lars import build_lars
from dist_cardio.train.losses import make_loss
from dist_cardio.train.pretrain import PretrainConfig, load_pretrain_config
from dist_cardio.train.schedule import scaled_lr

Batches = list[tuple[torch.Tensor, torch.Tensor]]
REPO = Path(__file__).resolve().parents[1]


class CheckFailed(RuntimeError):
    """A check ran but its figures are wrong; the message says which and by how much."""


# --- the worker (inside torchrun) ------------------------------------------------------------------------


def draw_batches(cfg: PretrainConfig, info: DistInfo, n: int) -> Batches:
    """``n`` batches of this rank's two views, from the loader the trainer uses (epochs follow one another)."""
    loader = contrastive_loader(cfg.data, cfg.augment, info.rank, info.world_size)
    batches: Batches = []
    while len(batches) < n:
        for views in loader:  # a finished epoch starts the next one
            batches.append(views)
            if len(batches) == n:
                break
    return batches


def checksum(batches: Batches) -> float:
    """Sum of every pixel in float64: equal inputs in two processes give equal sums."""
    return float(sum(view.double().sum() for pair in batches for view in pair))


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it is fair (a CPU-GPU sync point)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device, before: int) -> float:
    """CUDA: memory the variant allocated at its peak; CPU: the process's RSS high-water mark (cumulative)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def layout_probe(model: torch.nn.Module) -> dict[str, list[bool]]:
    """Hooks that record, per convolution call, whether its input and its output were channels-last: a layer
    that hands the next one a contiguous tensor (e.g. a norm kernel without a channels-last path) shows here."""
    seen: dict[str, list[bool]] = {"inputs": [], "outputs": []}

    def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["inputs"].append(inputs[0].is_contiguous(memory_format=torch.channels_last))
        seen["outputs"].append(output.is_contiguous(memory_format=torch.channels_last))

    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_hook(record)
    return seen


def run_variant(cfg: PretrainConfig, info: DistInfo, batches: Batches, backend: str, chunk: int | None,
                warmup: int) -> dict[str, Any]:
    """Images/s (all ranks), peak memory, per-step losses and conv layouts of one engine (``chunk`` None: no caching)."""
    gc.collect()
    before = 0
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(info.device)
        before = torch.cuda.memory_allocated(info.device)
    torch.manual_seed(cfg.seed)
    model = SimCardioNet(cfg.model)
    layouts = layout_probe(model)
    engine = build_engine(dataclasses.replace(cfg.engine, backend=backend), model, build_lars(model, cfg.optim), info,
                          cfg.data.batch_size)
    engine.set_lr(scaled_lr(cfg.schedule.base_lr, cfg.data.batch_size * info.world_size, cfg.schedule.scaling))
    loss_fn = make_loss(cfg.loss)
    torch.manual_seed(cfg.seed + info.rank)
    losses, start = [], time.perf_counter()
    for i, (view1, view2) in enumerate(batches):
        if i == warmup:
            synchronize(info.device)
            start = time.perf_counter()
        losses.append(cached_contrastive_step(engine.model, engine.prepare(view1), engine.prepare(view2),
                                              chunk or 2 * cfg.data.batch_size, loss_fn, engine.backward, engine.no_sync))
        engine.step()
    synchronize(info.device)
    elapsed = time.perf_counter() - start
    row = {
        "images_per_s": (len(batches) - warmup) * cfg.data.batch_size * info.world_size / elapsed,
        "peak_mb": peak_mb(info.device, before),
        "losses": [float(loss) for loss in losses],
        "precision": engine.precision,
        "param_dtype": str(next(engine.module.parameters()).dtype).removeprefix("torch."),
        "memory_format": "channels_last" if engine.memory_format == torch.channels_last else "contiguous",
        **{f"conv_{k}_channels_last": sum(v) / len(v) for k, v in layouts.items()},  # shares of conv calls
        "chunk": chunk,
    }
    del engine, model
    return row


def main(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    info = init_distributed(require_group=True)  # torchrun's ranks; nccl on CUDA, gloo on CPU
    try:
        cfg = load_pretrain_config(spec["config"], spec["overrides"])
        batches = draw_batches(cfg, info, spec["warmup"] + spec["steps"])
        result: dict[str, Any] = {
            "rank": info.rank, "world_size": info.world_size, "backend": info.backend, "device": str(info.device),
            "device_name": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
            "tf32_convs": torch.backends.cudnn.allow_tf32 and info.device.type == "cuda",
            "checksum": checksum(batches), "batch_size": cfg.data.batch_size, "variants": {},
        }
        contiguous = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, memory_format="contiguous"))
        for backend in spec["engines"]:
            runs = [(f"{backend}/{'cached' if chunk else 'plain'}", cfg, chunk) for chunk in spec["chunks"]]
            if spec["contiguous_too"]:  # the speed channels-last buys, beside it
                runs.append((f"{backend}/plain/contiguous", contiguous, None))
            for key, variant_cfg, chunk in runs:
                try:
                    result["variants"][key] = run_variant(variant_cfg, info, batches, backend, chunk, spec["warmup"])
                except Exception:  # one broken variant must not hide the others' figures
                    result["variants"][key] = {"error": traceback.format_exc(limit=-3)}
        atomic_write_json(Path(spec["out"]) / f"rank{info.rank}.json", result, indent=1)
    finally:
        cleanup()


# --- the launcher's side (inside gpu_check.py) ------------------------------------------------------------


def launch(out: Path, spec: dict[str, Any], world: int, timeout_s: float) -> list[dict[str, Any]]:
    """Run this file under torchrun with ``world`` processes on ``spec``; their results, rank 0 first."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps({**spec, "out": str(out)}, indent=1))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(Path(__file__).resolve()), str(out / "spec.json")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = out / "log.txt"
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the session this call started
            proc.wait()
            raise CheckFailed(f"no result after {timeout_s:.0f} s (log: {log})") from None
    if code != 0:
        raise CheckFailed(f"torchrun exit {code}: {last_error(log)} (log: {log})")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def last_error(log: Path) -> str:
    """The last line of ``log`` that names an exception (else its last line): the cause, in one line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    named = [line for line in lines if re.search(r"\b\w*(Error|Exception)\b", line)]
    return (named or lines or ["(empty log)"])[-1][:300]


def variant(ranks: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """One variant's figures (rank 0's); raises for a variant that failed."""
    v = ranks[0]["variants"][key]
    if "error" in v:
        raise CheckFailed(v["error"].strip().splitlines()[-1])
    return {**{k: v[k] for k in ("images_per_s", "peak_mb", "param_dtype", "memory_format")},
            "loss_first": v["losses"][0], "loss_last": v["losses"][-1], "losses": v["losses"],
            "conv_layouts": {k: v[k] for k in ("conv_inputs_channels_last", "conv_outputs_channels_last")}}


def agree(pairs: dict[str, tuple[list[float], list[float]]], rtol: float) -> dict[str, Any]:
    """Each pair's largest relative per-step loss difference; raises naming the worst pair when over ``rtol``."""
    diffs = {name: max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)) for name, (a, b) in pairs.items()}
    worst = max(diffs, key=diffs.__getitem__)
    if diffs[worst] > rtol:
        raise CheckFailed(f"{worst}: losses differ by {diffs[worst]:.3g} (relative) > {rtol:g}")
    return {**diffs, "rtol": rtol}


def channels_last(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Every convolution of the channels-last variants read and wrote channels-last; the speed-up over contiguous."""
    variants = ranks[0]["variants"]
    laid_out = {k: v for k, v in variants.items() if "error" not in v and v["memory_format"] != "contiguous"}
    bad = {k: min(v["conv_inputs_channels_last"], v["conv_outputs_channels_last"]) for k, v in laid_out.items()}
    bad = {k: share for k, share in bad.items() if share < 1.0}
    if bad:
        raise CheckFailed("convolutions not channels-last: " + ", ".join(f"{k} {share:.0%} of calls" for k, share in bad.items()))
    speedups = {}
    for key, v in variants.items():
        base = key.removesuffix("/contiguous")
        if base != key and base in laid_out and "error" not in v:
            speedups[f"{base.split('/')[0]}_x_contiguous"] = laid_out[base]["images_per_s"] / v["images_per_s"]
    return {"variants": len(laid_out), "device": ranks[0]["device"], **speedups}


def nccl(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The launches' process groups ran on nccl (what the trainer picks on CUDA)."""
    backends = sorted({r[0]["backend"] for r in runs})
    if backends != ["nccl"]:
        raise CheckFailed(f"process-group backend {', '.join(map(str, backends))}, expected nccl")
    return {"backend": "nccl", "device_name": runs[0][0]["device_name"]}


if __name__ == "__main__":
    main(Path(sys.argv[1]))
