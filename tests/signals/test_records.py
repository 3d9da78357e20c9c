"""Readers on real files: PTB-XL labels checked by hand against scp_statements.csv, WFDB/.mat, .npz, corrupt records."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import wfdb

from dist_cardio.signals.records import (
    LEADS,
    NPZ_LEAD_SD_MV,
    SAMPLE_PTBXL,
    InputError,
    RecordError,
    detect_kind,
    iter_records,
    list_records,
    load_record,
    ptbxl_superclasses,
    read_id_list,
)

NPZ = "ptbxl-1819-preprocessed/ptbxl_1819_bp0.5-40_zscore_100hz_f16.npz"


@pytest.fixture(scope="module")
def ptbxl_refs(shared_data):
    return {int(r.meta["ecg_id"]): r for r in list_records(shared_data / "ptbxl-500")}


# Read off ptbxl_database.csv and scp_statements.csv by hand:
#   1  {NORM, LVOLT, SR}: LVOLT is a form statement, SR a rhythm → NORM
#   8  {IMI, ABQRS, SR}: IMI diagnostic_class MI → MI
#  17  {AFLT, ABQRS, AFIB}: rhythm/form only, no diagnostic code → no label
#  26  {NST_, DIG, SR}: both STTC → STTC once
#  39  {IMI: 15.0, LNGQT, NST_, DIG, ...}: a low-likelihood code still counts → MI;STTC
# 162  {ASMI, LAFB, LVH, ISC_, SR} → all four non-NORM classes, in the fixed order
# 235  {NORM, LAFB, SBRAD} → NORM;CD
HAND_CHECKED = {1: ("NORM",), 8: ("MI",), 17: (), 26: ("STTC",), 39: ("MI", "STTC"),
                162: ("MI", "STTC", "CD", "HYP"), 235: ("NORM", "CD")}


@pytest.mark.parametrize("ecg_id", sorted(HAND_CHECKED))
def test_ptbxl_superclasses_match_hand_reading(ptbxl_refs, ecg_id):
    assert ptbxl_refs[ecg_id].labels == HAND_CHECKED[ecg_id]


def test_ptbxl_label_counts_and_meta(ptbxl_refs):
    counts = {c: sum(c in r.labels for r in ptbxl_refs.values()) for c in ("NORM", "MI", "STTC", "CD", "HYP")}
    assert counts == {"NORM": 297, "MI": 73, "STTC": 96, "CD": 78, "HYP": 40}  # shared/data/README.md
    assert sum(not r.labels for r in ptbxl_refs.values()) == 12
    assert ptbxl_refs[1].meta == {"ecg_id": "1", "strat_fold": "3", "patient": "15709"}
    assert ptbxl_refs[1].name == "00001_lr"


def test_superclass_order_is_fixed_not_input_order():
    table = {"LVH": "HYP", "IMI": "MI", "NORM": "NORM"}
    assert ptbxl_superclasses({"LVH": 100.0, "IMI": 0.0, "SR": 0.0, "NORM": 80.0}, table) == ("NORM", "MI", "HYP")


def test_ptbxl_signal_is_wfdb_signal_in_standard_lead_order(shared_data, ptbxl_refs):
    rec = load_record(ptbxl_refs[2])
    raw = wfdb.rdrecord(str(shared_data / "ptbxl-500/records100/00000/00002_lr"))
    assert raw.sig_name[3] == "AVR" and rec.fs == 100.0 and rec.signal_mv.shape == (1000, 12)
    np.testing.assert_allclose(rec.signal_mv, raw.p_signal, atol=1e-6)
    hr = load_record(list_records(shared_data / "ptbxl-500", rate=500)[1])
    assert hr.name == "00002_hr" and hr.fs == 500.0 and hr.signal_mv.shape == (5000, 12)


def test_sample_has_200_records_and_no_500hz_files():
    refs = list_records(SAMPLE_PTBXL)
    assert len(refs) == 200 and refs[0].labels == ("NORM",)
    with pytest.raises(InputError, match="--rate 100"):
        list_records(SAMPLE_PTBXL, rate=500)


def test_g12ec_mat_records_read_without_labels(shared_data):
    refs = list_records(shared_data / "g12ec-50")
    assert len(refs) == 50 and refs[0].name == "E07500" and refs[0].labels == ()
    rec = next(iter_records(shared_data / "g12ec-50"))
    raw = wfdb.rdrecord(str(shared_data / "g12ec-50/E07500"))
    assert rec.fs == 500.0 and rec.signal_mv.shape == (5000, 12)
    np.testing.assert_allclose(rec.signal_mv, raw.p_signal, atol=1e-6)


def test_wfdb_leads_are_reordered_and_units_converted(tmp_path, shared_data):
    src = load_record(list_records(shared_data / "g12ec-50")[1]).signal_mv
    order = list(reversed(range(12)))
    wfdb.wrsamp("shuffled", fs=250, units=["uV"] * 12, sig_name=[LEADS[i] for i in order],
                p_signal=src[:, order].astype(np.float64) * 1000.0, fmt=["16"] * 12, write_dir=str(tmp_path))
    rec = load_record(list_records(tmp_path)[0])
    assert rec.fs == 250.0
    np.testing.assert_allclose(rec.signal_mv, src, atol=2e-3)


def test_wfdb_record_missing_a_lead_is_a_record_error(tmp_path):
    wfdb.wrsamp("eleven", fs=100, units=["mV"] * 11, sig_name=list(LEADS[:11]), p_signal=np.zeros((100, 11)),
                fmt=["16"] * 11, write_dir=str(tmp_path))
    with pytest.raises(RecordError, match=r"eleven\.hea.*V6"):
        load_record(list_records(tmp_path)[0])


def test_corrupt_records_raise_record_error_naming_the_file(tmp_path, shared_data):
    src = shared_data / "ptbxl-500/records100/00000"
    shutil.copy(src / "00001_lr.hea", tmp_path / "00001_lr.hea")
    (tmp_path / "00001_lr.dat").write_bytes((src / "00001_lr.dat").read_bytes()[:5000])  # truncated
    (tmp_path / "garbage.hea").write_text("this is not a header\n")
    refs = list_records(tmp_path)
    assert [r.name for r in refs] == ["00001_lr", "garbage"]
    for ref in refs:
        with pytest.raises(RecordError, match=ref.name + r"\.hea"):
            load_record(ref)


def test_npz_rows_scaled_per_lead_and_overlap_excluded(shared_data):
    path = shared_data / NPZ
    refs = list_records(path)
    assert len(refs) == 1819 and refs[0].labels == ()
    with np.load(path) as data:
        x0, id0, leads = data["X"][0].astype(np.float32), int(data["ecg_id"][0]), list(data["leads"])
    assert leads[3] == "AVR"
    assert refs[0].name == f"ecg{id0:05d}" and refs[0].meta == {"ecg_id": str(id0)}
    rec = load_record(refs[0])
    assert rec.fs == 100.0 and rec.signal_mv.shape == (1000, 12)
    np.testing.assert_allclose(rec.signal_mv, x0 * NPZ_LEAD_SD_MV, rtol=1e-6)
    kept = list_records(path, exclude_ids=read_id_list(shared_data / "ptbxl-500/ptbxl_database.csv"))
    assert len(kept) == 1819 - 34  # shared/data/README.md: 34 ids overlap ptbxl-500
    assert not {int(r.meta["ecg_id"]) for r in kept} & set(range(1, 501))


def test_id_list_plain_text_and_bad_line(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("# overlap\n12\n\n345\n")
    assert read_id_list(ids) == {12, 345}
    ids.write_text("12\nabc\n")
    with pytest.raises(InputError, match=r"ids\.txt: line 2"):
        read_id_list(ids)


def test_bad_inputs_are_one_line_errors(tmp_path, shared_data):
    with pytest.raises(FileNotFoundError, match="not found"):
        detect_kind(tmp_path / "missing")
    with pytest.raises(InputError, match="no ptbxl_database.csv"):
        detect_kind(tmp_path)
    with pytest.raises(InputError, match="exclude-ids"):
        list_records(shared_data / "g12ec-50", exclude_ids=frozenset({1}))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match=r"broken\.npz"):
        list_records(tmp_path / "broken.npz")
