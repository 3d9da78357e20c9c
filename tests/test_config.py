"""Strict config loading: unknown keys and wrong types name the file and the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from dist_cardio.config import ConfigError, dump_yaml, load_config, to_dict


@dataclass(frozen=True)
class Optim:
    base_lr: float = 0.3
    exclude: tuple[str, ...] = ("bias", "norm")

    def __post_init__(self) -> None:
        if self.base_lr <= 0:
            raise ValueError("base_lr must be > 0")


@dataclass(frozen=True)
class Run:
    name: str = "demo"
    steps: int = 10
    engine: Literal["deepspeed", "accelerate"] = "accelerate"
    chunk: int | None = None
    optim: Optim = field(default_factory=Optim)


def write(tmp_path, text: str):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_and_yaml_values(tmp_path):
    cfg = load_config(Run, write(tmp_path, "steps: 5\noptim:\n  base_lr: 1\n  exclude: [bias]\n"))
    assert cfg == Run(steps=5, optim=Optim(base_lr=1.0, exclude=("bias",)))
    assert isinstance(cfg.optim.base_lr, float)
    assert load_config(Run) == Run()


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "optim:\n  base_lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Run, p)
    assert str(p) in str(e.value) and "optim.base_lrr" in str(e.value) and "base_lr" in str(e.value)


def test_wrong_type_names_expected_type(tmp_path):
    p = write(tmp_path, "steps: ten\n")
    with pytest.raises(ConfigError, match=r"key 'steps': expected int, got str 'ten'"):
        load_config(Run, p)
    with pytest.raises(ConfigError, match="expected 'deepspeed' \\| 'accelerate'"):
        load_config(Run, write(tmp_path, "engine: horovod\n"))
    with pytest.raises(ConfigError, match="key 'steps'"):
        load_config(Run, write(tmp_path, "steps: true\n"))


def test_validation_error_from_post_init_names_section(tmp_path):
    with pytest.raises(ConfigError, match="optim: base_lr must be > 0"):
        load_config(Run, write(tmp_path, "optim: {base_lr: -1}\n"))


def test_overrides(tmp_path):
    cfg = load_config(Run, write(tmp_path, "steps: 5\n"), ["optim.base_lr=0.05", "chunk=64", "name=x"])
    assert (cfg.optim.base_lr, cfg.chunk, cfg.name, cfg.steps) == (0.05, 64, "x", 5)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(Run, None, ["steps"])
    with pytest.raises(ConfigError, match="unknown key 'optim.lr'"):
        load_config(Run, None, ["optim.lr=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Run, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, write(tmp_path, "steps: [1,\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Run, write(tmp_path, "- 1\n- 2\n"))


def test_round_trip_through_yaml(tmp_path):
    cfg = Run(steps=7, chunk=3, optim=Optim(0.2, ("bias",)))
    assert load_config(Run, write(tmp_path, dump_yaml(cfg))) == cfg
    assert to_dict(cfg)["optim"]["exclude"] == ["bias"]


def test_cli_help_for_every_command():
    from dist_cardio.cli import COMMANDS, main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert set(COMMANDS) >= {"render", "shard", "verify", "demo", "pretrain", "finetune", "submit", "evaluate",
                             "explain", "predict", "jobs"}


@pytest.mark.parametrize("command", ["render", "shard", "verify", "pretrain", "finetune", "evaluate", "predict",
                                     "explain", "submit", "jobs", "demo"])
def test_every_command_has_help(command, capsys):
    from dist_cardio.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: dist-cardio " + command in capsys.readouterr().out
