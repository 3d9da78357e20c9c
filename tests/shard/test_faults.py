"""Hostile and failing inputs for `dist-cardio shard` / `verify` (issue 14): FIFOs, devices and symlinks in
input folders, damaged JPEGs, gzip bombs, empty archives, nested --out, a full disk (a real tmpfs),
and patient identifiers in provenance. Real files, real processes, no mocks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_cardio.cli import main
from dist_cardio.shard import ShardConfig, check_image_bytes, read_manifest, read_samples, shard_inputs, verify_shard_set
from dist_cardio.shard.manifest import ShardSet
from dist_cardio.shard.writer import ShardWriter, read_shard, sha256_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
# A baseline 2721x2967 scan, a baseline one with restart markers, a progressive one.
SCANS = ("ecg00005.jpg", "ecg00045.jpg", "ecg00013.jpg")


# --- helpers -------------------------------------------------------------------------------------------
def key_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def printouts(shared_data: Path) -> dict[str, bytes]:
    folder = shared_data / "ecg-printouts"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def run_cfg(**kw) -> ShardConfig:
    return ShardConfig(**{"progress": False, "workers": 1, **kw})


def skipped_reasons(out: Path) -> dict[str, str]:
    records = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    return {r["source"]["path"] or r["source"]["archive"]: r["reason"] for r in records}


def tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class Run:
    rc: int
    out: str
    err: str
    peak_rss: int  # bytes: the process's own high-water mark (VmHWM), not its parent's from before exec


# `dist-cardio ARGS` with an address-space cap (a runaway read fails fast instead of taking the machine's
# memory), recording its peak RSS on exit.
_LAUNCH = """
import atexit, resource, runpy, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
peak_file = sys.argv.pop(1)
def peak():
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    open(peak_file, "w").write(hwm.split()[1])
atexit.register(peak)
runpy.run_module("dist_cardio.cli", run_name="__main__", alter_sys=True)
"""


def cli(tmp: Path, *args: object, timeout: float = 120) -> Run:
    """`dist-cardio ARGS` in a real process; a hang past ``timeout`` fails the test."""
    logs = tmp / f"log-{time.monotonic_ns()}"
    try:
        done = subprocess.run([sys.executable, "-c", _LAUNCH, f"{logs}.peak", *map(str, args)], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"dist-cardio {' '.join(map(str, args))}: still running after {timeout} s")
    peak = Path(f"{logs}.peak")
    return Run(done.returncode, done.stdout, done.stderr, int(peak.read_text()) * 1024 if peak.exists() else 0)


# --- damaged JPEGs, exactly as the issue describes them ---------------------------------------------------
def _segments(data: bytes) -> tuple[int, int]:
    """(offset of the first frame header, offset of the first scan's entropy-coded data)."""
    i, frame = 2, -1
    while True:
        i = data.index(b"\xff", i)
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2) and frame < 0:
            frame = i
        if marker == 0xDA:
            return frame, i + 2 + length
        i += 2 + length


def cut_mid_stream(data: bytes) -> bytes:
    return data[: len(data) // 3] + data[-1000:]


def noise_in_scan(data: bytes, seed: int = 14) -> bytes:
    """20 bytes of the first scan's entropy-coded segment changed (fixed seed)."""
    start = _segments(data)[1]
    end = start
    while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
        end += 1
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for pos in rng.choice(np.arange(start, end), 20, replace=False):
        out[pos] = (out[pos] + int(rng.integers(1, 256))) % 256
    return bytes(out)


def claims_12000x9000(data: bytes) -> bytes:
    frame = _segments(data)[0]
    out = bytearray(data)
    out[frame + 5 : frame + 9] = (9000).to_bytes(2, "big") + (12000).to_bytes(2, "big")
    return bytes(out)


DAMAGES = {"cut": cut_mid_stream, "noise": noise_in_scan, "huge": claims_12000x9000}


def damaged_scans(raw: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{how}-{scan}": damage(raw[scan]) for scan in SCANS for how, damage in DAMAGES.items()}


def test_damaged_jpegs_are_refused_by_shard(shared_data, tmp_path):
    raw = printouts(shared_data)
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in {**damaged_scans(raw), **{s: raw[s] for s in SCANS}}.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "set"
    s = shard_inputs([folder], out, run_cfg())
    assert {r["key"] for r in read_samples(out)} == {key_of(raw[scan]) for scan in SCANS} and s["skipped"] == 9
    for name, reason in skipped_reasons(out).items():
        assert reason.startswith(("undecodable JPEG", "corrupt JPEG")), (name, reason)
    huge = claims_12000x9000(raw["ecg00013.jpg"])  # 94 kB cannot hold 12000x9000 pixels: caught without a decode
    assert check_image_bytes(huge, "x", decode=False).startswith("corrupt JPEG: header claims 12000x9000")


def test_verify_flags_damaged_jpegs_in_a_set_made_elsewhere(shared_data, tmp_path, capsys):
    """A set written with the shard writer but no validation, as an older release or another tool would."""
    raw = printouts(shared_data)
    damaged = damaged_scans(raw)
    out = tmp_path / "set"
    state = ShardSet.open(out, "shard")
    writer = ShardWriter(out, state.next_shard_name())
    for name, data in {**{s: raw[s] for s in SCANS}, **damaged}.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the 12000x9000 claims
            key, size = key_of(data), list(Image.open(io.BytesIO(data)).size)
        source = {"archive": None, "path": name}
        doc = {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "label": None, "meta": {}, "source": source,
               "original_size": size, "size": size, "format": "jpg"}
        writer.add(key, [("jpg", data), ("json", json.dumps(doc).encode())])
        state.add_sample({"key": key, "shard": None, "label": None, "meta": {}, "source": source})
    state.commit(writer.finish())
    state.finish()
    state.close()

    report = verify_shard_set(out, progress=False)
    flagged = {p.key for p in report.problems if p.message.startswith("bad image")}
    assert flagged == {key_of(d) for d in damaged.values()} and len(report.problems) == 9, report.text()
    assert main(["verify", str(out), "--no-progress"]) == 1
    assert "undecodable JPEG: Corrupt JPEG data" in capsys.readouterr().out


def test_real_printouts_and_gray_or_cmyk_jpegs_still_pass(shared_data):
    raw = printouts(shared_data)
    assert len(raw) >= 50
    for name, data in raw.items():
        assert check_image_bytes(data, name) is None, name
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        Image.open(io.BytesIO(raw["ecg00045.jpg"])).convert(mode).save(buf, format="JPEG", quality=90)
        assert check_image_bytes(buf.getvalue(), mode) is None, mode


# --- devices, FIFOs, symlinks ----------------------------------------------------------------------------
def test_fifos_devices_and_links_out_of_the_folder_are_skipped_not_read(shared_data, tmp_path):
    raw = printouts(shared_data)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.jpg").write_bytes(raw["ecg00008.jpg"])
    (folder / "sub" / "good.png").write_bytes(raw["ecg00017.png"])
    os.mkfifo(folder / "f.png")
    os.mkfifo(folder / "pipe.tar")
    os.mknod(folder / "dev.png", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # a /dev/zero of its own
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "outside.jpg").symlink_to(shared_data / "ecg-printouts" / "ecg00016.jpg")
    (folder / "inside.png").symlink_to(folder / "sub" / "good.png")  # stays in the folder: followed
    direct = tmp_path / "direct.jpg"
    direct.symlink_to("/dev/zero")
    out = tmp_path / "set"
    run = cli(tmp_path, "shard", folder, direct, "--out", out, "--workers", "1", "--no-progress", timeout=60)
    assert run.rc == 0 and "Traceback" not in run.err, run.err
    reasons = skipped_reasons(out)
    assert reasons == {
        "f.png": "not a regular file: FIFO, not read",
        "pipe.tar": "not a regular file: FIFO, not read",
        "dev.png": "not a regular file: character device, not read",
        "zero.png": "symlink leads outside the input folder: not followed",
        "outside.jpg": "symlink leads outside the input folder: not followed",
        "direct.jpg": "not a regular file: character device, not read",
    }
    assert {r["key"] for r in read_samples(out)} == {key_of(raw["ecg00008.jpg"]), key_of(raw["ecg00017.png"])}
    assert not any(name in run.out + run.err for name in reasons)  # the console counts, skipped.jsonl names


# --- archives: gzip bombs, empty archives -----------------------------------------------------------------
def test_gzip_bomb_member_is_refused_before_it_fills_memory(shared_data, tmp_path):
    scan = printouts(shared_data)["ecg00008.jpg"]
    plain, bomb = tmp_path / "plain.tar.gz", tmp_path / "bomb.tar.gz"
    with tarfile.open(plain, "w:gz") as tf:
        tar_add(tf, "scan.jpg", scan)
    with tarfile.open(bomb, "w:gz", compresslevel=1) as tf, open("/dev/zero", "rb") as zeros:
        tar_add(tf, "scan.jpg", scan)
        page = tarfile.TarInfo("page.bmp")
        page.size = 150_000_000  # under the 256 MB member limit: only a ratio bound stops it
        tf.addfile(page, zeros)
        tar_add(tf, "after.jpg", scan[:-1000])
    assert bomb.stat().st_size < 1_000_000
    base = cli(tmp_path, "shard", plain, "--out", tmp_path / "a", "--workers", "1", "--no-progress")
    run = cli(tmp_path, "shard", bomb, "--out", tmp_path / "b", "--workers", "1", "--no-progress")
    assert base.rc == run.rc == 0, run.err
    assert run.peak_rss < base.peak_rss + 40_000_000, (run.peak_rss, base.peak_rss)
    reason = skipped_reasons(tmp_path / "b")["page.bmp"]
    assert reason.startswith("suspicious compression ratio") and reason.endswith("rest of the archive not read")
    assert [r["source"]["path"] for r in read_samples(tmp_path / "b")] == ["scan.jpg"]


def test_many_small_zero_members_stop_at_the_archive_ratio(tmp_path):
    bomb = tmp_path / "pages.tar.gz"
    with tarfile.open(bomb, "w:gz") as tf:
        for k in range(400):  # 100 MB of zeros in members each too small for a member bound
            tar_add(tf, f"page{k:03d}.bmp", bytes(256_000))
    out = tmp_path / "set"
    s = shard_inputs([bomb], out, run_cfg())
    last = json.loads((out / "skipped.jsonl").read_text().splitlines()[-1])
    assert last["reason"].startswith("suspicious compression ratio") and s["skipped"] < 20


def test_empty_archives_are_warned_about_by_input_position(shared_data, tmp_path):
    folder = tmp_path / "in"
    (folder / "inner").mkdir(parents=True)
    (folder / "good.png").write_bytes(printouts(shared_data)["ecg00017.png"])
    with tarfile.open(folder / "inner" / "nothing.tar", "w"):
        pass
    (folder / "inner" / "zero-bytes.zip").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w"):
        pass
    with tarfile.open(tmp_path / "empty.tar.gz", "w:gz"):
        pass
    out = tmp_path / "set"
    run = cli(tmp_path, "shard", folder, tmp_path / "empty.zip", tmp_path / "empty.tar.gz", "--out", out,
              "--workers", "1", "--no-progress")
    assert run.rc == 0, run.err
    warnings = [line for line in run.err.splitlines() if "warning" in line]
    assert warnings == [f"dist-cardio shard: warning: input {k}: {n} empty archive(s), names in skipped.jsonl"
                        for k, n in ((1, 2), (2, 1), (3, 1))]
    assert skipped_reasons(out) == dict.fromkeys(
        ["inner/nothing.tar", "inner/zero-bytes.zip", "empty.zip", "empty.tar.gz"], "empty archive: no files in it")
    assert len(read_samples(out)) == 1


# --- --out and the inputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["out is the input", "out inside the input", "input inside out"])
def test_out_and_inputs_must_not_nest(shared_data, tmp_path, capsys, layout):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes(printouts(shared_data)["ecg00017.png"])
    out = {"out is the input": folder, "out inside the input": folder / "set"}.get(layout, tmp_path / "set")
    if layout == "input inside out":
        assert main(["shard", str(folder), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
        folder = out / "incoming"
        folder.mkdir()
        (folder / "new.png").write_bytes(printouts(shared_data)["ecg00015.png"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    rc = main(["shard", str(folder), "--out", str(out), "--no-progress", "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and ("--out is inside the input" in err or "input inside the shard set" in err)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# --- a full disk --------------------------------------------------------------------------------------------
def test_full_disk_is_one_line_exit_2_and_loses_nothing(shared_data, tmp_path, small_disk):
    raw = printouts(shared_data)
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, names in ((first, ("ecg00015.png", "ecg00017.png")), (second, ("ecg00001.png", "ecg00002.png",
                                                                                 "ecg00004.png", "ecg00005.jpg"))):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(raw[name])
    out = small_disk / "set"
    args = ("--out", out, "--max-count", "1", "--workers", "1", "--no-progress")
    assert cli(tmp_path, "shard", first, *args).rc == 0
    before = {p.name: p.read_bytes() for p in out.glob("shard-*")}

    full = cli(tmp_path, "shard", second, *args)
    lines = full.err.strip().splitlines()
    assert full.rc == 2 and len(lines) == 1, full.err
    assert f"{out}/shard-" in lines[0] and "No space left on device" in lines[0] and "free space" in lines[0]
    assert not [p.name for p in out.rglob("*") if "partial" in p.name or ".tmp" in p.name]
    assert {p.name: p.read_bytes() for p in out.glob("shard-*") if p.name in before} == before
    for entry in read_manifest(out)["shards"]:
        assert sha256_file(out / entry["name"]) == entry["sha256"]
    assert verify_shard_set(out, progress=False).ok

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert cli(tmp_path, "shard", second, *args).rc == 0
    assert {r["key"] for r in read_samples(out)} == {key_of(p.read_bytes()) for p in (*first.iterdir(), *second.iterdir())}
    assert verify_shard_set(out, progress=False).ok


# --- provenance and patient identifiers ------------------------------------------------------------------
def test_shards_carry_relative_sources_and_pseudonymised_patients(shared_data, tmp_path):
    from dist_cardio.downstream.splits import leak_groups

    raw = printouts(shared_data)
    names = ["ecg00015.png", "ecg00017.png", "ecg00008.jpg", "ecg00016.jpg"]
    root = tmp_path / "Doe_John_1957-03-14"  # a folder named after a patient
    folders = [root / "images"] * 3 + [root / "later"]
    for folder, name in zip(folders, names):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(raw[name])
    rows = [f"{f.name}/{n},NORM,{i + 1},{100 + i},{15709 if i != 2 else 20001}"
            for i, (f, n) in enumerate(zip(folders, names))]
    (root / "labels.csv").write_text("path,label,strat_fold,ecg_id,patient\n" + "\n".join(rows) + "\n")
    out = tmp_path / "set"
    for folder in (root / "images", root / "later"):  # the second run adds to the same set
        shard_inputs([folder], out, run_cfg(labels=str(root / "labels.csv")))

    docs = [json.loads(d["json"]) for tar in sorted(out.glob("shard-*.tar")) for _, _, d in read_shard(tar)]
    texts = [json.dumps(docs), (out / "samples.jsonl").read_text(), (out / "manifest.json").read_text()]
    for text in texts:
        assert "Doe_John" not in text and str(tmp_path) not in text and "15709" not in text and "20001" not in text
    assert all(not tar.read_bytes().count(b"Doe_John") for tar in out.glob("shard-*.tar"))
    samples = {r["source"]["path"]: r for r in read_samples(out)}
    assert set(samples) == set(names) and all(r["source"]["archive"] is None for r in samples.values())
    patients = [samples[n]["meta"]["patient"] for n in names]
    assert patients[0] == patients[1] == patients[3] != patients[2] and len(patients[0]) == 16
    groups = leak_groups([samples[n]["key"] for n in names], patients)  # what fine-tuning splits use
    assert groups[0] == groups[1] == groups[3] != groups[2]

    secret = out / ".local" / "secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert all(secret.read_bytes() not in tar.read_bytes() for tar in out.glob("shard-*.tar"))
    assert str(root / "images") in (out / ".local" / "runs.jsonl").read_text()  # full paths stay on site
