"""GPU readiness in one call: every GPU path of the project run for real, in about five minutes on one GPU.

    .venv/bin/python benchmarks/gpu_check.py --json gpu-check.json        # on a GPU node (or benchmarks/gpu_check.sh)
    .venv/bin/python benchmarks/gpu_check.py --cpu --json cpu-check.json  # here: same code, GPU-only rows skipped

1. shards: a few hundred PTB-XL pages (``--data-root``'s ``ptbxl-500``, else the built-in sample) rendered as
   JPEG printouts and sharded at the training geometry (``shard --max-side`` 1024 for 768 × 544 views; 640 on CPU).
2. DALI: images/s of the decoder alone and of the loader's two augmented views, ``mixed`` (nvJPEG) beside
   ``cpu``, same shards, first batch not timed; ``x_cpu`` is the ratio.
3. pretraining steps under torchrun (``gpu_check_train.py``): the ``default`` model (``tiny`` with ``--cpu``),
   DeepSpeed and Accelerate, gradient caching off and on, fp32 and bf16 on 1 process, bf16 on 2 processes
   (nccl; two ranks on one GPU is tried and may be refused: then "unsupported"). images/s counts samples
   (two views each) of all ranks; peak memory is CUDA's allocator peak of the variant (CPU: the process's
   RSS high-water mark, cumulative). The loss rows compare the variants' per-step losses on identical inputs.
   Then the real loop (``dist-cardio pretrain``'s ``run``, DALI feeding it, gradient caching, checkpoint).
4. fine-tuning (two one-epoch stages, the first ``finetune_pages`` pages) from that checkpoint, predict and
   Grad-CAM explain, on the GPU. Pages are prepared on the CPU, one at a time (~0.1 s each), hence the subset.
The table and ``--json`` hold every figure; the exit status is 1 when a row failed (the first is named).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_cardio.commands.demo import CONFIGS, build_shards, finetune, pretrain, render_printouts, usable_cpus, write_json
from dist_cardio.data import contrastive_loader
from dist_cardio.data.shardset import IMAGE_EXTS, open_shard_set
from dist_cardio.downstream.finetune import load_finetune_config
from dist_cardio.downstream.gradcam import explain_files
from dist_cardio.downstream.predict import load_finetuned
from dist_cardio.downstream.predictions import predict_files, write_predictions
from dist_cardio.signals.records import SAMPLE_PTBXL
from dist_cardio.signals.render import RenderConfig
from dist_cardio.train.pretrain import PretrainConfig, load_pretrain_config
from batch_timing import timed  # benchmarks/ is on sys.path
from gpu_check_train import REPO, CheckFailed, agree, channels_last, launch, nccl, variant  # benchmarks/ is on sys.path

SHARED = REPO.parent / "shared" / "data"
NO_GPU = "not run: no GPU"
ENGINE_RTOL = 1e-3
"""Largest relative loss difference allowed between fp32 runs that must agree (engines; cached vs plain)."""
BF16_RTOL = 2e-2
"""Largest relative loss difference allowed between a bf16 run and the same engine in fp32."""
RENDER = RenderConfig(dpi=100, format="jpg", jpeg_quality=90)
"""1169 × 827 JPEG pages: nvJPEG decodes JPEG on the GPU (DALI's ``mixed`` PNG decode is not that path)."""
FINETUNE_STAGES = "stages=[{epochs: 1, lr: 0.001, groups: 1}, {epochs: 1, lr: 0.0003, groups: all}]"
SHARED_GPU_TIMEOUT_S = 120.0
"""Two ranks on one GPU may be refused by NCCL; should it hang instead, this bounds what it costs."""


@dataclass(frozen=True)
class Profile:
    """Sizes of one check: the GPU's (``default`` model at 768 × 544) or the CPU's (``tiny``, seconds a step)."""

    pretrain: str
    finetune: str
    pages: int
    finetune_pages: int
    max_side: int
    batch: int
    """Samples per rank and step (two views each)."""
    chunk: int
    """Images per forward with gradient caching on."""
    warmup: int
    steps: int
    threads: int
    layout: str
    """``engine.memory_format`` of the torchrun steps: the GPU's channels-last runs on the CPU too."""


GPU = Profile("default.yaml", "default.yaml", pages=384, finetune_pages=128, max_side=1024, batch=64, chunk=32, warmup=2, steps=5,
              threads=8, layout="auto")
CPU = Profile("tiny.yaml", "tiny.yaml", pages=64, finetune_pages=64, max_side=640, batch=8, chunk=8, warmup=1, steps=3,
              threads=1, layout="channels_last")


class Checks:
    """Runs each check once and records its status and figures; a failure never stops the checks after it."""

    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu
        self.rows: list[dict[str, Any]] = []

    def status(self, name: str) -> str | None:
        return next((r["status"] for r in self.rows if r["name"] == name), None)

    def run(self, name: str, fn: Callable[[], Any], *, gpu_only: bool = False, needs: Sequence[str] = (),
            optional: bool = False, timed: bool = True, show: Callable[[Any], dict] | None = None) -> Any:
        """``fn()``'s result, or None when it did not run or failed. The row's figures: ``show(result)``, else the
        result when it is a dict. ``optional``: a failure reads "unsupported" and fails nothing; ``timed``: add seconds.
        """
        if gpu_only and not self.gpu:
            return self._add(name, NO_GPU)
        missing = [n for n in needs if self.status(n) != "ok"]
        if missing:
            return self._add(name, f"not run: {missing[0]} did not pass")
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # every failure becomes a row; the next check still runs
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            reason = (text if isinstance(e, CheckFailed) else f"{type(e).__name__}: {text}")[:500]
            return self._add(name, ("unsupported: " if optional else "FAILED: ") + reason)
        timing = {"seconds": time.perf_counter() - start} if timed else {}
        self._add(name, "ok", **{**timing, **(show(result) if show else result if isinstance(result, dict) else {})})
        print(f"   {name}: ok", flush=True)
        return result

    def _add(self, name: str, status: str, **figures: Any) -> None:
        self.rows.append({"name": name, "status": status, "figures": figures})
        if status != "ok":
            print(f"   {name}: {status}", flush=True)

    def first_failure(self) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["status"].startswith("FAILED")), None)

    def table(self) -> str:
        lines = [f"{'check':<46} {'status':<16} figures"]
        for row in self.rows:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in row["figures"].items()
                             if not isinstance(v, (list, dict)) and not k.endswith("_path"))  # paths: JSON only
            lines.append(f"{row['name']:<46} {row['status']:<16} {shown}".rstrip())
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "n/a" if value is None else str(value)


# --- 1. shards ----------------------------------------------------------------------------------------------


def build_data(source: Path, work: Path, prof: Profile) -> dict[str, Any]:
    """Render ``prof.pages`` printouts of ``source`` and shard them (both cached in ``work``; a re-run reuses them)."""
    render = work / "data" / f"{source.name}-{prof.pages}"
    shards = render / f"shards-{prof.max_side}"
    pages = render_printouts(source, render, RENDER, workers=usable_cpus(), limit=prof.pages)
    # One shard worker: a pool re-imports this script (torch, DALI, ...) per process, which costs more than it saves.
    summary = build_shards([render / "images"], shards, labels=render / "labels.csv", workers=1,
                           max_side=prof.max_side, progress=False)
    totals = summary["totals"]
    return {"pages": pages["images"], "samples": totals["samples"], "shards": totals["shards"],
            "max_side": prof.max_side, "render_path": str(render), "shards_path": str(shards)}


# --- 2. DALI ------------------------------------------------------------------------------------------------


def dali_decode(shards: Path, device: str, threads: int, batch: int = 32) -> dict[str, Any]:
    """Images/s of DALI's image decoder alone on whole pages (``cpu``, or ``mixed``: nvJPEG on GPU 0)."""
    from nvidia.dali import fn, pipeline_def, types

    view = open_shard_set(shards)

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=0 if device == "mixed" else None, seed=0)
    def decode():
        encoded = fn.readers.webdataset(paths=[str(t) for t in view.tars], index_paths=[str(i) for i in view.indexes],
                                        ext=";".join(IMAGE_EXTS), name="reader")
        return fn.decoders.image(encoded, device=device, output_type=types.RGB)

    pipe = decode()
    pipe.build()
    runs = max(4, 2 * -(-view.total // batch))
    pipe.run()  # start-up (and nvJPEG's first allocation) not timed
    start = time.perf_counter()
    for _ in range(runs - 1):
        pipe.run()
    _sync_all(device == "mixed")
    return {"images_per_s": (runs - 1) * batch / (time.perf_counter() - start), "threads": threads}


def dali_views(cfg: PretrainConfig, device: str, batch: int = 32, batches: int = 10) -> dict[str, Any]:
    """Images/s of the project's DALI loader (two augmented views per image) on ``device`` (``cpu``/``gpu``),
    timed by ``batch_timing.timed`` (fixed batches over epochs: a small set is not timed on a few stragglers)."""
    data = dataclasses.replace(cfg.data, backend="dali", device=device, batch_size=batch)
    loader = contrastive_loader(data, cfg.augment, 0, 1)
    return {"images_per_s": timed(loader, batches)["samples_per_s"], "decode": loader.plan.decode,
            "views": "x".join(map(str, cfg.augment.shape))}


def _sync_all(cuda: bool) -> None:
    """Wait for every stream of the device (DALI works on its own): a clock read after this is fair."""
    if cuda:
        torch.cuda.synchronize()


def ratio(checks: Checks, gpu_row: str, cpu_row: str) -> None:
    """Put ``x_cpu`` (GPU images/s over CPU images/s) on the GPU row."""
    rows = {r["name"]: r["figures"] for r in checks.rows}
    if checks.status(gpu_row) == "ok" and checks.status(cpu_row) == "ok":
        rows[gpu_row]["x_cpu"] = rows[gpu_row]["images_per_s"] / rows[cpu_row]["images_per_s"]


# --- 3. pretraining under torchrun ---------------------------------------------------------------------------


def loss_checks(checks: Checks, runs: dict[str, list[dict]], names: dict[str, str]) -> None:
    """Engines agree in fp32, caching changes nothing in fp32, bf16 stays within BF16_RTOL of fp32."""
    def losses(precision: str, key: str) -> list[float]:
        return runs[precision][0]["variants"][key]["losses"]

    def bf16_vs_fp32() -> dict[str, Any]:
        if runs["bf16"][0]["checksum"] != runs["fp32"][0]["checksum"]:
            raise CheckFailed("the fp32 and bf16 processes drew different batches (loader not deterministic)")
        return agree({k: (losses("bf16", k), losses("fp32", k)) for k in VARIANTS}, BF16_RTOL)

    fp32 = [names["fp32"], *(VARIANT_ROW.format(key=k, precision="fp32", world=1) for k in VARIANTS)]
    checks.run("loss: deepspeed = accelerate (fp32)", needs=fp32, timed=False, fn=lambda: agree(
        {m: (losses("fp32", f"deepspeed/{m}"), losses("fp32", f"accelerate/{m}")) for m in ("plain", "cached")}, ENGINE_RTOL))
    checks.run("loss: cached = plain (fp32)", needs=fp32, timed=False, fn=lambda: agree(
        {e: (losses("fp32", f"{e}/cached"), losses("fp32", f"{e}/plain")) for e in ("deepspeed", "accelerate")}, ENGINE_RTOL))
    bf16 = [names["bf16"], *(VARIANT_ROW.format(key=k, precision="bf16", world=1) for k in VARIANTS)]
    checks.run("loss: bf16 ≈ fp32", needs=fp32 + bf16, timed=False, fn=bf16_vs_fp32)


VARIANTS = ("deepspeed/plain", "deepspeed/cached", "accelerate/plain", "accelerate/cached")
CONTIGUOUS = ("deepspeed/plain/contiguous", "accelerate/plain/contiguous")
"""Beside the 1-process bf16 launch's channels-last variants: what the layout buys."""
VARIANT_ROW = "pretrain {key} {precision} ×{world}"
LAUNCH_FIGURES = ("backend", "device_name", "tf32_convs", "batch_size", "world_size")


def pretrain_checks(checks: Checks, work: Path, prof: Profile, shards: str, timeout_s: float) -> None:
    """Both engines × caching on 1 process (fp32, bf16) and 2 processes (bf16), then what their results show."""
    shared_gpu = checks.gpu and torch.cuda.device_count() < 2
    runs: dict[str, list[dict]] = {}
    names: dict[str, str] = {}
    for world, precision in ((1, "fp32"), (1, "bf16"), (2, "bf16")):
        name = f"torchrun {world} × {precision}" + (" (ranks share GPU 0)" if world == 2 and shared_gpu else "")
        if world == 1:
            names[precision] = name
        layouts = world == 1 and precision == "bf16"
        spec = {"config": str(CONFIGS / "pretrain" / prof.pretrain), "engines": ["deepspeed", "accelerate"],
                "chunks": [None, prof.chunk], "warmup": prof.warmup, "steps": prof.steps, "contiguous_too": layouts,
                "overrides": [f"data.shards={shards}", f"data.batch_size={prof.batch}", f"data.num_threads={prof.threads}",
                              f"engine.precision={precision}", f"engine.memory_format={prof.layout}", "model.dropout=0.0"]}
        out = work / "runs" / f"torchrun-{world}x{precision}"
        optional = world == 2 and shared_gpu
        limit = min(timeout_s, SHARED_GPU_TIMEOUT_S) if optional else timeout_s
        ranks = checks.run(name, lambda: launch(out, spec, world, limit), needs=["shards"], optional=optional, show=lambda r: {k: r[0][k] for k in LAUNCH_FIGURES})
        if world == 1 and ranks:
            runs[precision] = ranks
        for key in VARIANTS + (CONTIGUOUS if layouts else ()):
            checks.run(VARIANT_ROW.format(key=key, precision=precision, world=world), lambda: variant(ranks, key),
                       needs=[name], timed=False)
    one = [names["fp32"], names["bf16"]]
    checks.run("nccl", gpu_only=True, needs=one, timed=False, fn=lambda: nccl(list(runs.values())))
    checks.run("channels-last (bf16)", needs=[names["bf16"]], timed=False, fn=lambda: channels_last(runs["bf16"]))
    loss_checks(checks, runs, names)


def real_pretrain(work: Path, prof: Profile, shards: str) -> dict[str, Any]:
    """The trainer's own loop for a few steps (loader, caching, auto precision and layout, checkpoint)."""
    steps = prof.warmup + prof.steps
    cfg = load_pretrain_config(CONFIGS / "pretrain" / prof.pretrain, [
        f"data.shards={shards}", f"out={work / 'runs' / 'pretrain'}", f"steps={steps}", "epochs=null",
        f"data.batch_size={prof.batch}", f"data.num_threads={prof.threads}", f"grad_cache_chunk={prof.chunk}",
        f"log_every={steps}", f"checkpoint.every={steps}", "schedule.warmup_fraction=0.2", "monitor.shards="])
    summary = pretrain(cfg)
    row = json.loads((Path(cfg.out) / "metrics.jsonl").read_text().splitlines()[-1])
    return {"steps": summary["step"], "images_per_s": row["images_per_s"], "data_s": row["data_s"],
            "loss": summary["final_loss"], "checkpoint_path": summary["checkpoint"]}


# --- 4. downstream ------------------------------------------------------------------------------------------


def finetune_check(work: Path, prof: Profile, render: Path, device: str) -> dict[str, Any]:
    """Two one-epoch unfreezing stages from the real pretraining checkpoint, on ``device``, on the first pages."""
    rows = (render / "labels.csv").read_text().splitlines()
    subset = render / f"finetune-{prof.finetune_pages}.csv"  # same folder: the relative image paths still hold
    subset.write_text("\n".join(rows[: prof.finetune_pages + 1]) + "\n")
    cfg = load_finetune_config(CONFIGS / "finetune" / prof.finetune, [FINETUNE_STAGES, "n_bootstrap=100", f"device={device}"])
    summary = finetune(cfg, work / "runs" / "pretrain", subset, work / "runs" / "finetune", progress=False)
    return {"train_images": summary["images"]["train"], "best_epoch": summary["best_epoch"], "device": device}


def predict_check(work: Path, render: Path, device: str) -> dict[str, Any]:
    """Batched prediction of the rendered pages (decode + page crop + forward) with the fine-tuned model."""
    model = load_finetuned(work / "runs" / "finetune", device)
    files = sorted((render / "images").glob("*.jpg"))[:64]
    start = time.perf_counter()
    results, errors = predict_files(model, files, batch_size=32, progress=False)
    seconds = time.perf_counter() - start
    write_predictions(work / "runs" / "predictions.csv", model, results, errors)
    if errors or not results:
        raise CheckFailed(f"{len(errors)} of {len(files)} pages unreadable")
    return {"images": len(results), "images_per_s": len(results) / seconds, "device": str(model.device)}


def explain_check(work: Path, render: Path, device: str) -> dict[str, Any]:
    """Grad-CAM overlays and the shortcut audit of four pages on ``device``."""
    out = work / "runs" / "explain"
    audit = explain_files(load_finetuned(work / "runs" / "finetune", device), sorted((render / "images").glob("*.jpg"))[:4],
                          out, progress=False)
    missing = [r["overlay"] for r in audit["per_image"] if not (out / r["overlay"]).is_file()]
    if missing or not audit["images"]:
        raise CheckFailed(f"overlays missing: {missing or 'all'}")
    return {"images": audit["images"], "mean_outside_grid_share": audit["mean_outside_grid_share"], "device": device}


# --- the run ------------------------------------------------------------------------------------------------


def run_checks(args: argparse.Namespace, gpu: bool) -> Checks:
    prof = GPU if gpu else CPU
    work = args.work.resolve()
    shutil.rmtree(work / "runs", ignore_errors=True)  # an earlier check's outputs: every run starts afresh
    ptbxl = args.data_root / "ptbxl-500" if args.data_root else None
    source = ptbxl if ptbxl is not None and ptbxl.is_dir() else SAMPLE_PTBXL
    checks = Checks(gpu)
    data = checks.run("shards", lambda: build_data(source, work, prof)) or {}
    shards, render = data.get("shards_path", ""), Path(data.get("render_path", "."))
    cfg = load_pretrain_config(CONFIGS / "pretrain" / prof.pretrain, [f"data.shards={shards}", f"data.num_threads={prof.threads}"])
    checks.run("dali decode, cpu", lambda: dali_decode(Path(shards), "cpu", prof.threads), needs=["shards"])
    checks.run("dali decode, mixed (GPU)", lambda: dali_decode(Path(shards), "mixed", prof.threads), gpu_only=True, needs=["shards"])
    ratio(checks, "dali decode, mixed (GPU)", "dali decode, cpu")
    checks.run("dali two views, cpu", lambda: dali_views(cfg, "cpu"), needs=["shards"])
    checks.run("dali two views, mixed (GPU)", lambda: dali_views(cfg, "gpu"), gpu_only=True, needs=["shards"])
    ratio(checks, "dali two views, mixed (GPU)", "dali two views, cpu")
    pretrain_checks(checks, work, prof, shards, args.timeout)
    checks.run("pretrain run (real loop)", lambda: real_pretrain(work, prof, shards), needs=["shards"])
    device = "cuda" if gpu else "cpu"
    checks.run("finetune", lambda: finetune_check(work, prof, render, device), needs=["pretrain run (real loop)"])
    checks.run("predict", lambda: predict_check(work, render, device), needs=["finetune"])
    checks.run("explain", lambda: explain_check(work, render, device), needs=["finetune"])
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (tiny model; GPU-only rows are skipped)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help=f"folder holding ptbxl-500 (default: {SHARED} on a GPU when present; the built-in sample otherwise)")
    parser.add_argument("--work", type=Path, default=Path("gpu-check"), help="pages and shards (kept) and run outputs (redone)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds for each torchrun launch (default 240)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks torch or DALI for a device
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; run with --cpu to check the CPU paths", file=sys.stderr)
        return 2
    elif args.data_root is None and SHARED.is_dir():
        args.data_root = SHARED
    started = time.perf_counter()
    checks = run_checks(args, gpu=not args.cpu)
    seconds = time.perf_counter() - started
    print("\n" + checks.table())
    failed = checks.first_failure()
    skipped = [r["name"] for r in checks.rows if r["status"] == NO_GPU]
    print(f"\n{len(checks.rows)} checks in {seconds:.0f} s" + (f"; GPU-only, not run: {', '.join(skipped)}" if skipped else ""))
    if args.json:
        write_json(args.json, {
            "mode": "cpu" if args.cpu else "gpu", "device": torch.cuda.get_device_name(0) if not args.cpu else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "seconds": seconds,
            "profile": dataclasses.asdict(GPU if not args.cpu else CPU),
            "tolerances": {"engine_rtol": ENGINE_RTOL, "bf16_rtol": BF16_RTOL}, "rows": checks.rows,
            "not_run_no_gpu": skipped, "failed": failed["name"] if failed else None})
        print(f"wrote {args.json}")
    if failed:
        print(f"gpu_check: FAILED at {failed['name']}: {failed['status'].removeprefix('FAILED: ')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
