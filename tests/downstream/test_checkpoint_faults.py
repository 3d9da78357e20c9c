"""Checkpoints from other sites: random, empty, cut, bit-flipped, malicious or the wrong kind of file, and weights that
do not fit their config. `finetune`, `predict`, `evaluate` and `explain` answer each with one line naming the file,
exit 2, no traceback, never PyTorch's advice to disable `weights_only`, never "delete" the user's own input."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch

from dist_cardio import cli
from dist_cardio.config import to_dict
from dist_cardio.model import SimCardioNet, preset
from dist_cardio.train.checkpoint import CheckpointManager


class Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pretraining_checkpoint(folder: Path, widths: list[int] | None = None) -> Path:
    """A real pretraining checkpoint of the tiny model; `widths` stores another config than the weights have."""
    torch.manual_seed(0)
    encoder = SimCardioNet(preset("tiny"))
    config = to_dict(encoder.cfg)
    if widths is not None:
        config["widths"] = widths
    return CheckpointManager(folder).save({"model": encoder.state_dict(), "config": {"model": config}}, step=3)


def flip_a_byte(source: Path, target: Path) -> Path:
    """`source` with one byte of its largest stored member changed (the zip directory stays valid)."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, finetuned) -> dict[str, tuple[Path, str]]:
    """name → (file, what the one-line error must say)."""
    d = tmp_path_factory.mktemp("bad")
    good = pretraining_checkpoint(d / "good")
    real = good.read_bytes()
    (d / "random.pt").write_bytes(os.urandom(4096))
    (d / "empty.pt").write_bytes(b"")
    (d / "cut.pt").write_bytes(real[: len(real) // 2])
    torch.save({"format": "dist_cardio.checkpoint/1", "step": 1, "model": Payload(d / "PWNED")}, d / "malicious.pt")
    torch.save(SimCardioNet(preset("tiny")).state_dict(), d / "foreign.pt")
    mismatch = pretraining_checkpoint(d / "mismatch", widths=[16, 32, 128])
    os.mkfifo(d / "fifo.pt")
    return {
        "random": (d / "random.pt", "not a PyTorch checkpoint"),
        "empty": (d / "empty.pt", "empty file"),
        "cut": (d / "cut.pt", "cut short"),
        "flipped": (flip_a_byte(good, d / "flipped.pt"), "CRC mismatch"),
        "malicious": (d / "malicious.pt", "refused unread"),
        "foreign": (d / "foreign.pt", "not a dist_cardio"),
        "mismatch": (mismatch, "do not fit the model config"),
        "fifo": (d / "fifo.pt", "not a regular file"),
    }


def one_line_error(capsys, argv: list[str]) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (argv, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err, err
    return err


@pytest.mark.parametrize("case", ["random", "empty", "cut", "flipped", "malicious", "foreign", "mismatch", "fifo"])
def test_finetune_refuses_a_bad_pretraining_checkpoint_in_one_line(case, bad_files, finetuned, tmp_path, capsys):
    path, says = bad_files[case]
    _, hospital = finetuned
    err = one_line_error(capsys, ["finetune", "--checkpoint", str(path), "--data", str(hospital), "--out",
                                  str(tmp_path / "out"), "--config", "configs/finetune/tiny.yaml", "--no-progress"])
    assert str(path) in err and says in err, err
    assert "Delete" not in err and "--from-scratch" in err, err
    assert not (path.parent / "PWNED").exists()
    assert not (tmp_path / "out" / "best.pt").exists()


@pytest.mark.parametrize("case", ["random", "empty", "cut", "flipped", "malicious", "foreign", "fifo"])
@pytest.mark.parametrize("command", ["predict", "evaluate", "explain"])
def test_predict_evaluate_explain_refuse_a_bad_model_file_in_one_line(command, case, bad_files, finetuned, tmp_path, capsys):
    path, says = bad_files[case]
    run, hospital = finetuned
    image = str(next(p for p in hospital.rglob("*.png")))
    argv = {"predict": ["predict", image, "--checkpoint", str(path), "--out", str(tmp_path / "p.csv")],
            "evaluate": ["evaluate", "--checkpoint", str(path), "--data", str(hospital), "--out", str(tmp_path / "ev")],
            "explain": ["explain", image, "--checkpoint", str(path), "--out", str(tmp_path / "ex")]}[command]
    err = one_line_error(capsys, argv)
    assert str(path) in err and says in err and "best.pt" in err, err
    assert not (path.parent / "PWNED").exists()


def test_the_wrong_kind_of_dist_cardio_file_is_named(bad_files, finetuned, tmp_path, capsys):
    run, hospital = finetuned
    pretrained = bad_files["flipped"][0].parent / "good" / "latest"
    image = str(next(p for p in hospital.rglob("*.png")))
    err = one_line_error(capsys, ["predict", image, "--checkpoint", str(pretrained), "--out", str(tmp_path / "p.csv")])
    assert "a pretraining checkpoint: fine-tune it first" in err, err
    err = one_line_error(capsys, ["finetune", "--checkpoint", str(run / "best.pt"), "--data", str(hospital),
                                  "--out", str(tmp_path / "out"), "--no-progress"])
    assert "a fine-tuned model, not a pretraining checkpoint" in err, err


def test_a_damaged_latest_in_pretraining_still_points_at_the_older_step(tmp_path):
    """The resume path keeps its own advice (its own output folder): replace `latest` with the previous step."""
    folder = tmp_path / "checkpoints"
    manager = CheckpointManager(folder, keep=3)
    state = {"model": {"w": torch.ones(3)}, "config": {}}
    manager.save(state, step=1)
    manager.save(state, step=2)
    (folder / "latest").unlink()
    (folder / "latest").write_bytes(b"")
    with pytest.raises(ValueError, match=r"latest: unreadable checkpoint \(empty file.*ln -f .*step-00000002\.pt"):
        manager.load_latest()
