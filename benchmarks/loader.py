"""Loader throughput at the shipped pretraining geometry: every backend × decode mode of the project's loader.

What runs: ``dist_cardio.data.contrastive_loader`` exactly as pretraining builds it from
``configs/pretrain/cpu-small.yaml`` (512 × 352 views, batch 32, num_threads 2, shuffled), with only
``backend``, ``decode`` and ``device: cpu`` changed per contender: dali/full, dali/crop, torchvision/reduced,
torchvision/full, plus whatever ``backend: auto`` resolves to when that is none of them (DALI ``mixed`` on a
GPU). What is timed: one warm-up batch (pipeline build, worker start-up: not counted), then a fixed number
of batches (``--batches``) over as many epochs as they take, so a set with fewer samples than two batches is
timed over several epochs instead of a few stragglers; each epoch turn (a fresh DALI pipeline and its
shuffle-buffer fill, the DataLoader's refill) costs here what it costs a training run. A set smaller than
one batch is refused, as the loader refuses it. Samples/s counts pairs of views (one image each). The
contenders run interleaved in a rotating order, one at a time (workers are reaped before the next starts),
median of ``--repeat``.

Sets (rendered and sharded once, cached under ``--work``):
  real_printouts  the 52 real printouts of ``ecg-printouts`` sharded as they are (no ``--max-side``): 51
                  samples (two files are one image), mostly ~1200 × 600 JPEG, a few pages up to 3776 × 1898,
                  PNG and BMP among them; fewer than two batches of 32, so every timed batch is an epoch;
  ptbxl_640       PTB-XL pages rendered like ``dist-cardio render sample`` (200 dpi PNG) and sharded with
                  ``--max-side 640``, the training-resolution copy the cpu-small recipe asks for.

    .venv/bin/python benchmarks/loader.py --json loader.json       # both sets, 8 batches, 3 repeats
    .venv/bin/python benchmarks/loader.py --quick                  # 4 batches, one run
    .venv/bin/python benchmarks/loader.py --shards mine=SHARDS --set data.batch_size=16
    .venv/bin/python benchmarks/loader.py --profile                # CPU ms per sample on one thread, by stage
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dist_cardio.commands.demo import MAX_SIDE, usable_cpus
from dist_cardio.data import AugmentConfig, LoaderConfig, ShardDataError, ShardLoader, contrastive_loader
from dist_cardio.data.shardset import IMAGE_EXTS, open_shard_set
from dist_cardio.data.torchvision_pipeline import SampleViews, decode_page
from dist_cardio.shard import ShardConfig, shard_inputs
from dist_cardio.signals.records import SAMPLE_PTBXL
from dist_cardio.signals.render import RenderConfig, render_dataset
from dist_cardio.train.pretrain import load_pretrain_config

from batch_timing import timed  # benchmarks/ is the script's own folder

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pretrain" / "cpu-small.yaml"
DATA = REPO.parent / "shared" / "data"
CONTENDERS = (("dali", "full", "cpu"), ("dali", "crop", "cpu"), ("torchvision", "reduced", "cpu"),
              ("torchvision", "full", "cpu"))
"""(backend, decode, device): every CPU combination the loader offers."""


def contender_name(c: tuple[str, str, str]) -> str:
    return f"{c[0]}/{c[1]}" + ("" if c[2] == "cpu" else f"@{c[2]}")


# --- data ------------------------------------------------------------------------------------------------


def prepare(work: Path, pages: int, ptbxl: Path, printouts: Path) -> dict[str, Path]:
    """The two shard sets, made once: real printouts as stored, rendered PTB-XL pages at ≤ ``MAX_SIDE`` px (the
    demo's training-resolution copy: every pixel the cpu-small views need)."""
    rendered = work / f"ptbxl-pages-{pages}"
    workers = usable_cpus()
    render_dataset(ptbxl, rendered, RenderConfig(), workers=workers, limit=pages)  # = `dist-cardio render`: 200 dpi PNG
    sets = {"real_printouts": (printouts, work / "shards-real-printouts", None),
            f"ptbxl_{MAX_SIDE}": (rendered / "images", work / f"shards-ptbxl-{pages}-{MAX_SIDE}", MAX_SIDE)}
    out = {}
    for name, (images, shards, max_side) in sets.items():
        if not (shards / "manifest.json").is_file():
            shard_inputs([images], shards, ShardConfig(max_side=max_side, workers=workers, progress=False))
        out[name] = shards
    return out


def build(shards: Path, data: LoaderConfig, aug: AugmentConfig, contender: tuple[str, str, str]) -> ShardLoader:
    backend, decode, device = contender
    cfg = replace(data, shards=str(shards), backend=backend, decode=decode, device=device)
    return contrastive_loader(cfg, aug, 0, 1)


def auto_choice(shards: Path, data: LoaderConfig, aug: AugmentConfig) -> tuple[tuple[str, str, str], int, int]:
    """What ``backend: auto`` / ``decode: auto`` resolve to for this set (asked of the loader itself), the set's
    sample count and its batches per epoch. Refuses a set smaller than one batch, naming it."""
    try:
        loader = build(shards, data, aug, ("auto", "auto", data.device))
    except ShardDataError as e:
        raise SystemExit(f"loader benchmark: {e}") from None
    plan = loader.plan
    return (plan.backend, plan.decode, plan.device), plan.shard_set.total, plan.batches


# --- timing ----------------------------------------------------------------------------------------------


def run_one(shards: Path, data: LoaderConfig, aug: AugmentConfig, contender: tuple[str, str, str], batches: int) -> dict:
    """One contender from a fresh loader; its DALI threads and DataLoader workers are gone when this returns."""
    loader = build(shards, data, aug, contender)
    try:
        return timed(loader, batches)
    finally:
        del loader
        gc.collect()
        _reap_workers()


def _reap_workers(timeout_s: float = 60.0) -> None:
    """Wait for exiting worker processes, so they take no core from the next contender."""
    deadline = time.monotonic() + timeout_s
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)


def dali_installed() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def compare(sets: dict[str, Path], data: LoaderConfig, aug: AugmentConfig, batches: int, repeat: int) -> tuple[list, dict]:
    """Rows (one per set × contender) and, per set, the auto choice and the fastest contender."""
    rows, summary = [], {}
    for name, path in sets.items():
        auto, samples, per_epoch = auto_choice(path, data, aug)
        contenders = [c for c in CONTENDERS if c[0] != "dali" or dali_installed()]
        if auto not in contenders:
            contenders.append(auto)
        for tar in path.glob("*.tar"):  # warm the page cache for everyone
            tar.read_bytes()
        runs: dict[tuple, list[dict]] = {c: [] for c in contenders}
        for r in range(repeat):
            k = r % len(contenders)
            for c in contenders[k:] + contenders[:k]:  # rotated: no contender is always first after a set change
                runs[c].append(run_one(path, data, aug, c, batches))
                print(f"  {name} {contender_name(c):22s} run {r + 1}/{repeat}: "
                      f"{runs[c][-1]['samples_per_s']:7.1f} samples/s", file=sys.stderr, flush=True)
        for c in contenders:
            rates = [x["samples_per_s"] for x in runs[c]]
            rows.append({"set": name, "backend": c[0], "decode": c[1], "device": c[2], "contender": contender_name(c),
                         "auto": c == auto, "samples_per_s": round(statistics.median(rates), 2),
                         "runs": [round(x, 2) for x in rates], "samples": samples, "batches_per_epoch": per_epoch,
                         "timed_batches": batches, "epochs": runs[c][0]["epochs"]})
        mine = [row for row in rows if row["set"] == name]
        auto_row = next(row for row in mine if row["auto"])
        best = max(mine, key=lambda row: row["samples_per_s"])
        summary[name] = {"samples": samples, "batches_per_epoch": per_epoch, "auto": auto_row["contender"],
                         "loader_images_per_s": auto_row["samples_per_s"], "fastest": best["contender"],
                         "fastest_samples_per_s": best["samples_per_s"],
                         "fastest_over_auto": round(best["samples_per_s"] / auto_row["samples_per_s"], 3),
                         "within_noise": best is not auto_row and min(best["runs"]) <= max(auto_row["runs"])}
    return rows, summary


# --- per-stage CPU cost ----------------------------------------------------------------------------------


def profile(shards: Path, data: LoaderConfig, aug: AugmentConfig, batches: int) -> list[tuple[str, float]]:
    """CPU ms per sample on one thread: DALI's reader and decoder alone, PIL's decode (full and DCT-reduced),
    and each contender end to end (DALI's thread runs in this process; a torchvision sample is made here as a
    DataLoader worker would make it)."""
    one = replace(data, num_threads=1)
    view = open_shard_set(shards)
    samples = view.all_samples()[: batches * data.batch_size]
    blobs = [view.read(s.image, s.shard) for s in samples]

    def per_sample(work, n: int) -> float:
        c = time.process_time()
        work()
        return 1000 * (time.process_time() - c) / n

    out = []
    if dali_installed():
        for stage in ("read", "decode"):
            pipe = _dali_stage(view, one.batch_size, stage)
            pipe.run()
            out.append((f"DALI {'read' if stage == 'read' else 'read + decode'}",
                        per_sample(lambda: [pipe.run() for _ in range(batches)], batches * one.batch_size)))
            del pipe
    out.append(("PIL decode, full", per_sample(lambda: [decode_page(b) for b in blobs], len(blobs))))
    out.append(("PIL decode, DCT-reduced (decode: reduced)", per_sample(lambda: [decode_page(b, aug) for b in blobs],
                                                                        len(blobs))))
    for c in CONTENDERS:
        if c[0] == "dali":
            if dali_installed():
                loader = build(shards, one, aug, c)
                out.append((f"{contender_name(c)} loader, two views", timed(loader, batches)["cpu_ms_per_sample"]))
                del loader
        else:
            plan = build(shards, one, aug, c).plan
            made = SampleViews(plan, plan.shard_set.all_samples())
            n = min(len(made), batches * one.batch_size)
            out.append((f"{contender_name(c)} sample, two views", per_sample(lambda: [made[0, i] for i in range(n)], n)))
    return out


def _dali_stage(view, batch: int, stage: str):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=1)
    def pipe():
        encoded = fn.readers.webdataset(paths=[str(t) for t in view.tars], index_paths=[str(i) for i in view.indexes],
                                        ext=";".join(IMAGE_EXTS))
        return encoded if stage == "read" else fn.decoders.image(encoded, output_type=types.RGB)

    p = pipe()
    p.build()
    return p


# --- command line ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="pretraining config whose data: and augment: are used")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--batches", type=int, default=8,
                        help="timed batches per run after one warm-up batch (a multiple of num_threads keeps "
                             "DataLoader workers in step)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender; the median counts")
    parser.add_argument("--shards", action="append", default=[], metavar="NAME=PATH",
                        help="benchmark these shard sets instead of the two default ones")
    parser.add_argument("--pages", type=int, default=200, help="PTB-XL records rendered for ptbxl_640")
    parser.add_argument("--ptbxl", type=Path, default=SAMPLE_PTBXL,
                        help="PTB-XL root to render from (default: the built-in 200-record sample)")
    parser.add_argument("--printouts", type=Path, default=DATA / "ecg-printouts")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dist-cardio-bench-loader"), help="cache of pages and shards")
    parser.add_argument("--quick", action="store_true", help="4 timed batches, one run")
    parser.add_argument("--profile", action="store_true", help="CPU ms per sample on one thread, by stage, instead")
    parser.add_argument("--json", type=Path, help="write the rows and the per-set summary here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeat = 4, 1
    if args.batches < 1 or args.repeat < 1:
        parser.error("--batches and --repeat must be >= 1")
    cfg = load_pretrain_config(args.config, args.set)
    data, aug = cfg.data, cfg.augment
    torch.set_num_threads(1)  # the training process's own threads belong to the model, not to the loader

    if args.shards:
        sets = {}
        for item in args.shards:
            name, sep, path = item.partition("=")
            if not sep or not name or not Path(path).is_dir():
                parser.error(f"--shards {item!r}: expected NAME=PATH of a shard folder")
            sets[name] = Path(path)
    else:
        for path in (args.ptbxl, args.printouts):
            if not path.is_dir():
                raise SystemExit(f"{path}: not found (pass --ptbxl / --printouts, or --shards NAME=PATH)")
        sets = prepare(args.work, args.pages, args.ptbxl, args.printouts)

    height, width = aug.shape
    if args.profile:
        for name, path in sets.items():
            print(f"\n{name}: CPU ms per sample, one thread, {width}×{height} views, "
                  f"{args.batches} batches of {data.batch_size}")
            for label, ms in profile(path, data, aug, args.batches):
                print(f"  {label:48s} {ms:7.1f}")
        return {}

    rows, summary = compare(sets, data, aug, args.batches, args.repeat)
    print(f"\nloader samples/s (pairs of {width}×{height} views) at {args.config.name}: batch {data.batch_size}, "
          f"num_threads {data.num_threads}; {args.batches} timed batches after 1 warm-up batch, across epochs; "
          f"median of {args.repeat} (min-max)")
    print(f"{'set':16s} {'samples':>7s} {'batch/ep':>8s}  {'contender':22s} {'samples/s':>9s} {'min-max':>13s} "
          f"{'epochs':>6s}  {'x auto':>6s}")
    for name, s in summary.items():
        for row in (r for r in rows if r["set"] == name):
            spread = f"{min(row['runs']):.1f}-{max(row['runs']):.1f}"
            mark = "  (auto)" if row["auto"] else ""
            print(f"{name:16s} {row['samples']:7d} {row['batches_per_epoch']:8d}  {row['contender']:22s} "
                  f"{row['samples_per_s']:9.1f} {spread:>13s} {row['epochs']:6d}  "
                  f"{row['samples_per_s'] / s['loader_images_per_s']:6.2f}{mark}")
    for name, s in summary.items():
        print(f"{name}: backend auto → {s['auto']} {s['loader_images_per_s']:.1f} samples/s; fastest {s['fastest']} "
              f"{s['fastest_samples_per_s']:.1f} ({s['fastest_over_auto']:.2f}× auto"
              f"{'; the run ranges overlap: within noise' if s['within_noise'] else ''})")
    report = {"config": str(args.config), "view": [height, width], "batch_size": data.batch_size,
              "num_threads": data.num_threads, "warmup_batches": 1, "timed_batches": args.batches,
              "repeat": args.repeat, "sets": summary, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
