"""Launcher parts that need no SLURM cluster: resources, sbatch scripts, checks, records, the local executor."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from dist_cardio.config import ConfigError
from launchers.finetune_array import load_hospitals
from launchers.records import JobEntry, Submission, load_submissions, now, save_submission, submission_folder
from launchers.slurm import (
    LaunchError, SlurmResources, check_cluster, check_request, ensure_writable, max_gpus_per_node, parse_time,
    sbatch_script,
)


@pytest.mark.parametrize("text, minutes", [
    ("30", 30), ("90:30", 91), ("24:00:00", 1440), ("1-00", 1440), ("2-01:30", 2970), ("1-00:00:01", 1441),
])
def test_parse_time_reads_every_slurm_format(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "0", "00:00:00", "1-", "-5"])
def test_parse_time_rejects_what_slurm_would_reject(text):
    with pytest.raises(ValueError, match="SLURM time limit"):
        parse_time(text)


def test_resources_run_one_task_per_gpu_and_refuse_contradictions():
    gpu = SlurmResources(nodes=4, gpus_per_node=8)
    assert (gpu.ntasks_per_node, gpu.world_size, gpu.backend) == (8, 32, "nccl")
    cpu = SlurmResources(nodes=2, tasks_per_node=3)
    assert (cpu.ntasks_per_node, cpu.world_size, cpu.backend) == (3, 6, "gloo")
    with pytest.raises(ValueError, match="one task per GPU"):
        SlurmResources(gpus_per_node=4, tasks_per_node=2)
    with pytest.raises(ValueError, match="--mem '64 GB'"):
        SlurmResources(mem="64 GB")
    with pytest.raises(ValueError, match="--nodes 0"):
        SlurmResources(nodes=0)
    with pytest.raises(ValueError, match="SLURM time limit"):
        SlurmResources(time="forever")
    with pytest.raises(ValueError, match="--time 2: give the job more than 120 s"):
        SlurmResources(time="2")


def test_sbatch_script_asks_for_every_resource(tmp_path):
    res = SlurmResources(nodes=4, gpus_per_node=8, partition="gpu", time="24:00:00", account="cardio", qos="high",
                         constraint="a100", mem="480G", exclusive=True, cpus_per_task=6)
    script = sbatch_script(tmp_path / "jobs", res)
    for line in ["#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1440", "#SBATCH --account=cardio", "#SBATCH --qos=high",
                 "#SBATCH --constraint=a100", "#SBATCH --mem=480G", "#SBATCH --exclusive",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --signal=USR2@120"]:
        assert line in script.splitlines()
    assert f"{sys.executable} -u -m submitit.core._submit" in script
    array = sbatch_script(tmp_path / "jobs", SlurmResources(), array_size=3, array_parallelism=2)
    assert "#SBATCH --array=0-2%2" in array.splitlines()


def test_gpu_count_is_read_from_sinfo_gres():
    assert max_gpus_per_node("(null)\n") == 0
    assert max_gpus_per_node("gpu:8\n") == 8
    assert max_gpus_per_node("gpu:a100:4(S:0-1)\ngpu:h100:8(S:0-1)\n") == 8
    assert max_gpus_per_node("gpu:a100:2,gpu:v100:2\n") == 4


def test_no_sbatch_on_path_suggests_local(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError, match=r"sbatch not found on PATH.*--local"):
        check_cluster(SlurmResources())


def test_unwritable_output_folder_is_refused_before_submission(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(LaunchError, match=r"runs/pretrain: output folder is not writable"):
        ensure_writable(blocker / "pretrain", "output folder")
    ensure_writable(tmp_path / "ok" / "checkpoints", "checkpoint folder")
    assert (tmp_path / "ok" / "checkpoints").is_dir()
    assert list((tmp_path / "ok" / "checkpoints").iterdir()) == []


def test_hospitals_file_is_validated_and_paths_resolved_against_it(tmp_path):
    spec = tmp_path / "site" / "hospitals.yaml"
    spec.parent.mkdir()
    spec.write_text("hospitals:\n"
                    "  - {name: north, data: data/north}\n"
                    "  - {name: south-2, data: /abs/south, config: ft.yaml, set: ['epochs=2']}\n")
    north, south = load_hospitals(spec)
    assert north.data == str(tmp_path / "site" / "data" / "north") and north.config is None and north.set == ()
    assert south.data == "/abs/south" and south.config == str(tmp_path / "site" / "ft.yaml") and south.set == ("epochs=2",)
    for body, message in [
        ("hospitals: []\n", "list at least one hospital"),
        ("hospitals:\n  - {name: a, data: x}\n  - {name: a, data: y}\n", "names must be unique, repeated: a"),
        ("hospitals:\n  - {name: 'a/b', data: x}\n", "it names a folder"),
        ("hospitals:\n  - {name: a, data: x, epochs: 3}\n", "unknown key 'hospitals[0].epochs'"),
        ("hospitals:\n  - {name: a}\n", "data"),
    ]:
        spec.write_text(body)
        with pytest.raises(ConfigError, match=re.escape(message)) as e:
            load_hospitals(spec)
        assert str(spec) in str(e.value)


def test_submission_records_round_trip_and_name_a_damaged_file(tmp_path):
    folder = submission_folder(tmp_path, "pretrain")
    assert folder.parent == tmp_path.resolve() and not folder.exists()
    sub = Submission("pretrain", "slurm", str(folder), now(), "dist-cardio submit pretrain", (JobEntry("pretrain", "42", "/o"),))
    save_submission(sub)
    assert load_submissions(tmp_path) == [sub]
    (folder / "job.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"job\.json: not valid JSON"):
        load_submissions(tmp_path)


def test_local_executor_is_one_machine():
    with pytest.raises(LaunchError, match="--local runs on this one machine: use --nodes 1"):
        check_request(SlurmResources(nodes=2), local=True)


# --- `dist-cardio submit` / `dist-cardio jobs` without a cluster -------------------------------------------

REPO = Path(__file__).resolve().parents[2]
CPU_SMALL = str(REPO / "configs" / "pretrain" / "tiny.yaml")


def submit(capsys, *args: str) -> tuple[int, str, str]:
    from dist_cardio.cli import main

    code = main(["submit", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_prints_the_resources_and_the_resolved_config(capsys, tmp_path):
    code, out, err = submit(capsys, "pretrain", "--config", CPU_SMALL, "--set", "data.shards=/data/shards",
                            "--set", "steps=7", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                            "--time", "24:00:00", "--account", "cardio", "--qos", "high", "--constraint", "a100",
                            "--mem", "480G", "--exclusive", "--folder", str(tmp_path / "jobs"), "--dry-run")
    assert (code, err) == (0, "")
    for line in ["#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1440", "#SBATCH --account=cardio", "#SBATCH --qos=high",
                 "#SBATCH --constraint=a100", "#SBATCH --mem=480G", "#SBATCH --exclusive"]:
        assert line in out.splitlines()
    assert "32 tasks, nccl" in out
    assert "shards: /data/shards" in out and "steps: 7" in out and "backend: deepspeed" in out
    assert not (tmp_path / "jobs").exists()  # nothing submitted, nothing written


def test_finetune_dry_run_prints_the_array_and_each_hospitals_config(capsys, tmp_path):
    spec = tmp_path / "hospitals.yaml"
    spec.write_text("hospitals:\n  - {name: north, data: north}\n  - {name: south, data: south, set: ['seed=5']}\n")
    (tmp_path / "encoder.pt").write_bytes(b"")
    code, out, err = submit(capsys, "finetune", "--checkpoint", str(tmp_path / "encoder.pt"), "--hospitals", str(spec),
                            "--config", str(REPO / "configs" / "finetune" / "tiny.yaml"), "--set", "seed=3",
                            "--array-parallelism", "1", "--gpus-per-node", "1", "--folder", str(tmp_path / "jobs"), "--dry-run")
    assert (code, err) == (0, "")
    assert "#SBATCH --array=0-1%1" in out.splitlines() and "#SBATCH --gpus-per-node=1" in out.splitlines()
    north, south = out.split("# hospital north: ")[1].split("# hospital south: ")
    assert f"data {tmp_path / 'north'}" in north and "seed: 3" in north
    assert f"data {tmp_path / 'south'}" in south and "seed: 5" in south


@pytest.mark.parametrize("args, message", [
    (["--nodes", "2", "--local"], "--local runs on this one machine: use --nodes 1 (got 2)"),
    (["--gpus-per-node", "2", "--tasks-per-node", "3"], "GPU jobs run one task per GPU"),
    (["--time", "soon"], "time 'soon': expected a SLURM time limit"),
    (["--set", "out=BLOCKED/run", "--local"], "BLOCKED/run: output folder is not writable"),  # no cluster needed
])
def test_submit_errors_are_one_line(capsys, tmp_path, args, message):
    (tmp_path / "BLOCKED").write_text("a file, not a folder")
    args = [a.replace("BLOCKED", str(tmp_path / "BLOCKED")) for a in args]
    code, out, err = submit(capsys, "pretrain", "--config", CPU_SMALL, "--folder", str(tmp_path / "jobs"),
                            "--set", f"out={tmp_path / 'run'}", *args)
    assert code == 2 and out == ""
    assert err.startswith("dist-cardio submit: error: ") and err.count("\n") == 1
    assert message in err.replace(str(tmp_path) + "/", "")
    assert not (tmp_path / "run").exists() and not (tmp_path / "jobs").exists()  # refused before writing anything


def test_submit_without_sbatch_suggests_local(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    code, out, err = submit(capsys, "pretrain", "--config", CPU_SMALL, "--set", f"out={tmp_path / 'out'}",
                            "--folder", str(tmp_path / "jobs"))
    assert code == 2 and err.count("\n") == 1
    assert "sbatch not found on PATH" in err and "--local" in err
    assert not (tmp_path / "jobs").exists() and not (tmp_path / "out").exists()


def test_finetune_submit_names_a_missing_checkpoint(capsys, tmp_path):
    spec = tmp_path / "hospitals.yaml"
    spec.write_text("hospitals:\n  - {name: north, data: north}\n")
    code, out, err = submit(capsys, "finetune", "--checkpoint", str(tmp_path / "nope.pt"), "--hospitals", str(spec),
                            "--folder", str(tmp_path / "jobs"))
    assert code == 2 and err.count("\n") == 1 and "nope.pt: no pretraining checkpoint" in err


def test_jobs_names_a_missing_job_folder(capsys, tmp_path):
    from dist_cardio.cli import main

    assert main(["jobs", "--folder", str(tmp_path / "none")]) == 2
    assert "no such job folder" in capsys.readouterr().err


@pytest.mark.slow
def test_local_pretraining_runs_the_same_job_without_slurm(capsys, tmp_path):
    from dist_cardio.cli import main

    assert main(["render", "sample", "--out", str(tmp_path / "pages"), "--limit", "16", "--dpi", "50", "--workers", "1"]) == 0
    assert main(["shard", str(tmp_path / "pages" / "images"), "--out", str(tmp_path / "shards"), "--workers", "1",
                 "--max-side", "128", "--no-progress"]) == 0
    capsys.readouterr()
    code, out, err = submit(capsys, "pretrain", "--config", CPU_SMALL, "--set", f"data.shards={tmp_path / 'shards'}",
                            "--set", "data.batch_size=4", "--set", "steps=3", "--set", "log_every=1",
                            "--set", f"out={tmp_path / 'run'}", "--tasks-per-node", "2", "--local",
                            "--folder", str(tmp_path / "jobs"))
    assert code == 0, out + err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["step"], summary["global_batch"], summary["interrupted"]) == (3, 8, False)
    assert main(["jobs", "--folder", str(tmp_path / "jobs")]) == 0
    [row] = [line.split() for line in capsys.readouterr().out.splitlines() if "pretrain" in line and "COMPLETED" in line]
    assert row[4:7] == ["0", "step", "3"]
