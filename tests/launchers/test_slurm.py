"""Launchers on a real SLURM cluster: the project's two-node test cluster on loopback
(launchers/local_cluster/start.sh), started once per session. Nothing here mocks SLURM or submitit."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from launchers.jobs import sacct_states
from launchers.requeue import RequeueingJob
from launchers.slurm import LaunchError, SlurmResources, check_cluster, make_executor, sbatch_script

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "launchers" / "local_cluster"

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Job processes unpickle this module's payloads; pytest imports it under a name they cannot import.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the test cluster unless it is up; stop it afterwards only if this session started it."""
    was_up = subprocess.run(["timeout", "5", "scontrol", "ping"], capture_output=True).returncode == 0
    start = subprocess.run([str(CLUSTER / "start.sh")], capture_output=True, text=True, timeout=600)
    if start.returncode != 0:
        pytest.fail(f"local SLURM cluster did not start:\n{start.stdout}\n{start.stderr}")
    yield "debug"
    if not was_up:
        subprocess.run([str(CLUSTER / "stop.sh")], capture_output=True, timeout=300)


def wait_until(predicate, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def final_state(job_id: str, timeout: float = 60) -> tuple[str, int]:
    """(state, requeues) once accounting shows the job ended (its result pickle comes a little earlier)."""
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
    wait_until(lambda: sacct_states([job_id]).get(job_id, ("",))[0] in ended, timeout, f"job {job_id} to end")
    return sacct_states([job_id])[job_id]


def counting_payload(path: str, total: int, seconds_per_step: float) -> dict:
    """A stand-in for training with its contract: stop at a step boundary on SIGTERM, resume from disk."""
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    state = Path(path) / "step"
    step = int(state.read_text()) if state.exists() else 0
    while step < total:
        if stop:
            return {"interrupted": True, "step": step}
        time.sleep(seconds_per_step)
        step += 1
        with open(Path(path) / "steps.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}) + "\n")
        state.write_text(str(step))
    return {"interrupted": False, "step": step}


def current_step(path: Path) -> int:
    state = path / "step"
    return int(state.read_text() or 0) if state.exists() else 0


def test_time_limit_warning_requeues_and_resumes_without_repeating_steps(slurm_cluster, tmp_path):
    res = SlurmResources(time="00:05:00")
    ex = make_executor(tmp_path / "jobs", res, local=False)
    job = ex.submit(RequeueingJob(functools.partial(counting_payload, str(tmp_path), 12, 0.3), max_requeues=2))
    # --dry-run prints exactly the script submitit queued
    assert (tmp_path / "jobs" / f"{job.job_id}_submission.sh").read_text() == sbatch_script(tmp_path / "jobs", res)
    wait_until(lambda: current_step(tmp_path) >= 3, 120, "the job to count 3 steps")
    job._interrupt(timeout=True)  # what SLURM sends SIGNAL_DELAY_S before the time limit: USR2
    assert job.result() == {"interrupted": False, "step": 12}
    log = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert {r["restart"] for r in log} == {0, 1}
    assert final_state(job.job_id) == ("COMPLETED", 1)


def test_max_requeues_stops_with_a_clear_error(slurm_cluster, tmp_path):
    ex = make_executor(tmp_path / "jobs", SlurmResources(time="00:05:00"), local=False)
    job = ex.submit(RequeueingJob(functools.partial(counting_payload, str(tmp_path), 1000, 0.3), max_requeues=0))
    wait_until(lambda: current_step(tmp_path) >= 2, 120, "the job to count 2 steps")
    job._interrupt(timeout=True)
    with pytest.raises(submitit.core.utils.FailedJobError, match=r"--max-requeues 0"):
        job.result()
    assert current_step(tmp_path) < 1000
    assert final_state(job.job_id) == ("FAILED", 0)


def test_cluster_checks_name_what_the_cluster_offers(slurm_cluster):
    assert check_cluster(SlurmResources()) == "debug"
    with pytest.raises(LaunchError, match=r"unknown partition 'gpu': sinfo offers debug"):
        check_cluster(SlurmResources(partition="gpu"))
    with pytest.raises(LaunchError, match=r"--gpus-per-node 1: nodes of partition 'debug' have at most 0 GPUs"):
        check_cluster(SlurmResources(gpus_per_node=1))


# --- pretraining and fine-tuning through `dist-cardio submit` -----------------------------------------------

PRETRAIN = ["--config", str(REPO / "configs" / "pretrain" / "tiny.yaml"), "--nodes", "2", "--time", "00:10:00",
            "--set", "data.batch_size=4", "--set", "steps=24", "--set", "log_every=1", "--set", "checkpoint.every=6"]


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`dist-cardio ...` as a user runs it, with this venv's Python (which the jobs then use too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dist_cardio.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def submission(folder: Path) -> tuple[Path, dict]:
    """The one record `submit` left in the job folder: (its submission folder, its content)."""
    [record] = folder.glob("*/job.json")
    return record.parent, json.loads(record.read_text())


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Real shards of rendered PTB-XL printouts (the package's built-in sample)."""
    root = tmp_path_factory.mktemp("pretrain-data")
    for args in (["render", "sample", "--out", str(root / "pages"), "--limit", "40", "--dpi", "50", "--workers", "1"],
                 ["shard", str(root / "pages" / "images"), "--out", str(root / "shards"), "--max-count", "16",
                  "--max-side", "128", "--workers", "1", "--no-progress"]):
        done = cli(*args)
        assert done.returncode == 0, done.stderr
    return root / "shards"


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, shards, tmp_path_factory) -> Path:
    """An uninterrupted 2-node × 1-task gloo pretraining job; returns its output folder."""
    root = tmp_path_factory.mktemp("reference")
    done = cli("submit", "pretrain", *PRETRAIN, "--set", f"data.shards={shards}", "--set", f"out={root / 'out'}",
               "--folder", str(root / "jobs"), "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "out"


def test_two_node_pretraining_runs_one_gloo_rank_per_node(reference_run):
    summary = json.loads((reference_run / "summary.json").read_text())
    assert (summary["step"], summary["total_steps"], summary["interrupted"]) == (24, 24, False)
    assert (summary["global_batch"], summary["per_rank_batch"]) == (8, 4)
    assert [r["step"] for r in metrics(reference_run)] == list(range(1, 25))
    import torch

    state = torch.load(reference_run / "checkpoints" / "latest", map_location="cpu", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 24
    assert [d["settings"]["rank"] for d in state["data"]] == [0, 1]


def rank_keys_payload(shards: str) -> dict:
    """What one rank of a SLURM job reads from the shards, with the ranks the launcher gave it."""
    from dist_cardio import distributed
    from dist_cardio.data import AugmentConfig, LoaderConfig, labeled_loader

    info = distributed.init_distributed()
    loader = labeled_loader(LoaderConfig(shards=shards, batch_size=4, num_threads=1), AugmentConfig(size=32),
                            info.rank, info.world_size, classes=["NORM"], multilabel=True, train=True)
    keys = [key for _, _, batch_keys in loader for key in batch_keys]
    distributed.cleanup()
    return {"rank": info.rank, "world_size": info.world_size, "node": os.environ["SLURMD_NODENAME"], "keys": keys}


def test_ranks_of_a_two_node_job_read_disjoint_data(slurm_cluster, shards, tmp_path):
    ex = make_executor(tmp_path / "jobs", SlurmResources(nodes=2, time="00:05:00"), local=False)
    job = ex.submit(RequeueingJob(functools.partial(rank_keys_payload, str(shards)), max_requeues=0, cpu_only=True))
    first, second = job.results()
    assert (first["rank"], first["node"], second["rank"], second["node"]) == (0, "n1", 1, "n2")
    assert first["world_size"] == second["world_size"] == 2
    every_key = {json.loads(line)["key"] for line in (shards / "samples.jsonl").read_text().splitlines()}
    assert len(first["keys"]) == len(second["keys"]) == 20  # (40 samples // 2 ranks) // 4 per batch × 4
    assert set(first["keys"]).isdisjoint(second["keys"])
    assert set(first["keys"]) | set(second["keys"]) <= every_key


def test_preempted_pretraining_requeues_and_matches_the_uninterrupted_run(slurm_cluster, shards, reference_run, tmp_path):
    out = tmp_path / "out"
    done = cli("submit", "pretrain", *PRETRAIN, "--set", f"data.shards={shards}", "--set", f"out={out}",
               "--folder", str(tmp_path / "jobs"))
    assert done.returncode == 0, done.stderr
    job_id = submission(tmp_path / "jobs")[1]["jobs"][0]["job_id"]
    log = out / "metrics.jsonl"
    wait_until(lambda: log.exists() and log.read_text().count("\n") >= 2, 300, "2 logged steps")
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)  # what preemption does
    assert final_state(job_id, timeout=300) == ("COMPLETED", 1)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["step"], summary["interrupted"]) == (24, False)
    assert 2 <= summary["resumed_from"] < 24
    ours, reference = metrics(out), metrics(reference_run)
    assert [r["step"] for r in ours] == list(range(1, 25))
    assert [r["loss"] for r in ours] == [r["loss"] for r in reference]
    assert [r["lr"] for r in ours] == [r["lr"] for r in reference]

    listing = cli("jobs", "--folder", str(tmp_path / "jobs"))
    assert listing.returncode == 0, listing.stderr
    [row] = [line.split() for line in listing.stdout.splitlines() if job_id in line]
    assert row[1:5] == ["pretrain", job_id, "COMPLETED", "1"]
    assert row[5:7] == ["step", "24"] and Path(row[-1]).is_file()


FINETUNE_SET = ["--set", "split.mode=grouped", "--set", "n_bootstrap=20",
                "--set", "stages=[{epochs: 1, lr: 0.001, groups: all}]"]


@pytest.fixture(scope="module")
def hospitals_file(tmp_path_factory) -> Path:
    """Two hospitals with their own labelled printouts (CSV halves of one rendering), one with a broken path."""
    root = tmp_path_factory.mktemp("hospitals")
    done = cli("render", "sample", "--out", str(root / "pages"), "--limit", "60", "--dpi", "50", "--workers", "1")
    assert done.returncode == 0, done.stderr
    header, *rows = (root / "pages" / "labels.csv").read_text().splitlines()
    (root / "pages" / "north.csv").write_text("\n".join([header, *rows[:30]]) + "\n")
    (root / "pages" / "south.csv").write_text("\n".join([header, *rows[30:]]) + "\n")
    spec = root / "hospitals.yaml"
    spec.write_text("hospitals:\n"
                    "  - {name: north, data: pages/north.csv}\n"
                    "  - {name: broken, data: pages/no-such-folder}\n"
                    "  - {name: south, data: pages/south.csv, set: ['seed=1']}\n")
    return spec


def test_finetune_array_runs_every_hospital_and_summarises_one_failure(slurm_cluster, reference_run, hospitals_file, tmp_path):
    out = tmp_path / "finetune"
    done = cli("submit", "finetune", "--checkpoint", str(reference_run / "checkpoints" / "latest"),
               "--hospitals", str(hospitals_file), "--config", str(REPO / "configs" / "finetune" / "tiny.yaml"),
               *FINETUNE_SET, "--out", str(out), "--folder", str(tmp_path / "jobs"), "--array-parallelism", "3",
               "--time", "00:10:00", "--wait")
    assert done.returncode == 1, done.stdout + done.stderr  # one hospital failed
    rows = {r["hospital"]: r for r in json.loads((out / "summary.json").read_text())["hospitals"]}
    assert {name: r["status"] for name, r in rows.items()} == {"north": "completed", "broken": "failed", "south": "completed"}
    assert rows["broken"]["error"].startswith("FileNotFoundError:") and "no-such-folder" in rows["broken"]["error"]
    for name in ("north", "south"):
        assert (out / name / "metrics.json").is_file() and (out / name / "confusion_matrix.png").is_file()
        assert 0.0 <= rows[name]["macro_f1"] <= 1.0 and rows[name]["report"] == str(out / name / "metrics.json")
    assert not (out / "broken" / "metrics.json").exists()
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("hospital,status,") and len(csv_lines) == 4
    for name in ("north", "broken", "south"):
        assert name in done.stdout  # the summary table

    folder, record = submission(tmp_path / "jobs")
    array_id = record["jobs"][0]["job_id"].split("_")[0]
    assert [(j["name"], j["job_id"]) for j in record["jobs"]] == [("north", f"{array_id}_0"), ("broken", f"{array_id}_1"),
                                                                  ("south", f"{array_id}_2")]
    assert "#SBATCH --array=0-2%3" in (folder / f"{array_id}_submission.sh").read_text().splitlines()
    listing = cli("jobs", "--folder", str(tmp_path / "jobs"))
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[1]: line.split() for line in listing.stdout.splitlines() if array_id in line}
    assert {name: row[3] for name, row in rows.items()} == {"north": "COMPLETED", "broken": "FAILED", "south": "COMPLETED"}
    assert rows["north"][5] == rows["south"][5] == "completed" and rows["broken"][5:7] == ["failed:", "FileNotFoundError:"]
