"""Printouts: page geometry at 25 mm/s and 10 mm/mV measured in pixels, header band, datasets on real records."""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from dist_cardio.cli import main
from dist_cardio.signals.records import LEADS, SAMPLE_PTBXL
from dist_cardio.signals.render import (
    CAL_X_MM,
    HEADER_MM,
    ROW_BASELINES_MM,
    TRACE_X0_MM,
    RenderConfig,
    header_text,
    render_dataset,
    render_printout,
    vary_config,
)

NPZ = "ptbxl-1819-preprocessed/ptbxl_1819_bp0.5-40_zscore_100hz_f16.npz"


def step_signal(fs: float) -> np.ndarray:
    """10 s of 0 mV except: lead II +1 mV for 1-2 s, aVF -1 mV for 3-4 s, V2 +1 mV for 6-7 s."""
    t = np.arange(int(10 * fs)) / fs
    sig = np.zeros((len(t), 12), np.float32)
    sig[(t >= 1) & (t < 2), LEADS.index("II")] = 1.0
    sig[(t >= 3) & (t < 4), LEADS.index("aVF")] = -1.0
    sig[(t >= 6) & (t < 7), LEADS.index("V2")] = 1.0
    return sig


def ink_runs(line: np.ndarray) -> list[float]:
    """Centres (px) of the runs of dark pixels along one image row or column; grid lines are not dark."""
    dark = np.flatnonzero(line.max(axis=-1) < 100)
    if not len(dark):
        return []
    runs = np.split(dark, np.flatnonzero(np.diff(dark) > 1) + 1)
    return [float(r.mean()) for r in runs]


def render(cfg: RenderConfig, sig: np.ndarray | None = None, fs: float = 500.0, header: str | None = "ID x",
           seed: int = 0) -> np.ndarray:
    sig = step_signal(fs) if sig is None else sig
    return np.asarray(render_printout(sig, fs, cfg, header, np.random.default_rng(seed)).convert("RGB"))


@pytest.mark.parametrize("dpi", [100, 200, 300])
def test_page_is_a4_landscape_at_dpi(dpi):
    expected = (round(297 / 25.4 * dpi), round(210 / 25.4 * dpi))
    assert RenderConfig(dpi=dpi).size == expected
    assert render(RenderConfig(dpi=dpi), fs=100.0).shape == (expected[1], expected[0], 3)
    if dpi == 200:
        assert expected == (2339, 1654)


def test_traces_at_10_mm_per_mv_and_25_mm_per_s_in_their_column_windows():
    cfg = RenderConfig(dpi=200)
    k = 200 / 25.4
    img = render(cfg)
    row = dict(zip(("row1", "row2", "row3", "rhythm"), ROW_BASELINES_MM))

    def column_at(t: float) -> list[float]:
        return ink_runs(img[:, round((TRACE_X0_MM + 25.0 * t) * k)])

    def expect(mm: list[float], got: list[float]) -> None:
        assert len(got) == len(mm), (mm, [g / k for g in got])
        np.testing.assert_allclose(got, [m * k for m in mm], atol=1.5)

    # t = 1.5 s: column 0 (I, II, III); lead II is 1 mV up = 10 mm higher, in its row and the rhythm strip.
    expect([row["row1"], row["row2"] - 10, row["row3"], row["rhythm"] - 10], column_at(1.5))
    # t = 3.5 s: column 1 (aVR, aVL, aVF) shows seconds 2.5-5: aVF 1 mV down.
    expect([row["row1"], row["row2"], row["row3"] + 10, row["rhythm"]], column_at(3.5))
    # t = 6.5 s: column 2 (V1, V2, V3) shows seconds 5-7.5: V2 up in the middle row.
    expect([row["row1"], row["row2"] - 10, row["row3"], row["rhythm"]], column_at(6.5))
    # 25 mm/s: lead II's edges at 1 s and 2 s in the rhythm strip are 25 mm apart, at the computed x.
    edges = ink_runs(img[round((row["rhythm"] - 5) * k)])
    inside = [e for e in edges if e > (TRACE_X0_MM + 5) * k]
    np.testing.assert_allclose(inside, [(TRACE_X0_MM + 25.0) * k, (TRACE_X0_MM + 50.0) * k], atol=1.5)


@pytest.mark.parametrize("dpi", [100, 300])
def test_calibration_pulse_is_10_mm_high_at_every_row(dpi):
    k = dpi / 25.4
    img = render(RenderConfig(dpi=dpi, grid="pink"), fs=100.0)
    x_base = round((CAL_X_MM[0] + CAL_X_MM[1]) / 2 * k)
    x_top = round((CAL_X_MM[1] + CAL_X_MM[2]) / 2 * k)
    for baseline in ROW_BASELINES_MM:
        band = slice(round((baseline - 13) * k), round((baseline + 3) * k))
        (base,), (top,) = ink_runs(img[band, x_base]), ink_runs(img[band, x_top])
        assert base - top == pytest.approx(10 * k, abs=1.0)
        assert base + band.start == pytest.approx(baseline * k, abs=1.0)


def test_header_switch_changes_only_the_header_band():
    cfg = RenderConfig(dpi=150, noise=6.0)
    on = render(cfg, header=header_text("00001_lr", 500.0), seed=3)
    off = render(RenderConfig(dpi=150, noise=6.0, header=False), header=header_text("00001_lr", 500.0), seed=3)
    rows = np.flatnonzero((on != off).any(axis=(1, 2)))
    assert len(rows) > 0 and rows.max() < HEADER_MM * 150 / 25.4
    assert np.array_equal(render(cfg, header=None, seed=3), off)


def test_header_text_names_record_speed_gain_and_rate():
    assert header_text("E07500", 500.0) == "E07500    25 mm/s    10 mm/mV    500 Hz"


def test_effects_change_pixels_and_grid_colours_differ():
    base = render(RenderConfig(dpi=100), fs=100.0)
    for changed in (RenderConfig(dpi=100, rotation=2.0), RenderConfig(dpi=100, blur=1.0),
                    RenderConfig(dpi=100, noise=8.0), RenderConfig(dpi=100, line_width=0.6)):
        assert not np.array_equal(render(changed, fs=100.0), base)
    blank = render(RenderConfig(dpi=100, grid="none"), fs=100.0)
    grey = render(RenderConfig(dpi=100, grid="grey"), fs=100.0)

    def is_grey(a: np.ndarray) -> bool:
        return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())

    white = [float((a == 255).all(axis=-1).mean()) for a in (blank, grey)]
    assert is_grey(blank) and is_grey(grey) and not is_grey(base)
    assert white[0] > 0.97 > white[1]  # "none" is blank paper; the grey grid covers the page


def test_config_validation_and_vary_ranges():
    with pytest.raises(ValueError, match="dpi"):
        RenderConfig(dpi=10)
    with pytest.raises(ValueError, match="grid"):
        RenderConfig(grid="blue")
    rng = np.random.default_rng(0)
    variants = [vary_config(RenderConfig(), rng) for _ in range(50)]
    assert {v.dpi for v in variants} == {150, 200, 250}
    assert {v.grid for v in variants} == {"red", "pink", "grey", "none"}
    assert all(abs(v.rotation) <= 3 and 0 <= v.noise <= 12 and 60 <= v.jpeg_quality <= 95 for v in variants)
    assert {v.header for v in variants} == {True, False}
    assert not any(vary_config(RenderConfig(header=False), rng).header for _ in range(20))
    same_seed = [vary_config(RenderConfig(), np.random.default_rng(7)) for _ in range(2)]
    assert same_seed[0] == same_seed[1]


def read_labels(out):
    with (out / "labels.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_ptbxl_dataset_labels_csv_and_resume(tmp_path, shared_data, caplog, capsys):
    out = tmp_path / "out"
    cfg = RenderConfig(dpi=60)
    summary = render_dataset(shared_data / "ptbxl-500", out, cfg, workers=1, limit=8)
    assert (summary["written"], summary["skipped"], summary["failed"]) == (8, 0, 0)
    rows = read_labels(out)
    assert list(rows[0]) == ["path", "label", "strat_fold", "ecg_id", "patient"]
    assert rows[0] == {"path": "images/00001_lr.png", "label": "NORM", "strat_fold": "3", "ecg_id": "1",
                       "patient": "15709"}
    assert rows[7]["label"] == "MI" and rows[7]["ecg_id"] == "8"
    assert Image.open(out / rows[0]["path"]).size == cfg.size
    logged = caplog.text + "".join(capsys.readouterr())
    assert "15709" not in logged  # patient ids stay out of logs
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    (out / "images" / "00009_lr.png.tmp-999").write_bytes(b"half an image from a killed run")
    again = render_dataset(shared_data / "ptbxl-500", out, cfg, workers=1, limit=3)
    assert (again["written"], again["skipped"]) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == before
    assert len(read_labels(out)) == 8  # rows of the earlier, larger run are kept


def test_npz_and_g12ec_inputs_render(tmp_path, shared_data):
    for source in (shared_data / NPZ, shared_data / "g12ec-50"):
        out = tmp_path / source.stem
        cfg = RenderConfig(dpi=60, format="jpg", header=False)
        assert render_dataset(source, out, cfg, workers=1, limit=2)["written"] == 2
        rows = read_labels(out)
        assert len(rows) == 2 and all(r["label"] == "" and r["patient"] == "" for r in rows)
        img = Image.open(out / rows[0]["path"])
        assert img.format == "JPEG" and img.size == cfg.size
        assert (np.asarray(img).max(axis=-1) < 100).mean() > 0.002  # traces were drawn
    assert read_labels(tmp_path / NPZ.split("/")[1].removesuffix(".npz"))[0]["ecg_id"].isdigit()


def test_corrupt_record_is_skipped_with_a_warning(tmp_path, shared_data, caplog):
    src = tmp_path / "wfdb"
    src.mkdir()
    for name in ("E07500", "E07501", "E07502"):
        for ext in (".hea", ".mat"):
            shutil.copy(shared_data / "g12ec-50" / (name + ext), src)
    (src / "E07501.mat").write_bytes((src / "E07501.mat").read_bytes()[:3000])
    with caplog.at_level(logging.WARNING):
        summary = render_dataset(src, tmp_path / "out", RenderConfig(dpi=60), workers=1)
    assert (summary["written"], summary["failed"]) == (2, 1)
    assert "E07501.hea" in caplog.text and len(caplog.records) == 1
    assert [r["path"] for r in read_labels(tmp_path / "out")] == ["images/E07500.png", "images/E07502.png"]


def test_two_workers_give_the_same_images_as_one(tmp_path):
    def digests(workers: int) -> dict[str, str]:
        out = tmp_path / f"w{workers}"
        render_dataset(SAMPLE_PTBXL, out, RenderConfig(dpi=60), workers=workers, limit=6, vary=True, seed=11)
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "images").iterdir()}

    one, two = digests(1), digests(2)
    assert len(one) == 6 and one == two
    assert (tmp_path / "w1" / "labels.csv").read_bytes() == (tmp_path / "w2" / "labels.csv").read_bytes()


def test_cli_render_sample_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["render", "sample", "--out", str(out), "--limit", "2", "--workers", "1", "--dpi", "60",
               "--format", "jpg", "--no-header", "--grid", "grey"])
    assert rc == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00001_lr.jpg", "00002_lr.jpg"]
    assert "rendered 2" in capsys.readouterr().out
    assert main(["render", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing: input not found" in err and len(err.strip().splitlines()) == 1
    assert main(["render", "sample", "--out", str(out), "--set", "dpi=5"]) == 2
    assert "dpi must be in 50..600" in capsys.readouterr().err

