"""12-lead ECG signals from PTB-XL, WFDB folders and `.npz` arrays, in millivolts and standard lead order.

Listing (`list_records`) is cheap and happens once in the parent process; reading a signal
(`load_record`) happens in the render workers, so a corrupt file costs one `RecordError` naming it,
never the run. Hospitals hold signals in these formats; the renderer turns them into printouts.
"""

from __future__ import annotations

import ast
import csv
import functools
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

SAMPLE_PTBXL = Path(__file__).resolve().parents[1] / "sample" / "ptbxl"
"""The 200 PTB-XL records (100 Hz) shipped with the package, for demos and tests."""

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
"""PTB-XL diagnostic superclasses, in the fixed order used for `;`-joined labels."""

NPZ_DEFAULT_FS = 100.0
"""Sampling rate assumed for an `.npz` without an `fs` array (the shared preprocessed PTB-XL is 100 Hz)."""

NPZ_LEAD_SD_MV = np.array([0.12, 0.13, 0.09, 0.12, 0.08, 0.10, 0.15, 0.26, 0.24, 0.23, 0.20, 0.17], np.float32)
"""Millivolts per unit of a z-scored `.npz` lead. Z-scoring loses absolute amplitude; these are the median
per-lead standard deviations of PTB-XL records 1-500 band-passed 0.5-40 Hz, so a z-scored record is drawn
with typical amplitudes and the usual lead-to-lead ratios (V2 tall, aVL small)."""

MAX_NPZ_BYTES = 8 << 30
"""Refuse `.npz` files that would decompress beyond this (a zip bomb must not exhaust memory)."""

_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3}

Kind = Literal["ptbxl", "wfdb", "npz"]


class InputError(ValueError):
    """INPUT as a whole cannot be used (wrong kind, missing table, bad id list); the message says the fix."""


class RecordError(ValueError):
    """One record cannot be read; the message starts with its file so the run can skip it and say which."""


@dataclass(frozen=True, eq=False)
class Record:
    """One 12-lead recording. `signal_mv` is float32 [T, 12] in `LEADS` order."""

    name: str
    signal_mv: np.ndarray
    fs: float
    labels: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class RecordRef:
    """Where a record lives, plus its labels: small and picklable, sent to render workers."""

    kind: Kind
    name: str
    path: str
    index: int = -1
    labels: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)


def detect_kind(path: Path) -> Kind:
    """PTB-XL root (has ptbxl_database.csv), `.npz` file, or a folder holding WFDB `.hea` headers."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: input not found (pass a PTB-XL root, a folder of WFDB records or an .npz)")
    if path.is_file():
        if path.suffix == ".npz":
            return "npz"
        raise InputError(f"{path}: not an .npz file; pass a PTB-XL root, a folder of WFDB records or an .npz")
    if (path / "ptbxl_database.csv").is_file():
        return "ptbxl"
    if next(path.rglob("*.hea"), None) is not None:
        return "wfdb"
    raise InputError(f"{path}: no ptbxl_database.csv and no WFDB .hea files; "
                     "pass a PTB-XL root, a WFDB folder or an .npz")


def list_records(path: Path, rate: int = 100, exclude_ids: frozenset[int] = frozenset()) -> list[RecordRef]:
    """Every record of INPUT in a stable order; `rate` picks PTB-XL's 100 or 500 Hz files."""
    kind = detect_kind(path)
    if kind == "ptbxl":
        refs = _list_ptbxl(path, rate)
    elif kind == "npz":
        refs = _list_npz(path)
    else:
        if exclude_ids:
            raise InputError(f"{path}: --exclude-ids needs ecg_ids, which a WFDB folder does not have "
                             "(use it with PTB-XL or .npz)")
        refs = _list_wfdb(path)
    return [r for r in refs if not r.meta.get("ecg_id") or int(r.meta["ecg_id"]) not in exclude_ids]


def iter_records(path: Path, rate: int = 100, exclude_ids: frozenset[int] = frozenset()) -> Iterator[Record]:
    """Read INPUT record by record (raises `RecordError` on the first unreadable one)."""
    for ref in list_records(path, rate, exclude_ids):
        yield load_record(ref)


def load_record(ref: RecordRef) -> Record:
    """Read one record's signal, in mV and `LEADS` order; any failure becomes a `RecordError` naming the file."""
    if ref.kind == "npz":
        signal, fs = _read_npz_row(Path(ref.path), ref.index)
    else:
        signal, fs = _read_wfdb(Path(ref.path))
    if signal.shape[0] < 2:
        raise RecordError(f"{ref.path}: record has {signal.shape[0]} samples, nothing to draw")
    # Missing samples (NaN) are drawn on the baseline rather than breaking the trace.
    signal = np.nan_to_num(signal, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32, copy=False)
    return Record(ref.name, signal, fs, ref.labels, dict(ref.meta))


def ptbxl_superclasses(scp_codes: dict[str, float], code_to_class: dict[str, str]) -> tuple[str, ...]:
    """Superclasses of the diagnostic codes present in a record (any likelihood), in `SUPERCLASSES` order."""
    found = {code_to_class[c] for c in scp_codes if c in code_to_class}
    return tuple(c for c in SUPERCLASSES if c in found)


def read_scp_statements(path: Path) -> dict[str, str]:
    """SCP code → superclass for statements with `diagnostic == 1` (PTB-XL's `scp_statements.csv`)."""
    if not path.is_file():
        raise InputError(f"{path}: missing; a PTB-XL root needs scp_statements.csv beside ptbxl_database.csv")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    try:
        i_diag, i_class = header.index("diagnostic"), header.index("diagnostic_class")
    except ValueError:
        raise InputError(f"{path}: needs columns 'diagnostic' and 'diagnostic_class' "
                         "(PTB-XL's scp_statements.csv)") from None
    table = {}
    for row in rows[1:]:
        if row[i_diag] and float(row[i_diag]) == 1.0 and row[i_class] in SUPERCLASSES:
            table[row[0]] = row[i_class]
    return table


def read_id_list(path: Path) -> frozenset[int]:
    """ecg_ids to drop: a CSV with an `ecg_id` column (e.g. another set's ptbxl_database.csv) or one id a line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: id list not found (a CSV with an ecg_id column, or one id per line)")
    with path.open(newline="") as f:
        first = f.readline()
        f.seek(0)
        if "ecg_id" in next(csv.reader([first]), []):
            values = [(i + 2, row["ecg_id"]) for i, row in enumerate(csv.DictReader(f))]
        else:
            values = [(i + 1, line.strip()) for i, line in enumerate(f) if line.strip() and not line.startswith("#")]
    ids = set()
    for line_no, value in values:
        try:
            ids.add(int(float(value)))
        except ValueError:
            raise InputError(f"{path}: line {line_no}: {value!r} is not an ecg_id (expected an integer)") from None
    return frozenset(ids)


def _list_ptbxl(root: Path, rate: int) -> list[RecordRef]:
    if rate not in (100, 500):
        raise InputError(f"{root}: --rate must be 100 or 500 (PTB-XL's records100 / records500), got {rate}")
    column = "filename_lr" if rate == 100 else "filename_hr"
    code_to_class = read_scp_statements(root / "scp_statements.csv")
    db = root / "ptbxl_database.csv"
    with db.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"ecg_id", "scp_codes", column} - set(reader.fieldnames or ())
        if missing:
            hint = "; this copy has only 100 Hz records, use --rate 100" if column == "filename_hr" else ""
            raise InputError(f"{db}: missing column(s) {', '.join(sorted(missing))}{hint}")
        refs = []
        for line_no, row in enumerate(reader, start=2):
            try:
                codes = ast.literal_eval(row["scp_codes"] or "{}")
            except (ValueError, SyntaxError):
                raise InputError(f"{db}: line {line_no}: scp_codes is not a dict literal") from None
            meta = {
                "ecg_id": str(int(float(row["ecg_id"]))),
                "strat_fold": _int_text(row.get("strat_fold", "")),
                "patient": _int_text(row.get("patient_id", "")),
            }
            filename = row[column]
            refs.append(RecordRef("ptbxl", Path(filename).name, str(root / filename), -1,
                                  ptbxl_superclasses(codes, code_to_class), meta))
    return refs


def _int_text(value: str) -> str:
    """'15709.0' → '15709' (pandas wrote PTB-XL's integer columns as floats); '' stays ''."""
    return str(int(float(value))) if value else ""


def _list_wfdb(root: Path) -> list[RecordRef]:
    refs = []
    for header in sorted(root.rglob("*.hea")):
        rel = header.relative_to(root).with_suffix("")
        refs.append(RecordRef("wfdb", "__".join(rel.parts), str(header.with_suffix(""))))
    return refs


def _list_npz(path: Path) -> list[RecordRef]:
    x, _, _ = _npz_arrays(str(path))
    with np.load(path, allow_pickle=False) as data:
        ids = data["ecg_id"] if "ecg_id" in data.files else None
    if ids is not None and len(ids) != len(x):
        raise InputError(f"{path}: ecg_id has {len(ids)} entries but X has {len(x)} records")
    if ids is None:
        return [RecordRef("npz", f"{path.stem}_{i:06d}", str(path), i) for i in range(len(x))]
    return [RecordRef("npz", f"ecg{int(e):05d}", str(path), i, (), {"ecg_id": str(int(e))}) for i, e in enumerate(ids)]


@functools.lru_cache(maxsize=1)
def _npz_arrays(path: str) -> tuple[np.ndarray, np.ndarray, float]:
    """X reordered to `LEADS`, per-lead mV scale, fs; cached so each worker decompresses the file once."""
    try:
        with zipfile.ZipFile(path) as z:
            size = sum(info.file_size for info in z.infolist())
    except (OSError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable .npz ({e})") from None
    if size > MAX_NPZ_BYTES:
        raise InputError(f"{path}: decompresses to {size / 2**30:.1f} GiB, "
                         f"over the {MAX_NPZ_BYTES >> 30} GiB limit; split it")
    with np.load(path, allow_pickle=False) as data:
        if "X" not in data.files:
            raise InputError(f"{path}: no array 'X' "
                             "(expected X [N, T, 12] z-scored signals, optional ecg_id, leads, fs)")
        x = data["X"]
        leads = [str(s) for s in data["leads"]] if "leads" in data.files else list(LEADS)
        fs = float(data["fs"]) if "fs" in data.files else NPZ_DEFAULT_FS
    if x.ndim != 3 or x.shape[2] != 12:
        raise InputError(f"{path}: X has shape {x.shape}, expected [N, T, 12]")
    order = _lead_order(leads, path)
    return x[:, :, order], NPZ_LEAD_SD_MV, fs


def _read_npz_row(path: Path, index: int) -> tuple[np.ndarray, float]:
    x, scale, fs = _npz_arrays(str(path))
    return x[index].astype(np.float32) * scale, fs


def _read_wfdb(record: Path) -> tuple[np.ndarray, float]:
    import wfdb  # imported here: it pulls in pandas/scipy, which .npz rendering does not need

    try:
        rec = wfdb.rdrecord(str(record), physical=True)
    except Exception as e:  # wfdb raises many types (ValueError, HeaderSyntaxError, OSError) for bad files
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise RecordError(f"{record}.hea: unreadable WFDB record ({type(e).__name__}: {first_line})") from None
    if rec.p_signal is None or rec.p_signal.ndim != 2:
        raise RecordError(f"{record}.hea: no signal data")
    order = _lead_order(rec.sig_name or [], f"{record}.hea", RecordError)
    scale = []
    for i in order:
        unit = (rec.units[i] if rec.units else "mV").strip().lower()
        if unit not in _UNIT_TO_MV:
            raise RecordError(f"{record}.hea: lead {rec.sig_name[i]} in unit {rec.units[i]!r}; expected mV, uV or V")
        scale.append(_UNIT_TO_MV[unit])
    return rec.p_signal[:, order].astype(np.float32) * np.asarray(scale, np.float32), float(rec.fs)


def _lead_order(names: list[str], source: object, error: type[ValueError] = InputError) -> list[int]:
    """Column index of each of `LEADS` in `names` (case-insensitive: PTB-XL writes 'AVR')."""
    upper = [n.strip().upper() for n in names]
    missing = [lead for lead in LEADS if lead.upper() not in upper]
    if missing:
        raise error(f"{source}: leads {names} lack {', '.join(missing)}; the renderer needs the 12 standard leads")
    return [upper.index(lead.upper()) for lead in LEADS]


__all__ = [
    "LEADS", "SUPERCLASSES", "SAMPLE_PTBXL", "NPZ_LEAD_SD_MV", "Record", "RecordRef", "RecordError", "InputError",
    "detect_kind", "list_records", "iter_records", "load_record", "ptbxl_superclasses", "read_scp_statements",
    "read_id_list",
]
