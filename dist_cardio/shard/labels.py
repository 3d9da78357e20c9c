"""Labels for sharded images: class sub-folders, or a CSV ``path,label[,extra columns → meta]``.

A CSV ``path`` may be relative to the CSV's folder (as ``dist-cardio render`` writes ``labels.csv``),
relative to the input folder, or an archive member path; when none matches exactly, a file name that
occurs once in the CSV still matches. ``A;B`` is a multi-label sample (label becomes a list).
"""

from __future__ import annotations

import csv
import posixpath
from collections import defaultdict
from pathlib import Path, PurePosixPath

from dist_cardio.shard.sources import Candidate

Label = str | list[str] | None


def parse_label(text: str) -> Label:
    """``''`` → None, ``'MI'`` → ``'MI'``, ``'MI;STTC'`` → ``['MI', 'STTC']``."""
    text = text.strip()
    if not text:
        return None
    if ";" in text:
        return [part.strip() for part in text.split(";") if part.strip()]
    return text


def read_label_rows(csv_path: Path) -> list[dict[str, str]]:
    """The rows of a ``path,label[,...]`` CSV (a BOM from spreadsheet exports is dropped); one-line error if a column is missing."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "path" not in columns or "label" not in columns:
            raise ValueError(f"{csv_path}: needs columns 'path' and 'label' (has: {', '.join(columns) or 'none'})")
        return list(reader)


def _norm(path: str) -> str:
    return posixpath.normpath(path.replace("\\", "/").strip().lstrip("/"))


class FolderLabels:
    """Label = the folder directly holding the image inside its input folder or archive."""

    def __init__(self) -> None:
        self.unlabeled = 0

    def lookup(self, item: Candidate) -> tuple[Label, dict[str, str]]:
        parents = [p for p in PurePosixPath(item.rel).parent.parts if p not in ("", ".", "..", "/")]
        if not parents:
            self.unlabeled += 1
            return None, {}
        return parents[-1], {}


class CsvLabels:
    """Rows of a labels CSV, matched to images by path (see module docstring)."""

    def __init__(self, csv_path: Path) -> None:
        if not csv_path.is_file():
            raise FileNotFoundError(f"{csv_path}: labels CSV not found (pass --labels folders or an existing CSV)")
        rows = read_label_rows(csv_path)
        base = csv_path.parent.absolute()
        self._rows: list[tuple[Label, dict[str, str]]] = []
        self._by_path: dict[str, int] = {}
        by_name: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            raw = (row["path"] or "").strip()
            if not raw:
                raise ValueError(f"{csv_path}: row {i + 2} has an empty path")
            meta = {k: (v or "") for k, v in row.items() if k not in ("path", "label") and k is not None}
            self._rows.append((parse_label(row["label"] or ""), meta))
            absolute = str(Path(raw) if Path(raw).is_absolute() else base / raw)
            for key in {_norm(raw), _norm(posixpath.normpath(absolute))}:
                if key in self._by_path and self._rows[self._by_path[key]][0] != self._rows[i][0]:
                    raise ValueError(f"{csv_path}: row {i + 2} gives {raw!r} a second label; keep one row per image")
                self._by_path.setdefault(key, i)
            by_name[PurePosixPath(_norm(raw)).name].append(i)
        self._by_name = {name: ids[0] for name, ids in by_name.items() if len(ids) == 1}
        self.unlabeled = 0

    def lookup(self, item: Candidate) -> tuple[Label, dict[str, str]]:
        where = item.file or item.source.path  # a plain file's absolute path, or the member name
        row = next((self._by_path[k] for k in (_norm(where), _norm(item.rel)) if k in self._by_path), None)
        if row is None:
            row = self._by_name.get(PurePosixPath(_norm(item.rel)).name)
        if row is None:
            self.unlabeled += 1
            return None, {}
        label, meta = self._rows[row]
        return label, dict(meta)


def label_source(spec: str) -> FolderLabels | CsvLabels:
    """``folders`` or the path of a labels CSV."""
    return FolderLabels() if spec == "folders" else CsvLabels(Path(spec))
