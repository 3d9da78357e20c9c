"""Sharding real printouts plus built archives: validation, dedup, incremental runs, crash recovery,
DALI index files read by a real CPU DALI pipeline, archive safety, --max-side and verify."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_cardio.cli import main
from dist_cardio.shard import (
    ShardConfig,
    check_image_bytes,
    read_manifest,
    read_samples,
    shard_inputs,
    verify_shard_set,
)
from dist_cardio.shard.imagecheck import PNG_SIGNATURE, BadImage, inspect_image
from dist_cardio.shard.manifest import ShardSet, ShardSetError
from dist_cardio.shard.writer import index_text, read_shard, sha256_file

REPO = Path(__file__).resolve().parents[2]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


# --- helpers -------------------------------------------------------------------------------------------
def key_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def printout_files(shared_data: Path) -> list[Path]:
    return sorted(p for p in (shared_data / "ecg-printouts").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def reencode(data: bytes, fmt: str, **kw) -> bytes:
    """New real image bytes (a different content hash) from a real printout."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format=fmt, **kw)
    return buf.getvalue()


def broken_crc_png(data: bytes) -> bytes:
    """Flip one byte inside the first IDAT chunk's data: Pillow still loads it, the CRC no longer matches."""
    pos = data.index(b"IDAT") + 4 + 20
    return data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :]


def damaged_jpeg(data: bytes, seed: int = 0, markers: bool = True) -> bytes:
    """4 KB of random bytes in the middle of the entropy-coded data; without ``markers`` no 0xFF in them."""
    noise = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    if not markers:
        noise = noise.replace(b"\xff", b"\x7f")
    mid = len(data) // 2
    return data[:mid] + noise + data[mid + len(noise) :]


def tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def run_cfg(**kw) -> ShardConfig:
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return ShardConfig(**kw)


def file_states(out: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in sorted(out.glob("shard-*.*"))}


# --- the main dataset: the real printout folder + a zip and a tar with bad files and duplicates --------
@pytest.fixture(scope="module")
def dataset(shared_data: Path, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("inputs")
    files = printout_files(shared_data)
    raw = {p.name: p.read_bytes() for p in files}
    jpg, progressive, png = raw["ecg00008.jpg"], raw["ecg00013.jpg"], raw["ecg00017.png"]

    zpath = tmp / "clinic-a.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("scans/dup-of-ecg00008.jpg", jpg)  # duplicate of a folder file
        zf.writestr("scans/new-a.png", reencode(jpg, "PNG"))  # new image
        zf.writestr("scans/new-b.jpg", reencode(png, "JPEG", quality=85))  # new image
        zf.writestr("scans/truncated.jpg", jpg[: len(jpg) * 2 // 3])
        zf.writestr("scans/badcrc.png", broken_crc_png(png))
        zf.writestr("scans/empty.png", b"")
        zf.writestr("scans/readme.txt", b"not an image")
        zf.writestr("scans/fake.jpg", b"plain text in a .jpg")
        zf.writestr("scans/damaged-progressive.jpg", damaged_jpeg(progressive))

    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("deep/new-c.png", reencode(progressive, "PNG"))
        zf.writestr("deep/dup-of-new-a.png", reencode(jpg, "PNG"))  # duplicate of a zip member
    tpath = tmp / "clinic-b.tar.gz"
    with tarfile.open(tpath, "w:gz") as tf:
        tar_add(tf, "b/new-d.tiff", reencode(jpg, "TIFF"))  # converted once to PNG
        tar_add(tf, "b/inner.zip", inner.getvalue())  # nested archive
        tar_add(tf, "b/dup-of-ecg00013.jpg", progressive)

    expected_keys = {key_of(b) for b in raw.values()} | {
        key_of(reencode(jpg, "PNG")), key_of(reencode(png, "JPEG", quality=85)),
        key_of(reencode(progressive, "PNG")), key_of(reencode(jpg, "TIFF")),
    }
    extra = tmp / "extra"
    extra.mkdir()
    (extra / "gone.png").symlink_to(tmp / "no-such-file.png")  # unreadable
    out = tmp / "shards"
    summary = shard_inputs([shared_data / "ecg-printouts", zpath, tpath, extra], out, run_cfg(max_count=8, workers=2))
    return {"out": out, "summary": summary, "expected_keys": expected_keys, "files": files, "raw": raw}


def test_counts_reasons_and_duplicates(dataset):
    out, s = dataset["out"], dataset["summary"]
    keys = {r["key"] for r in read_samples(out)}
    assert keys == dataset["expected_keys"]
    assert s["added"] == len(dataset["expected_keys"]) == read_manifest(out)["totals"]["samples"]

    skipped = {Path(r["source"]["path"]).name: r["reason"] for r in map(json.loads, (out / "skipped.jsonl").open())}
    assert skipped["truncated.jpg"].startswith("truncated JPEG")
    assert skipped["badcrc.png"].startswith("corrupt PNG: bad CRC in IDAT")
    assert skipped["empty.png"].startswith("empty file")
    assert skipped["readme.txt"].startswith("not an image file: .txt")
    assert skipped["fake.jpg"].startswith("not an image")
    assert skipped["damaged-progressive.jpg"].startswith("undecodable")
    assert skipped["ecg-samples-metadata.csv"].startswith("not an image file: .csv")
    assert skipped["gone.png"] == "unreadable: No such file or directory"
    assert s["skipped"] == len(skipped) == 8 == read_manifest(out)["totals"]["skipped"]

    dups = [json.loads(line) for line in (out / "duplicates.jsonl").open()]
    pairs = {(Path(d["duplicate"]["path"]).name, Path(d["first_seen"]["path"]).name) for d in dups}
    assert pairs == {
        ("ecg00014.png", "ecg00010.png"),  # the real folder holds one duplicate pair
        ("dup-of-ecg00008.jpg", "ecg00008.jpg"),
        ("dup-of-new-a.png", "new-a.png"),
        ("dup-of-ecg00013.jpg", "ecg00013.jpg"),
    }
    nested = next(d for d in dups if d["duplicate"]["path"] == "deep/dup-of-new-a.png")
    assert nested["duplicate"]["archive"].endswith("clinic-b.tar.gz!b/inner.zip")
    assert nested["first_seen"]["archive"].endswith("clinic-a.zip")
    assert s["duplicates"] == 4 == read_manifest(out)["totals"]["duplicates"]


def test_samples_keep_bytes_and_provenance(dataset):
    out, raw = dataset["out"], dataset["raw"]
    by_key = {key_of(b): name for name, b in raw.items()}
    formats = {}
    for shard in sorted(out.glob("shard-*.tar")):
        for key, _, data in read_shard(shard):
            doc = json.loads(data["json"])
            ext = doc["format"]
            assert set(data) == {ext, "json"} and doc["key"] == key
            assert Image.open(io.BytesIO(data[ext])).size == tuple(doc["size"]) == tuple(doc["original_size"])
            name = by_key.get(key)
            if name is not None and name.endswith((".jpg", ".jpeg", ".png")):
                assert data[ext] == raw[name]  # JPEG/PNG stored as they are
            formats[Path(doc["source"]["path"]).suffix] = ext
    assert formats[".bmp"] == "png" and formats[".tiff"] == "png" and formats[".jpeg"] == "jpg"


def test_manifest_checksums_and_counts(dataset):
    out = dataset["out"]
    m = read_manifest(out)
    assert m["totals"]["shards"] == len(m["shards"]) == len(list(out.glob("shard-*.tar")))
    for entry in m["shards"]:
        path = out / entry["name"]
        assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["bytes"]
        assert 1 <= entry["count"] <= 8 and entry["count"] == sum(1 for _ in read_shard(path))
        assert (out / entry["index"]).is_file()
    assert m["runs"][-1]["finished"] is not None
    assert not list(out.glob(".*.partial"))


def test_idx_identical_to_wds2idx(dataset, tmp_path):
    from wds2idx import IndexCreator  # DALI's reference tool, a top-level module of the DALI wheel

    for tar in sorted(dataset["out"].glob("shard-*.tar")):
        ref = tmp_path / (tar.stem + ".idx")
        with IndexCreator(str(tar), str(ref), verbose=False) as ic:
            ic.create_index()
        assert (tar.with_suffix(".idx")).read_bytes() == ref.read_bytes()


def test_dali_reads_shards_with_our_index(dataset):
    from nvidia.dali import fn, pipeline_def, types

    out = dataset["out"]
    m = read_manifest(out)
    tars = [str(out / s["name"]) for s in m["shards"]]
    idxs = [str(out / s["index"]) for s in m["shards"]]
    batch = 8

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe():
        img, meta = fn.readers.webdataset(
            paths=tars, index_paths=idxs, ext=["jpg;png", "json"], missing_component_behavior="error", name="r"
        )
        return fn.decoders.image(img, device="cpu", output_type=types.RGB), meta

    p = pipe()
    p.build()
    n = m["totals"]["samples"]
    seen = {}
    for _ in range((n + batch - 1) // batch):
        images, metas = p.run()
        for i in range(batch):
            doc = json.loads(bytes(metas.at(i)).rstrip(b"\0"))
            seen[doc["key"]] = images.at(i).shape
            assert images.at(i).shape == (doc["size"][1], doc["size"][0], 3)
    assert set(seen) == {r["key"] for r in read_samples(out)}


def test_rejected_images_are_those_dali_dies_or_warns_on(shared_data, tmp_path, capfd):
    """Each image is fed to a fresh CPU DALI decoder: check_image_bytes rejects exactly those it dies on or
    decodes only with a libjpeg warning (random bytes in a progressive JPEG's scan: DALI error; without
    0xFF: DALI decodes garbage and prints "Corrupt JPEG data")."""
    from nvidia.dali import fn, pipeline_def

    raw = {p.name: p.read_bytes() for p in printout_files(shared_data)}
    prog, jpg, png = raw["ecg00013.jpg"], raw["ecg00008.jpg"], raw["ecg00017.png"]
    cases = {"good.jpg": jpg, "noise-with-markers.jpg": damaged_jpeg(prog),
             "noise-no-markers.jpg": damaged_jpeg(prog, markers=False),
             "truncated.jpg": jpg[:-5000], "badcrc.png": broken_crc_png(png), "empty.png": b""}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe():
            encoded, _ = fn.readers.file(files=[str(path)], labels=[0])
            return fn.decoders.image(encoded, device="cpu")

        p = pipe()
        p.build()
        capfd.readouterr()
        try:
            p.run()
            dali_ok = "Corrupt JPEG data" not in capfd.readouterr().err
        except RuntimeError:
            dali_ok = False
        assert (check_image_bytes(data, name) is None) == dali_ok, name


def test_verify_clean_set(dataset):
    report = verify_shard_set(dataset["out"], decode=True, progress=False)
    assert report.ok, report.text()
    assert report.samples == read_manifest(dataset["out"])["totals"]["samples"]


# --- incremental runs ----------------------------------------------------------------------------------
def test_incremental_rerun_adds_nothing_and_new_archive_appends(shared_data, tmp_path):
    files = printout_files(shared_data)[:6]
    folder = tmp_path / "first"
    folder.mkdir()
    for p in files[:4]:
        shutil.copy(p, folder / p.name)
    out = tmp_path / "set"
    s1 = shard_inputs([folder], out, run_cfg(max_count=2))
    assert s1["added"] == 4 and len(s1["shards"]) == 2
    before = file_states(out)
    samples_before = (out / "samples.jsonl").read_bytes()

    s2 = shard_inputs([folder], out, run_cfg(max_count=2))
    assert (s2["added"], s2["already_present"], s2["shards"]) == (0, 4, [])
    assert file_states(out) == before and (out / "samples.jsonl").read_bytes() == samples_before

    archive = tmp_path / "more.tar"
    with tarfile.open(archive, "w") as tf:
        for p in files[2:6]:  # two already in the set, two new
            tar_add(tf, f"more/{p.name}", p.read_bytes())
    s3 = shard_inputs([archive], out, run_cfg(max_count=2))
    assert (s3["added"], s3["duplicates"], s3["shards"]) == (2, 2, ["shard-000002.tar"])
    after = file_states(out)
    assert {k: v for k, v in after.items() if k in before} == before
    assert read_manifest(out)["totals"]["samples"] == 6 and len(read_manifest(out)["runs"]) == 3

    s4 = shard_inputs([archive], out, run_cfg(max_count=2))  # same archive again: nothing new anywhere
    assert (s4["added"], s4["already_present"], s4["duplicates"]) == (0, 2, 2)
    assert read_manifest(out)["totals"]["duplicates"] == 2 and file_states(out) == after

    # Same inputs, other worker count: byte-identical shards (order and tar bytes are deterministic).
    again = tmp_path / "again"
    for inputs in ([folder], [archive]):
        shard_inputs(inputs, again, run_cfg(max_count=2, workers=2))
    assert [s["sha256"] for s in read_manifest(again)["shards"]] == [s["sha256"] for s in read_manifest(out)["shards"]]


def test_killed_run_leaves_complete_shards_and_rerun_finishes(shared_data, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    files = printout_files(shared_data)[:16]
    for p in files:
        shutil.copy(p, folder / p.name)
    out = tmp_path / "set"
    cmd = [str(REPO / ".venv" / "bin" / "dist-cardio"), "shard", str(folder),
           "--out", str(out), "--max-count", "2", "--workers", "1", "--max-side", "640", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "shard-000002.tar").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"

    shards = sorted(out.glob("shard-*.tar"))
    assert len(shards) >= 3
    in_shards = {}
    for tar in shards:  # every visible shard is a complete tar
        assert tar.stat().st_size % 10240 == 0
        keys = [k for k, _, _ in read_shard(tar)]
        assert 1 <= len(keys) <= 2
        in_shards.update(dict.fromkeys(keys, tar.name))
    for line in (out / "samples.jsonl").read_text().splitlines():  # only samples of complete shards
        r = json.loads(line)
        assert in_shards[r["key"]] == r["shard"]

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = {key_of(p.read_bytes()) for p in files}
    assert {r["key"] for r in read_samples(out)} == expected
    assert len((out / "samples.jsonl").read_text().splitlines()) == len(expected)
    assert not list(out.glob(".*.partial"))
    assert verify_shard_set(out, decode=False, progress=False).ok


def test_recovery_adopts_unlisted_shard_and_cleans_temp_files(shared_data, tmp_path):
    """The state a kill right after a shard's rename leaves: shard on disk, not in manifest/samples/idx."""
    folder = tmp_path / "in"
    folder.mkdir()
    for p in printout_files(shared_data)[:5]:
        shutil.copy(p, folder / p.name)
    out = tmp_path / "set"
    shard_inputs([folder], out, run_cfg(max_count=2))
    last = "shard-000002.tar"
    m = json.loads((out / "manifest.json").read_text())
    m["shards"] = [s for s in m["shards"] if s["name"] != last]
    (out / "manifest.json").write_text(json.dumps(m))
    lines = (out / "samples.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["shard"] != last]
    (out / "samples.jsonl").write_text("\n".join(kept) + "\n" + kept[0][:20])  # plus a torn line
    (out / "shard-000002.idx").unlink()
    (out / ".shard-000003.tar.partial").write_bytes(b"\0" * 1000)
    (out / ".manifest.json.partial").write_text("{")
    state = file_states(out)

    s = shard_inputs([folder], out, run_cfg(max_count=2))
    assert s["recovered"] == [last] and s["added"] == 0 and s["already_present"] == 5
    assert not list(out.glob(".*.partial"))
    assert len(read_samples(out)) == 5 and len((out / "samples.jsonl").read_text().splitlines()) == 5
    tars_after = {k: v for k, v in file_states(out).items() if k.endswith(".tar")}
    assert tars_after == {k: v for k, v in state.items() if k.endswith(".tar")}
    assert verify_shard_set(out, progress=False).ok


def test_second_writer_and_prefix_mismatch_refused(shared_data, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(printout_files(shared_data)[0], folder)
    out = tmp_path / "set"
    shard_inputs([folder], out, run_cfg())
    held = ShardSet.open(out, "shard")
    try:
        with pytest.raises(ShardSetError, match="another `dist-cardio shard` is writing"):
            shard_inputs([folder], out, run_cfg())
    finally:
        held.close()
    with pytest.raises(ShardSetError, match="pass --prefix shard"):
        shard_inputs([folder], out, run_cfg(prefix="other"))


# --- archive safety ------------------------------------------------------------------------------------
def test_zip_slip_oversized_bomb_links_depth_and_corrupt_archives(shared_data, tmp_path):
    raw = {p.name: p.read_bytes() for p in printout_files(shared_data)[:40]}
    small = raw["ecg00017.png"]  # 16 KB
    big = raw["ecg00008.jpg"]  # 122 KB
    evil = f"evil-{uuid.uuid4().hex}.png"
    zpath = tmp_path / "hostile.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"../../{evil}", small)
        zf.writestr(f"/tmp/{evil}", reencode(small, "PNG", compress_level=1))
        zf.writestr("big.jpg", big)
        zf.writestr("bomb.bmp", b"\0" * 30_000_000)
        level3 = io.BytesIO()
        with zipfile.ZipFile(level3, "w") as z3:
            z3.writestr("x.png", reencode(small, "PNG", compress_level=2))
        level2 = io.BytesIO()
        with zipfile.ZipFile(level2, "w") as z2:
            z2.writestr("l3.zip", level3.getvalue())
        zf.writestr("l2.zip", level2.getvalue())
    tpath = tmp_path / "links.tar"
    with tarfile.open(tpath, "w") as tf:
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        dev = tarfile.TarInfo("dev.png")
        dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
        tf.addfile(dev)
        tar_add(tf, "ok.jpg", raw["ecg00016.jpg"])
    gz = io.BytesIO()
    with tarfile.open(fileobj=gz, mode="w:gz") as tf:
        tar_add(tf, "a.png", raw["ecg00015.png"])
        tar_add(tf, "b.jpg", raw["ecg00013.jpg"])
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(gz.getvalue()[: len(gz.getvalue()) // 2])
    notzip = tmp_path / "notzip.zip"
    notzip.write_bytes(b"PK but not really")

    out = tmp_path / "set"
    cwd = os.getcwd()
    os.chdir(out.parent)
    try:
        s = shard_inputs([zpath, tpath, broken, notzip], out, run_cfg(max_member_mb=0.115, max_depth=2))
    finally:
        os.chdir(cwd)
    assert not (tmp_path.parent / evil).exists() and not Path(f"/tmp/{evil}").exists()
    assert not (tmp_path.parent.parent / evil).exists()
    names = {r["source"]["path"] for r in read_samples(out)}
    assert {f"../../{evil}", f"/tmp/{evil}", "ok.jpg"} <= names
    records = [json.loads(line) for line in (out / "skipped.jsonl").open()]
    reasons = {r["source"]["path"] or Path(r["source"]["archive"]).name: r["reason"] for r in records}
    assert reasons["big.jpg"].startswith("member too large")
    assert reasons["bomb.bmp"].startswith(("suspicious compression ratio", "member too large"))
    assert reasons["link.png"] == "link member: not followed"
    assert reasons["dev.png"].startswith("special member")
    assert reasons["hostile.zip!l2.zip!l3.zip"].startswith("archive nested too deep: more than 2 levels")
    assert reasons["broken.tar.gz"].startswith("corrupt archive")
    assert reasons["notzip.zip"].startswith("corrupt archive")
    assert s["added"] == len(names) and names <= {f"../../{evil}", f"/tmp/{evil}", "ok.jpg", "a.png", "b.jpg"}


def test_zip_bomb_ratio_is_refused_before_reading(tmp_path):
    zpath = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb.bmp", b"\0" * 50_000_000)
    out = tmp_path / "set"
    s = shard_inputs([zpath], out, run_cfg())
    reason = json.loads((out / "skipped.jsonl").read_text())["reason"]
    assert s["skipped"] == 1 and reason.startswith("suspicious compression ratio")


def test_missing_input_is_one_line_error(tmp_path, capsys):
    rc = main(["shard", str(tmp_path / "nope"), "--out", str(tmp_path / "set"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "nope: input not found" in err
    assert not (tmp_path / "set").exists()


# --- --max-side, labels --------------------------------------------------------------------------------
def test_max_side_training_copy(shared_data, tmp_path):
    names = {"ecg00001.png", "ecg00005.jpg", "ecg00019.bmp", "ecg00015.png", "ecg00008.jpg"}
    picks = [p for p in printout_files(shared_data) if p.name in names]
    rotated = tmp_path / "rotated.jpg"  # a phone photo: EXIF says "rotate 90° to display"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(shared_data / "ecg-printouts" / "ecg00008.jpg").save(rotated, quality=92, exif=exif)
    picks.append(rotated)
    out = tmp_path / "set"
    s = shard_inputs(picks, out, run_cfg(max_side=512, workers=2))
    assert s["added"] == 6
    for tar in out.glob("shard-*.tar"):
        for key, _, data in read_shard(tar):
            doc = json.loads(data["json"])
            original = next(p for p in picks if key_of(p.read_bytes()) == key)
            img_bytes = data[doc["format"]]
            img = Image.open(io.BytesIO(img_bytes))
            assert tuple(doc["original_size"]) == Image.open(original).size
            assert tuple(doc["size"]) == img.size and max(img.size) <= 512
            if max(doc["original_size"]) > 512:
                assert max(img.size) == 512
            assert img.format == {".jpg": "JPEG", ".png": "PNG", ".bmp": "PNG"}[original.suffix]
            assert img.getexif().get(0x0112) == (6 if original == rotated else None)
            assert check_image_bytes(img_bytes, f"{key}.{doc['format']}") is None
    with pytest.raises(ShardSetError, match="built with max_side 512"):
        shard_inputs(picks[:1], out, run_cfg())


def test_csv_multilabel_meta_and_folder_labels(shared_data, tmp_path):
    files = printout_files(shared_data)[:4]
    data = tmp_path / "render-out"
    (data / "images").mkdir(parents=True)
    for p in files:
        shutil.copy(p, data / "images" / p.name)
    rows = ["path,label,strat_fold,ecg_id", f"images/{files[0].name},NORM,1,11",
            f"images/{files[1].name},MI;STTC,9,12", f"images/{files[2].name},,10,13"]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "set"
    rc = main(["shard", str(data / "images"), "--out", str(out), "--labels", str(data / "labels.csv"),
               "--workers", "1", "--no-progress"])
    assert rc == 0
    by_name = {Path(r["source"]["path"]).name: r for r in read_samples(out)}
    assert by_name[files[0].name]["label"] == "NORM"
    meta = by_name[files[0].name]["meta"]  # record ids travel as keyed pseudonyms (test_faults.py)
    assert meta["strat_fold"] == "1" and len(meta["ecg_id"]) == 16 and meta["ecg_id"] != "11"
    assert by_name[files[1].name]["label"] == ["MI", "STTC"]
    assert by_name[files[2].name]["label"] is None and by_name[files[3].name]["label"] is None
    m = read_manifest(out)
    assert m["classes"] == ["MI", "NORM", "STTC"] and m["multilabel"] is True

    classes = tmp_path / "classes"
    for cls, p in (("afib", files[0]), ("afib", files[1]), ("normal", files[2])):
        (classes / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, classes / cls / p.name)
    out2 = tmp_path / "set2"
    shard_inputs([classes], out2, run_cfg(labels="folders"))
    labels = {Path(r["source"]["path"]).name: r["label"] for r in read_samples(out2)}
    assert labels == {files[0].name: "afib", files[1].name: "afib", files[2].name: "normal"}
    assert read_manifest(out2)["classes"] == ["afib", "normal"] and read_manifest(out2)["multilabel"] is False


# --- verify --------------------------------------------------------------------------------------------
def test_verify_catches_tampered_shard_and_index(shared_data, tmp_path, capsys):
    picks = [p for p in printout_files(shared_data) if p.name in {"ecg00015.png", "ecg00017.png", "ecg00008.jpg"}]
    out = tmp_path / "set"
    shard_inputs(picks, out, run_cfg(max_count=2))
    target = key_of((shared_data / "ecg-printouts" / "ecg00017.png").read_bytes())
    shard = next(t for t in sorted(out.glob("shard-*.tar")) if any(k == target for k, _, _ in read_shard(t)))
    comp = next(c for k, comps, _ in read_shard(shard) if k == target for c in comps if c.ext == "png")
    blob = bytearray(shard.read_bytes())
    blob[comp.offset + comp.size // 2] ^= 0x55
    shard.write_bytes(bytes(blob))

    report = verify_shard_set(out, progress=False)
    msgs = [str(p) for p in report.problems]
    assert not report.ok
    assert any(m.startswith(shard.name) and "sha256" in m for m in msgs)
    assert any(m.startswith(f"{shard.name} key {target}: bad image") for m in msgs)

    other = next(t for t in sorted(out.glob("shard-*.tar")) if t != shard)
    idx = other.with_suffix(".idx")
    idx.write_text(idx.read_text().replace(" 512 ", " 1024 ", 1))
    rc = main(["verify", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 1 and f"{other.name}: index {idx.name} does not match the tar" in text and target in text


# --- imagecheck on real bytes --------------------------------------------------------------------------
def test_imagecheck_reasons(shared_data):
    raw = {p.name: p.read_bytes() for p in printout_files(shared_data)}
    for name in ("ecg00001.png", "ecg00005.jpg", "ecg00013.jpg", "ecg00019.bmp", "ecg00015.png"):
        assert check_image_bytes(raw[name], name) is None
    jpg, png, prog = raw["ecg00008.jpg"], raw["ecg00017.png"], raw["ecg00013.jpg"]
    cases = {
        "empty file": b"",
        "truncated JPEG": jpg[:-5000],
        "corrupt PNG: bad CRC": broken_crc_png(png),
        "truncated PNG": png[: len(png) // 2],
        "undecodable JPEG": damaged_jpeg(prog),
        "not an image": b"GIF89a but not really" * 10,
    }
    for prefix, data in cases.items():
        reason = check_image_bytes(data, "x")
        assert reason is not None and reason.startswith(prefix), (prefix, reason)
    assert check_image_bytes(jpg[:-5000], "x", decode=False).startswith("truncated JPEG")
    assert check_image_bytes(damaged_jpeg(prog), "x", decode=False) is None  # needs a decode
    with pytest.raises(BadImage, match="image too large"):
        ihdr = _png_chunk(b"IHDR", (50000).to_bytes(4, "big") * 2 + b"\x08\x02\0\0\0")  # 50000² RGB: a bomb
        inspect_image(PNG_SIGNATURE + ihdr + _png_chunk(b"IEND", b""))
    assert index_text(()) == "v1.2 0\n"


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + ctype + payload + zlib.crc32(ctype + payload).to_bytes(4, "big")


def test_damaged_manifest_is_an_error_naming_the_file(tmp_path):
    from dist_cardio.shard import read_manifest

    (tmp_path / "manifest.json").write_text('{"version": 1, "shards": [')
    with pytest.raises(ValueError, match=r"manifest\.json: damaged manifest"):
        read_manifest(tmp_path)
