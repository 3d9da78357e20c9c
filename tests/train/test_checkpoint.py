"""Checkpoint manager: atomic `latest`, keep-last-k, weights_only round trips, damaged files refused."""

from __future__ import annotations

import random
import struct
import subprocess

import numpy as np
import pytest
import torch

from dist_cardio.train.checkpoint import CheckpointConfig, CheckpointError, CheckpointManager, rng_state, set_rng_state


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((64, 64), float(value))}, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
            "config": {"seed": 0, "name": "x"}}


def test_save_points_latest_at_newest_and_keeps_last_k(tmp_path):
    m = CheckpointManager(tmp_path / "ckpt", keep=2)
    for step in (10, 20, 30):
        m.save(_state(step), step)
    assert [p.name for p in m.step_files()] == ["step-00000020.pt", "step-00000030.pt"]
    assert m.latest.samefile(tmp_path / "ckpt" / "step-00000030.pt")
    state = m.load_latest()
    assert state["step"] == 30 and torch.equal(state["model"]["w"], torch.full((64, 64), 30.0))
    assert state["config"] == {"seed": 0, "name": "x"}
    # the file is a plain dict of tensors and values: torch's safe loader reads it
    assert torch.load(m.latest, weights_only=True)["step"] == 30
    assert not [p for p in (tmp_path / "ckpt").iterdir() if ".tmp" in p.name]


def test_latest_survives_pruning_with_keep_one(tmp_path):
    m = CheckpointManager(tmp_path, keep=1)
    m.save(_state(1), 1)
    m.save(_state(2), 2)
    assert [p.name for p in m.step_files()] == ["step-00000002.pt"]
    assert m.load_latest()["step"] == 2


def test_no_checkpoint_means_fresh_run(tmp_path):
    assert CheckpointManager(tmp_path / "missing").load_latest() is None


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(_state(1), 1)
    before = m.latest.read_bytes()

    class Unsaveable:
        def __reduce__(self):
            raise OSError("No space left on device")

    with pytest.raises(CheckpointError, match=r"step-00000002.pt: not written \(No space left on device\); .*latest still holds"):
        m.save({"model": Unsaveable()}, 2)
    assert m.latest.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001.pt"]
    assert m.load_latest()["step"] == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_latest_is_refused_naming_file_and_fix(tmp_path, damage):
    m = CheckpointManager(tmp_path, keep=3)
    m.save(_state(1), 1)
    m.save(_state(2), 2)
    data = bytearray(m.latest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        start = data.find(struct.pack("<f", 2.0) * 16)  # inside the weights: 64×64 float32 of 2.0
        assert start > 0
        data[start: start + 8] = b"\x7f" * 8
    else:
        data = bytearray()
    m.latest.write_bytes(bytes(data))  # same inode: step-00000002.pt is damaged too, as on a real disk
    snapshot = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError) as err:
        m.load_latest()
    message = str(err.value)
    assert str(m.latest) in message and "unreadable" in message
    assert "step-00000001.pt" in message  # the fix names the previous intact checkpoint
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == snapshot  # nothing touched


def test_foreign_torch_file_is_refused(tmp_path):
    path = tmp_path / "latest"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a dist_cardio checkpoint"):
        CheckpointManager(tmp_path).load_latest()


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    saved = rng_state()
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.standard_normal())
    torch.save(saved, tmp_path / "rng.pt")
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(5), expected[0])
    assert np.array_equal(np.random.rand(5), expected[1])
    assert [random.random() for _ in range(5)] == expected[2]
    assert np.random.standard_normal() == expected[3]


def test_checkpoint_config_validates():
    with pytest.raises(ValueError, match="every"):
        CheckpointConfig(every=0)
    with pytest.raises(ValueError, match="keep"):
        CheckpointConfig(keep=0)


def test_temporaries_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    """A save killed mid-write leaves `.step-N.pt.tmp-PID`; the next save removes those whose process is gone,
    never one of a live process (pid 1 here)."""
    manager = CheckpointManager(tmp_path, keep=2)
    dead = _dead_pid()
    stale = [tmp_path / f".step-00000005.pt.tmp-{dead}", tmp_path / f".latest.tmp-{dead}"]
    live = tmp_path / ".step-00000005.pt.tmp-1"
    for p in (*stale, live):
        p.write_bytes(b"half a checkpoint")
    manager.save({"model": {"w": torch.ones(2)}}, step=6)
    assert not any(p.exists() for p in stale) and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step-00000005.pt.tmp-1", "latest", "step-00000006.pt"]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
