"""`shard` and `verify` with worker processes (issue 13): the same shards, the same report and the same
refusals whatever the number of workers, forked or spawned; a killed run leaves no worker holding the set's
lock. Real files, real processes, no mocks."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_cardio.cli import main
from dist_cardio.shard import ShardConfig, read_samples, shard_inputs, verify_shard_set
from dist_cardio.shard.imagecheck import ImagePool
from dist_cardio.shard.manifest import ShardSet
from dist_cardio.shard.writer import ShardWriter

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
SCANS = ("ecg00005.jpg", "ecg00045.jpg", "ecg00013.jpg")  # baseline, baseline with restart markers, progressive


def key_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def printouts(shared_data: Path) -> dict[str, bytes]:
    folder = shared_data / "ecg-printouts"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def cut_mid_stream(data: bytes) -> bytes:
    return data[: len(data) // 3] + data[-1000:]


def noise_mid_stream(data: bytes) -> bytes:
    noise = np.random.default_rng(13).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    mid = len(data) // 2
    return data[:mid] + noise + data[mid + len(noise) :]


def broken_crc_png(data: bytes) -> bytes:
    pos = data.index(b"IDAT") + 4 + 20
    return data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :]


def damaged(raw: dict[str, bytes]) -> dict[str, bytes]:
    """Images `shard` must refuse: cut and noisy JPEG scans, a PNG whose CRC no longer matches."""
    bad = {f"{how.__name__}-{scan}": how(raw[scan]) for scan in SCANS for how in (cut_mid_stream, noise_mid_stream)}
    bad["badcrc-ecg00017.png"] = broken_crc_png(raw["ecg00017.png"])
    return bad


class OtherThread:
    """A second thread in this process while it runs: workers must then be spawned, not forked."""

    def __enter__(self) -> OtherThread:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.stop.wait)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def set_files(out: Path) -> dict[str, bytes]:
    """Every file of a shard set, manifest.json without its run timestamps."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".shard.lock"}
    manifest = json.loads(files.pop("manifest.json"))
    for run in manifest["runs"]:
        del run["started"], run["finished"]
    files["manifest.json"] = json.dumps(manifest).encode()
    return files


# --- the pool -----------------------------------------------------------------------------------------
def test_pool_keeps_input_order_and_forks_only_from_a_single_thread():
    items = [(i, -i) for i in range(20)] + [("skip", None)]
    expected = [(i, i) for i in range(20)] + [("skip", None)]
    with OtherThread(), ImagePool(2) as pool:
        assert pool.start_method == "spawn"
        assert list(pool.ordered(abs, items)) == expected
    with ImagePool(1) as pool:
        assert pool.start_method is None and list(pool.ordered(abs, items)) == expected
    if len(os.listdir("/proc/self/task")) == 1:  # pytest may hold threads of earlier tests' libraries
        with ImagePool(2) as pool:
            assert pool.start_method == "fork"
            assert list(pool.ordered(abs, items)) == expected


# --- shard --------------------------------------------------------------------------------------------
def test_shard_writes_the_same_bytes_with_1_and_2_workers(shared_data, tmp_path):
    raw = printouts(shared_data)
    bad = tmp_path / "in" / "bad"
    bad.mkdir(parents=True)
    for name, data in damaged(raw).items():
        (bad / name).write_bytes(data)
    (bad / "empty.png").write_bytes(b"")
    (bad / "copy-of-ecg00008.jpg").write_bytes(raw["ecg00008.jpg"])  # a duplicate
    inputs = [shared_data / "ecg-printouts", tmp_path / "in"]

    sets = {}
    for label, workers, thread in (("1", 1, False), ("2-forked", 2, False), ("2-spawned", 2, True)):
        out = tmp_path / f"set-{label}"
        if thread:
            with OtherThread():
                s = shard_inputs(inputs, out, ShardConfig(workers=workers, max_count=8, progress=False))
        else:
            s = shard_inputs(inputs, out, ShardConfig(workers=workers, max_count=8, progress=False))
        # the printouts hold one duplicate and a .csv
        assert (s["added"], s["duplicates"], s["skipped"]) == (len(raw) - 1, 2, 9), s
        sets[label] = set_files(out)

    assert sets["2-forked"] == sets["1"] and sets["2-spawned"] == sets["1"]
    reasons = {json.loads(line)["source"]["path"]: json.loads(line)["reason"]
               for line in sets["1"]["skipped.jsonl"].decode().splitlines()}
    for name in damaged(raw):
        assert reasons[f"bad/{name}"].startswith(("undecodable JPEG", "corrupt JPEG", "truncated JPEG",
                                                  "corrupt PNG: bad CRC")), (name, reasons[f"bad/{name}"])
    assert {r["key"] for r in read_samples(tmp_path / "set-1")} == {key_of(d) for d in raw.values()}


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def test_killed_run_leaves_no_worker_holding_the_lock(shared_data, tmp_path):
    """Forked workers drop their copy of the set's lock; SIGKILL the parent and they do not wait forever."""
    out = tmp_path / "set"
    folder = str(shared_data / "ecg-printouts")  # three times over: a run of a few seconds
    proc = subprocess.Popen([sys.executable, "-m", "dist_cardio.cli", "shard", folder, folder, folder,
                             "--out", str(out), "--workers", "2", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = out / ".shard.lock"
    workers: list[int] = []
    try:
        def dropped_the_lock() -> bool:  # both workers running, neither with the lock file open
            return len(workers) == 2 and all(_alive(pid) and not _holds(pid, lock) for pid in workers)

        deadline = time.monotonic() + 60
        while not dropped_the_lock() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
            workers = _children(proc.pid)
        assert dropped_the_lock(), f"workers {workers} kept the lock ({proc.poll()=})"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if a live worker held it
        finally:
            os.close(fd)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:  # only if the test failed: orphans of the killed run, ours to end
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    s = shard_inputs([shared_data / "ecg-printouts"], out, ShardConfig(workers=2, progress=False))
    assert s["totals"]["samples"] == len(printouts(shared_data)) - 1 and verify_shard_set(out, progress=False).ok


def _holds(pid: int, path: Path) -> bool:
    """True when process ``pid`` has ``path`` open."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:
        return False
    target = os.path.realpath(path)
    for fd in fds:
        try:
            if os.readlink(fd) == target:
                return True
        except FileNotFoundError:
            pass
    return False


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- verify -------------------------------------------------------------------------------------------
def test_verify_reports_the_same_problems_with_1_and_2_workers(shared_data, tmp_path, capsys):
    """A set written without validation (as another tool would) holding damaged images and wrong json, over
    several shards, then one shard's bytes and another's index tampered with."""
    raw = printouts(shared_data)
    good = {name: raw[name] for name in (*SCANS, "ecg00001.png", "ecg00017.png", "ecg00008.jpg")}
    samples = [*good.items(), *damaged(raw).items()]
    out = tmp_path / "set"
    state = ShardSet.open(out, "shard")
    for start in range(0, len(samples), 5):
        writer = ShardWriter(out, state.next_shard_name())
        for i, (name, data) in enumerate(samples[start : start + 5], start):
            key, fmt = key_of(data), "png" if name.endswith(".png") else "jpg"
            size = list(Image.open(io.BytesIO(data)).size)
            doc = {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "label": None, "meta": {},
                   "source": {"archive": None, "path": name}, "size": size, "format": fmt}
            if i == 1:
                doc["size"] = [1, 1]  # json disagrees with the image
            json_bytes = b"[1, 2]" if i == 4 else json.dumps(doc).encode()  # json that is not an object
            writer.add(key, [(fmt, data), ("json", json_bytes)])
            state.add_sample({"key": key, "shard": None, "label": None, "meta": {}, "source": doc["source"]})
        state.commit(writer.finish())
    state.finish()
    state.close()
    shards = sorted(out.glob("shard-*.tar"))
    first = bytearray(shards[0].read_bytes())
    first[len(first) // 2] ^= 0x55
    shards[0].write_bytes(bytes(first))
    idx = shards[1].with_suffix(".idx")
    idx.write_text(idx.read_text().replace(" 512 ", " 1024 ", 1))

    one = verify_shard_set(out, progress=False, workers=1)
    two = verify_shard_set(out, progress=False, workers=2)
    with OtherThread():
        spawned = verify_shard_set(out, progress=False, workers=2)
    assert [str(p) for p in two.problems] == [str(p) for p in one.problems]
    assert [str(p) for p in spawned.problems] == [str(p) for p in one.problems]
    assert (one.shards, one.samples, one.bytes) == (two.shards, two.samples, two.bytes) == (3, len(samples), one.bytes)
    flagged = {p.key for p in one.problems if p.message.startswith("bad image")}
    assert {key_of(d) for d in damaged(raw).values()} <= flagged
    messages = [p.message for p in one.problems]
    assert any("json says [1, 1]" in m for m in messages) and "json component is a list, not an object" in messages
    assert any(p.shard == shards[0].name and "sha256" in p.message for p in one.problems)
    assert any(p.shard == shards[1].name and "does not match the tar" in p.message for p in one.problems)

    texts = {}
    for workers in ("1", "2"):
        assert main(["verify", str(out), "--workers", workers, "--no-progress"]) == 1
        texts[workers] = capsys.readouterr().out
    assert texts["1"] == texts["2"] and "undecodable JPEG" in texts["2"]
    with pytest.raises(SystemExit):
        main(["verify", str(out), "--workers", "-1"])
    assert "must be ≥ 0" in capsys.readouterr().err
