"""Training-step throughput on CPU: 1 vs 2 processes, where the step time goes, memory vs batch.

Measures the trainer's step (forward of both views, NT-Xent with global negatives, backward, gradient
all-reduce, LARS) through the real engine, on synthetic inputs so that the decoder is out of the picture
(``benchmarks/`` of the loader measures that). An "image" is one dataset sample, i.e. two augmented
views. Every process runs one thread; the 2-process run keeps the per-rank batch (weak scaling), so
scaling efficiency = throughput(2) / (2 × throughput(1)) (target ≥ 0.85). Beside it, two independent
1-process runs started together show what the two cores give two jobs that never communicate: the
machine's own ceiling for that ratio. The share of the step spent
in loss + gather + LARS should stay < 10 % (they are the parts the data-parallel design adds).
Peak memory is the process's high-water mark during one step (RSS on CPU, allocator on CUDA), one
fresh process per row, with and without gradient caching. Last, "feeding" (``feeding.py``): does the real
cpu-small loop wait for its loader, on rendered PTB-XL pages and on the real full-size printouts, and how
close does fine-tuning come to its model's own throughput (``data_wait_share``, ``loader_images_per_s``,
``model_only_images_per_s``, ``finetune_data_ratio``).

    .venv/bin/python benchmarks/train.py --quick
    .venv/bin/python benchmarks/train.py --json train.json           # both sizes, 1 and 2 processes
    .venv/bin/python benchmarks/train.py --feeding-only --json feed.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dist_cardio.distributed import DistInfo, barrier, run_local_processes
from dist_cardio.train.engines import EngineConfig, build_engine
from dist_cardio.train.gradcache import cached_contrastive_step
from dist_cardio.train.lars import LarsConfig, build_lars
from dist_cardio.train.losses import LossConfig, make_loss
from dist_cardio.model import SimCardioNet, count_flops, count_parameters, preset
from dist_cardio.train.pretrain import load_pretrain_config

import feeding as feed  # benchmarks/ is the script's own folder

H100_BF16_DENSE = 990e12  # FLOP/s, dense bf16 tensor cores (SXM datasheet)
ASSUMED_MFU = 0.3  # a small CNN + attention at modest batch rarely does better
CPU_DECODE_PER_THREAD = 40  # full-size printouts, DALI CPU decode, one thread (ENVIRONMENT.md)


def _views(batch: int, shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *shape, generator=g), torch.rand(batch, 3, *shape, generator=g)


def _engine(info: DistInfo, size: str, backend: str, batch: int):
    torch.manual_seed(0)
    model = SimCardioNet(preset(size))
    optimizer = build_lars(model, LarsConfig())
    return build_engine(EngineConfig(backend=backend), model, optimizer, info, batch), optimizer


def throughput(info: DistInfo, size: str, backend: str, batch: int, steps: int, warmup: int) -> dict:
    """Images/s of this rank, and the step split into forward / wait for the other ranks / loss+gather /
    backward / all-reduce / LARS (the timing barrier after the forward is the only addition to the step)."""
    engine, optimizer = _engine(info, size, backend, batch)
    loss_fn = make_loss(LossConfig())
    input_shape = preset(size).input_shape
    lars_s = [0.0]
    t_lars = [0.0]
    optimizer.register_step_pre_hook(lambda *_: t_lars.__setitem__(0, time.perf_counter()))
    optimizer.register_step_post_hook(lambda *_: lars_s.__setitem__(0, lars_s[0] + time.perf_counter() - t_lars[0]))
    parts = dict.fromkeys(("forward", "wait", "loss_gather", "backward", "allreduce_lars"), 0.0)
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            parts = dict.fromkeys(parts, 0.0)
            lars_s[0] = 0.0
            start = time.perf_counter()
        v1, v2 = _views(batch, input_shape, 1000 * i + info.rank)
        images = engine.prepare(torch.cat([v1, v2]))
        t0 = time.perf_counter()
        z = engine.model(images)
        t1 = time.perf_counter()
        barrier()  # rank skew (a busy core) shows up here, not in the loss's gather
        t1b = time.perf_counter()
        zl = z.detach().requires_grad_()
        loss = loss_fn(zl[:batch], zl[batch:])
        (grad_z,) = torch.autograd.grad(loss, zl)  # the gather's backward is a collective: timed here
        t2 = time.perf_counter()
        engine.backward((z * grad_z.to(z.dtype)).sum())
        t3 = time.perf_counter()
        engine.step()
        t4 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t1b - t1, t2 - t1b, t3 - t2, t4 - t3)):
            parts[key] += dt
    elapsed = time.perf_counter() - start
    parts["lars"] = lars_s[0]
    parts["allreduce"] = parts.pop("allreduce_lars") - lars_s[0]
    return {"images_per_s": steps * batch / elapsed, "step_s": elapsed / steps, **{k: v / steps for k, v in parts.items()}}


def throughput_at(info: DistInfo, threads: int, *args) -> dict:
    """``throughput`` at ``threads`` intra-op threads (``run_local_processes`` starts every process at one)."""
    torch.set_num_threads(threads)
    return throughput(info, *args)


def independent_pair(size: str, backend: str, batch: int, steps: int, warmup: int) -> list[float]:
    """Images/s of two single-process runs started together: what two cores give two unrelated jobs.

    Their ratio to 2 × the lone run is the ceiling of any 2-process scaling on this machine (cores share
    caches, memory bandwidth and, on a VM, the host), before a single byte is communicated.
    """
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_local_processes, throughput, 1, size, backend, batch, steps, warmup, timeout_s=3600)
                for _ in range(2)]
        return [run.result()[0]["images_per_s"] for run in runs]


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_memory(info: DistInfo, size: str, backend: str, batch: int, chunk: int | None) -> dict:
    """Extra peak memory of one training step over the process's state before it (fresh process)."""
    engine, _ = _engine(info, size, backend, batch)
    v1, v2 = _views(batch, preset(size).input_shape, 0)
    v1, v2 = engine.prepare(v1), engine.prepare(v2)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    before = _peak_bytes(engine.device)
    cached_contrastive_step(engine.model, v1, v2, chunk or 2 * batch, make_loss(LossConfig()), engine.backward, engine.no_sync)
    engine.step()
    return {"peak_mb": (_peak_bytes(engine.device) - before) / 2**20}


def gpu_estimate(size: str) -> str:
    cfg = preset(size)
    flops = 3 * 2 * count_flops(cfg)  # forward + backward ≈ 3 × forward, two views per image
    ceiling = H100_BF16_DENSE / flops
    return (
        f"{size}: {count_parameters(SimCardioNet(cfg)) / 1e6:.2f} M params, {flops / 1e9:.3g} GFLOP per image "
        f"(2 views × fwd+bwd); H100 bf16 dense ceiling {ceiling:,.0f} images/s, ~{ASSUMED_MFU * ceiling:,.0f} at "
        f"{ASSUMED_MFU:.0%} MFU. Feeding that takes ~{ASSUMED_MFU * ceiling:,.0f} page decodes/s per GPU "
        f"(~{ASSUMED_MFU * ceiling / CPU_DECODE_PER_THREAD:,.0f} CPU threads at {CPU_DECODE_PER_THREAD}/s): the JPEG "
        f"decoder, not the model, bounds the step; decode on the GPU (DALI mixed) and store shards near "
        f"training resolution (shard --max-side)."
    )


def feeding(args: argparse.Namespace) -> dict:
    """The feeding section: the shipped cpu-small loop on real shards against its loader and model alone."""
    steps = args.steps or (6 if args.quick else 16)
    batch = load_pretrain_config(feed.PRETRAIN, ["data.shards=x"]).data.batch_size
    shutil.rmtree(args.work / "runs", ignore_errors=True)
    sets = feed.shard_sets(args.work, workers=2)
    threads = torch.get_num_threads()  # what the real loop below gets: run_local_processes alone would pin one
    model = run_local_processes(throughput_at, 1, threads, "cpu-small", args.engine, batch, steps, 1,
                                timeout_s=3600)[0]["images_per_s"]
    print(f"\nfeeding: cpu-small pretraining (batch {batch}, shipped config, {threads} threads) on real shards; "
          f"model alone {model:.1f} images/s")
    print(f"{'shards':<12} {'loader img/s':>13} {'loop img/s':>11} {'data ms/step':>13} {'step ms':>8} {'data wait':>10}")
    per_set = {}
    for name, shards in sets.items():
        loader = feed.loader_rate(shards, steps)
        loop = feed.pretrain_feed(shards, steps, args.work / "runs")
        per_set[name] = {"loader_images_per_s": loader, **loop}
        print(f"{name:<12} {loader:>13.1f} {loop['images_per_s']:>11.1f} {1e3 * loop['data_s']:>13.0f} "
              f"{1e3 * loop['step_s']:>8.0f} {loop['data_wait_share']:>10.1%}")
    tune = feed.finetune_feed(sets["ptbxl-pages"], batches=4 if args.quick else 8)
    print(f"fine-tuning (cpu-small, batch 16, {tune['finetune_images']} cached pages, {tune['finetune_workers']} workers): "
          f"{tune['finetune_images_per_s']:.1f} images/s fed vs {tune['finetune_model_only_images_per_s']:.1f} model alone "
          f"= {tune['finetune_data_ratio']:.2f} (target ≥ 0.8)")
    worst = max(per_set.values(), key=lambda r: r["data_wait_share"])
    return {"data_wait_share": worst["data_wait_share"], "loader_images_per_s": min(r["loader_images_per_s"] for r in per_set.values()),
            "model_only_images_per_s": model, "feeding": per_set, **tune}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="cpu-small only, few steps, small memory table")
    parser.add_argument("--engine", choices=("deepspeed", "accelerate"), default="deepspeed")
    parser.add_argument("--steps", type=int, help="timed steps per run (default 20, --quick 5)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--feeding-only", action="store_true", help="only the feeding section (real shards, real loop)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-train"), help="pages, shards and runs of the feeding section")
    args = parser.parse_args()
    if args.feeding_only:
        results = {"engine": args.engine, **feeding(args)}
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
            print(f"wrote {args.json}")
        return

    sizes = {"cpu-small": 32} if args.quick else {"cpu-small": 32, "default": 8}  # per-rank batch on CPU
    steps = args.steps or (5 if args.quick else 20)
    warmup = 1 if args.quick else 3
    results: dict = {"engine": args.engine, "steps": steps, "sizes": {}}
    print(f"{'size':<10} {'procs':>5} {'batch/rank':>10} {'img/s/proc':>11} {'img/s total':>12} "
          f"{'fwd ms':>8} {'wait ms':>8} {'loss+gather ms':>15} {'bwd ms':>8} {'allreduce ms':>13} {'LARS ms':>8}")
    for size, batch in sizes.items():
        row: dict = {}
        for procs in (1, 2):
            ranks = run_local_processes(throughput, procs, size, args.engine, batch, steps, warmup, timeout_s=3600)
            per_proc = sum(r["images_per_s"] for r in ranks) / procs
            mean = {k: sum(r[k] for r in ranks) / procs for k in ranks[0]}
            row[f"{procs}proc"] = {**mean, "images_per_s_total": per_proc * procs}
            print(f"{size:<10} {procs:>5} {batch:>10} {per_proc:>11.1f} {per_proc * procs:>12.1f} "
                  f"{1e3 * mean['forward']:>8.1f} {1e3 * mean['wait']:>8.1f} {1e3 * mean['loss_gather']:>15.1f} "
                  f"{1e3 * mean['backward']:>8.1f} "
                  f"{1e3 * mean['allreduce']:>13.1f} {1e3 * mean['lars']:>8.1f}")
        # The machine's own ceiling: two single-process runs at once, no process group between them.
        alone = independent_pair(size, args.engine, batch, steps, warmup)
        row["independent"] = {"images_per_s": alone, "images_per_s_total": sum(alone)}
        print(f"{size:<10} {'2 × 1':>5} {batch:>10} {sum(alone) / 2:>11.1f} {sum(alone):>12.1f}   "
              "(two independent 1-process runs at once: no gather, no all-reduce)")
        two, one = row["2proc"], row["1proc"]["images_per_s_total"]
        row["scaling_efficiency"] = two["images_per_s_total"] / (2 * one)
        row["independent_efficiency"] = sum(alone) / (2 * one)
        row["loss_gather_lars_share"] = (two["loss_gather"] + two["lars"]) / two["step_s"]
        results["sizes"][size] = row
        print(f"{size}: scaling efficiency {row['scaling_efficiency']:.3f} (target ≥ 0.85); two independent "
              f"processes reach {row['independent_efficiency']:.3f} (the shared cores' ceiling); "
              f"loss+gather+LARS {row['loss_gather_lars_share']:.1%} of the 2-process step (target < 10%)")

    size = "cpu-small"
    batches = (32, 64) if args.quick else (32, 64, 128, 256)
    chunk = 32
    memory = []
    print(f"\npeak memory of one step, {size}, 1 process (global batch = batch): no caching vs chunks of {chunk} images")
    print(f"{'batch':>6} {'full MB':>9} {'cached MB':>10}")
    for batch in batches:
        full = run_local_processes(peak_memory, 1, size, args.engine, batch, None, timeout_s=3600)[0]["peak_mb"]
        cached = run_local_processes(peak_memory, 1, size, args.engine, batch, chunk, timeout_s=3600)[0]["peak_mb"]
        memory.append({"global_batch": batch, "chunk": chunk, "full_mb": full, "cached_mb": cached})
        print(f"{batch:>6} {full:>9.0f} {cached:>10.0f}")
    results["memory"] = memory

    print("\nGPU on paper:")
    for size in sizes:
        print("  " + gpu_estimate(size))
    results.update(feeding(args))
    headline = results["sizes"]["default" if "default" in results["sizes"] else "cpu-small"]
    results.update({
        "images_per_s_1proc": headline["1proc"]["images_per_s_total"],
        "images_per_s_2proc": headline["2proc"]["images_per_s_total"],
        "scaling_efficiency": headline["scaling_efficiency"],
        "independent_efficiency": headline["independent_efficiency"],
        "loss_gather_lars_share": headline["loss_gather_lars_share"],
    })
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
