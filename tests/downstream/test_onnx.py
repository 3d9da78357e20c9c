"""`dist-cardio export` and `predict --model`: the ONNX file equals the PyTorch model on real rendered PTB-XL
pages, carries what a deployment needs, and predicts in a process where torch cannot be imported, importing
nothing beyond the `deploy` extra."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest

from dist_cardio import cli
from dist_cardio.downstream.onnx_export import TOLERANCE, export_onnx
from dist_cardio.downstream.onnx_model import load_onnx
from dist_cardio.downstream.page_input import read_pages
from dist_cardio.downstream.predict import load_finetuned
from dist_cardio.downstream.predictions import predict_files, write_predictions

REPO = Path(__file__).resolve().parents[2]
BLOCKING = """
import json, os, sys
BLOCKED = os.environ["BLOCKED"].split(",")
class Unimportable:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, Unimportable())
for name in BLOCKED:  # importing them fails: the proof the rest ran without them
    try:
        __import__(name)
    except ModuleNotFoundError:
        continue
    sys.exit(f"the block failed: {name} was imported")
from dist_cardio.cli import main
code = main(sys.argv[1:])
imported = {m.partition(".")[0] for m in sys.modules if not m.startswith("_")} - set(sys.stdlib_module_names)
print(json.dumps(sorted(imported)), file=sys.stderr)
sys.exit(code)
"""
"""Runs the CLI with the modules named in $BLOCKED unimportable; prints the third-party modules it imported."""
IMPORT_NAMES = {"pillow": "PIL"}
"""Distribution → module name, where they differ."""


def _deploy_modules() -> set[str]:
    """Top-level modules of the `deploy` extra's distributions (pyproject.toml)."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["deploy"]
    names = {re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower() for req in extra}
    return {IMPORT_NAMES.get(n, n) for n in names}


@pytest.fixture(scope="module")
def exported(finetuned, tmp_path_factory) -> Path:
    run, _ = finetuned
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(run / "best.pt"), "--out", str(out)]) == 0
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _same_predictions(a: list[dict[str, str]], b: list[dict[str, str]]) -> float:
    """Rows agree on everything but the probabilities; returns the largest probability difference."""
    assert [(r["path"], r["prediction"], r["error"]) for r in a] == [(r["path"], r["prediction"], r["error"]) for r in b]
    return max((abs(float(x[k]) - float(y[k])) for x, y in zip(a, b) for k in x if k.startswith("p_") and x[k]), default=0.0)


def _cli_without(blocked: tuple[str, ...], argv: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1", "BLOCKED": ",".join(blocked)}
    return subprocess.run([sys.executable, "-c", BLOCKING, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_export_metadata_and_dynamic_batch(finetuned, exported):
    run, _ = finetuned
    model = load_finetuned(run)
    proto = onnx.load(str(exported))
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    h, w = model.input_shape
    assert meta["classes"] == model.classes == ["MI", "NORM", "STTC"]
    assert (meta["task"], meta["threshold"]) == ("single-label", model.threshold)
    assert meta["input_shape"] == [h, w] and meta["mean"] == list(model.mean) and meta["std"] == list(model.std)
    assert meta["page"]["mode"] == "crop" and meta["image_cache"] == model.image_cache
    (image,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and isinstance(dims[0], str) and dims[1:] == [3, h, w]
    onnx_model = load_onnx(exported)
    assert onnx_model.spec == model.spec and not onnx_model.multilabel
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 3, h, w), dtype=np.float32)
        assert np.abs(onnx_model.probabilities(x) - model.probabilities(x)).max() < TOLERANCE


def test_export_parity_on_rendered_ptbxl_pages(finetuned, exported):
    run, hospital = finetuned
    model, onnx_model = load_finetuned(run), load_onnx(exported)
    pages, errors = read_pages(sorted(hospital.rglob("*.png"))[:24], model.decode_side)
    assert len(pages) == 24 and not errors
    batch = model.spec.batch([p for _, (p,) in pages])
    torch_probs, onnx_probs = model.probabilities(batch), onnx_model.probabilities(batch)
    assert np.abs(onnx_probs - torch_probs).max() < TOLERANCE
    assert np.allclose(onnx_probs.sum(axis=1), 1.0, atol=1e-5)


def test_predict_model_and_checkpoint_write_the_same_csv(finetuned, exported, tmp_path):
    run, hospital = finetuned
    images = tmp_path / "incoming"
    images.mkdir()
    good = sorted(hospital.rglob("*.png"))[:30]
    (images / "truncated.png").write_bytes(good[0].read_bytes()[:700])
    args = [*map(str, good), str(images), "--no-progress", "--batch-size", "8"]
    assert cli.main(["predict", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "torch.csv"), *args]) == 1
    assert cli.main(["predict", "--model", str(exported), "--out", str(tmp_path / "onnx.csv"), *args]) == 1
    torch_rows, onnx_rows = _rows(tmp_path / "torch.csv"), _rows(tmp_path / "onnx.csv")
    assert len(onnx_rows) == 31 and onnx_rows[-1]["error"] and list(onnx_rows[0]) == list(torch_rows[0])
    assert _same_predictions(torch_rows, onnx_rows) < 1e-4


def test_onnx_predict_runs_where_torch_cannot_be_imported(finetuned, exported, tmp_path):
    run, hospital = finetuned
    good = sorted(hospital.rglob("*.png"))[:12]
    out = tmp_path / "deploy.csv"
    done = _cli_without(("torch", "torchvision"), ["predict", "--model", str(exported), *map(str, good), "--out", str(out),
                                                   "--no-progress"])
    assert done.returncode == 0, done.stderr
    assert "predicted 12 of 12 images" in done.stdout
    imported = set(json.loads(done.stderr.strip().splitlines()[-1]))
    assert {"numpy", "PIL", "onnxruntime"} <= imported <= _deploy_modules() | {"dist_cardio"}, imported
    assert cli.main(["predict", "--checkpoint", str(run), *map(str, good), "--out", str(tmp_path / "t.csv"), "--no-progress"]) == 0
    assert _same_predictions(_rows(tmp_path / "t.csv"), _rows(out)) < 1e-4

    # without onnxruntime: one line saying what to install
    done = _cli_without(("torch", "onnxruntime"), ["predict", "--model", str(exported), str(good[0]), "--out", str(out)])
    assert done.returncode == 2 and "--model needs onnxruntime" in done.stderr and "deploy" in done.stderr, done.stderr
    # a torch-free install asked to export (or train): one line, not a traceback
    done = _cli_without(("torch",), ["export", "--checkpoint", str(run), "--out", str(tmp_path / "m.onnx")])
    assert done.returncode == 2 and "dist-cardio export: error: needs torch" in done.stderr, done.stderr


def test_multilabel_export_keeps_task_and_threshold(finetuned, tmp_path):
    run, hospital = finetuned
    model = dataclasses.replace(load_finetuned(run), multilabel=True, threshold=0.3)  # the same weights read as sigmoid
    files = sorted(hospital.rglob("*.png"))[:10]
    pages = [p for _, (p,) in read_pages(files[:2], model.decode_side)[0]]
    report = export_onnx(model, tmp_path / "ml.onnx", pages=pages)
    assert report.max_abs_diff < TOLERANCE and report.samples == 5 and report.bytes > 10_000
    onnx_model = load_onnx(tmp_path / "ml.onnx")
    assert (onnx_model.multilabel, onnx_model.threshold) == (True, 0.3)
    for name, predictor in (("torch", model), ("onnx", onnx_model)):
        write_predictions(tmp_path / f"{name}.csv", predictor, *predict_files(predictor, files, 4, progress=False))
    assert _same_predictions(_rows(tmp_path / "torch.csv"), _rows(tmp_path / "onnx.csv")) < 1e-4


def test_export_and_model_errors_are_one_line(finetuned, exported, tmp_path, capsys):
    run, hospital = finetuned
    image = str(next(hospital.rglob("*.png")))
    with pytest.raises(ValueError, match="not written: ONNX Runtime's probabilities differ"):
        export_onnx(load_finetuned(run), tmp_path / "never.onnx", tolerance=0.0)
    assert list(tmp_path.iterdir()) == []  # nothing left behind, not even the temporary file

    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    plain = tmp_path / "plain.onnx"  # a valid ONNX model without dist_cardio metadata
    node = onnx.helper.make_node("Identity", ["image"], ["probabilities"])
    tensor = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [tensor("image", onnx.TensorProto.FLOAT, [1, 3])],
                                   [tensor("probabilities", onnx.TensorProto.FLOAT, [1, 3])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10), str(plain))
    capsys.readouterr()
    cases = [
        (["export", "--checkpoint", str(tmp_path / "junk.onnx"), "--out", str(tmp_path / "m.onnx")], "junk.onnx"),
        (["export", "--checkpoint", str(run), "--out", str(tmp_path / "m.pt")], "must be a .onnx file"),
        (["predict", "--model", str(tmp_path / "junk.onnx"), image, "--out", str(tmp_path / "p.csv")], "not a loadable ONNX model"),
        (["predict", "--model", str(plain), image, "--out", str(tmp_path / "p.csv")], "no dist_cardio metadata"),
        (["predict", "--model", str(tmp_path / "missing.onnx"), image, "--out", str(tmp_path / "p.csv")], "dist-cardio export"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "p.csv").exists()
