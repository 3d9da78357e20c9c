"""Careless command lines get one line and exit 2 before any work: sizes below 1, a GPU that is not there, a folder where
a CSV goes, a `--set` that breaks a config (the message names the `--set`, not only the YAML), a damaged manifest."""

from __future__ import annotations


import pytest
import torch

from dist_cardio import cli


def usage_error(capsys, argv: list[str]) -> str:
    """argparse's refusal: exit 2 and one `error:` line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    return err[-1]


def one_line(capsys, argv: list[str]) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_predict_batch_size_below_one_is_refused(value, finetuned, tmp_path, capsys):
    run, hospital = finetuned
    err = usage_error(capsys, ["predict", str(hospital), "--checkpoint", str(run), "--out", str(tmp_path / "p.csv"),
                               "--batch-size", value])
    assert "argument --batch-size" in err
    assert not (tmp_path / "p.csv").exists()


def test_evaluate_refuses_a_negative_bootstrap_count(finetuned, capsys):
    run, hospital = finetuned
    err = usage_error(capsys, ["evaluate", "--checkpoint", str(run), "--data", str(hospital), "--n-bootstrap", "-5"])
    assert "argument --n-bootstrap: must be ≥ 0, got -5" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: --device cuda is valid")
@pytest.mark.parametrize("command", ["predict", "explain", "evaluate"])
def test_device_cuda_without_a_gpu_is_one_line(command, finetuned, tmp_path, capsys):
    run, hospital = finetuned
    image = str(next(hospital.rglob("*.png")))
    argv = {"predict": ["predict", image, "--out", str(tmp_path / "p.csv")],
            "explain": ["explain", image, "--out", str(tmp_path / "ex")],
            "evaluate": ["evaluate", "--data", str(hospital), "--out", str(tmp_path / "ev")]}[command]
    err = one_line(capsys, [*argv, "--checkpoint", str(run), "--device", "cuda"])
    assert "--device cuda: no CUDA GPU is visible" in err and "--device cpu" in err


def test_predict_out_an_existing_folder_is_refused_and_leaves_nothing(finetuned, tmp_path, capsys):
    run, hospital = finetuned
    folder = tmp_path / "results"
    folder.mkdir()
    err = one_line(capsys, ["predict", str(hospital), "--checkpoint", str(run), "--out", str(folder)])
    assert f"--out {folder} is a folder" in err and "predictions.csv" in err
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("override, says", [
    ("patience=-1", "batch_size and patience must be ≥ 1"),
    ("page.mode=bogus", "key 'page.mode'"),
    ("page.bogus=1", "unknown key 'page.bogus'"),
    ("n_bootstrap=x", "key 'n_bootstrap': expected int"),
])
def test_a_bad_set_is_named_in_the_error(override, says, finetuned, tmp_path, capsys):
    _, hospital = finetuned
    err = one_line(capsys, ["finetune", "--from-scratch", "--data", str(hospital), "--out", str(tmp_path / "out"),
                            "--config", "configs/finetune/tiny.yaml", "--set", "seed=1", "--set", override])
    assert f"--set '{override}' (over configs/finetune/tiny.yaml)" in err and says in err, err
    assert not (tmp_path / "out").exists()


def test_an_error_in_the_yaml_itself_still_names_the_yaml(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("patience: 0\n")
    err = one_line(capsys, ["finetune", "--from-scratch", "--data", str(tmp_path), "--out", str(tmp_path / "out"),
                            "--config", str(config), "--set", "seed=1"])
    assert f"{config}: FinetuneConfig: batch_size and patience" in err and "--set" not in err


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[]", b'{"version": '])
def test_a_damaged_manifest_is_named(content, tmp_path, capsys):
    (tmp_path / "set").mkdir()
    manifest = tmp_path / "set" / "manifest.json"
    manifest.write_bytes(content)
    err = one_line(capsys, ["verify", str(tmp_path / "set")])
    assert f"{manifest}: damaged manifest" in err and "restore manifest.json" in err
    assert manifest.read_bytes() == content
