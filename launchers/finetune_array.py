"""Fine-tune one pretrained checkpoint at every hospital: one single-node job per hospital, as a job array.

Each array element writes ``<out>/<hospital>/status.json`` whatever happens, so one hospital's broken
data fails that element only and the summary (``<out>/summary.json``, ``summary.csv``) still lists
every hospital with its status and metrics. Under SLURM the summary is written by a small job that
starts once every element has ended (``afterany``); under ``--local`` by the submitting process.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from dist_cardio.atomic import atomic_write_json
from dist_cardio.config import ConfigError, dump_yaml, load_config
from launchers.records import JobEntry, Submission, announce_submission, now, submission_folder
from launchers.slurm import (
    LaunchError, SlurmResources, check_request, ensure_writable, make_executor, sbatch_script,
)
from launchers.table import format_table

if TYPE_CHECKING:
    from dist_cardio.downstream.finetune import FinetuneConfig

STATUS_NAME = "status.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Hospital:
    """One hospital's run: its labelled data, and optionally its own fine-tuning config and overrides."""

    name: str
    """Also the name of its output folder: letters, digits, ``.``, ``_``, ``-``."""
    data: str
    config: str | None = None
    """Fine-tuning YAML; None: the ``--config`` given to ``submit finetune``."""
    set: tuple[str, ...] = ()
    """``key=value`` overrides, as ``--set``."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"hospital name {self.name!r}: use letters, digits, '.', '_' or '-' (it names a folder)")


@dataclass(frozen=True)
class HospitalsFile:
    """``hospitals.yaml``: ``hospitals: [{name, data, config?, set?}]``; relative paths are relative to it."""

    hospitals: tuple[Hospital, ...]

    def __post_init__(self) -> None:
        if not self.hospitals:
            raise ValueError("hospitals: list at least one hospital")
        names = [h.name for h in self.hospitals]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"hospitals: names must be unique, repeated: {', '.join(dup)}")


def load_hospitals(path: Path) -> list[Hospital]:
    """Read and validate ``hospitals.yaml``, with ``data``/``config`` made absolute."""
    spec = load_config(HospitalsFile, path)
    base = path.resolve().parent

    def absolute(p: str) -> str:
        return str((base / Path(p).expanduser()).resolve())

    return [dataclasses.replace(h, data=absolute(h.data), config=absolute(h.config) if h.config else None)
            for h in spec.hospitals]


@dataclass(frozen=True)
class HospitalTask:
    """One array element, with the hospital's resolved fine-tuning config (validated at submission)."""

    name: str
    cfg: FinetuneConfig
    checkpoint: str
    data: str
    out: str


def run_hospital(task: HospitalTask) -> dict[str, Any]:
    """Fine-tune one hospital; its ``status.json`` records the outcome, failed or not."""
    from dist_cardio.downstream.finetune import run_finetune

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(task.out)
    out.mkdir(parents=True, exist_ok=True)
    status: dict[str, Any] = {"hospital": task.name, "job_id": submitit.JobEnvironment().job_id, "out": str(out)}
    try:
        result = run_finetune(task.cfg, task.checkpoint, task.data, out, progress=False)
    except Exception as e:
        status.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        _write_json(out / STATUS_NAME, status)
        raise
    status.update(status="completed", result=result)
    _write_json(out / STATUS_NAME, status)
    return result


def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data, indent=2, default=str)


def read_status(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / STATUS_NAME).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{out / STATUS_NAME}: not valid JSON ({e.msg})") from None


def _scalar_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``run_finetune``'s summary (accuracy, macro-F1, macro AUROC, best epoch, ...)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def write_summary(out_root: Path, job_ids: dict[str, str]) -> list[dict[str, Any]]:
    """``summary.json`` and ``summary.csv`` under ``out_root`` from the status each hospital's job
    (``job_ids``: hospital → job id) wrote; prints the table. A status left by an earlier submission
    to the same folder does not count."""
    rows = []
    for name, job_id in job_ids.items():
        status = read_status(out_root / name)
        if status is None or status.get("job_id") != job_id:
            rows.append({"hospital": name, "status": "not finished",
                         "error": f"job {job_id} wrote no status.json (never ran, or was killed: see its log)"})
        elif status["status"] == "completed":
            rows.append({"hospital": name, "status": "completed", **_scalar_metrics(status.get("result") or {}),
                         "report": str(out_root / name / "metrics.json")})
        else:
            rows.append({"hospital": name, "status": status["status"], "error": status.get("error", "")})
    _write_json(out_root / "summary.json", {"written_at": now(), "hospitals": rows})
    tmp = out_root / "summary.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out_root / "summary.csv")
    print(summary_table(rows), flush=True)
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    metrics = sorted({k for r in rows for k in r} - {"hospital", "status", "report", "error"})
    return ["hospital", "status", *metrics, "report", "error"]


def summary_table(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    columns = _columns(rows)
    return format_table(columns, [[cell(r.get(c, "")) for c in columns] for r in rows])


def describe_hospital(out: Path) -> str:
    """One line for ``dist-cardio jobs``: the hospital's outcome, or that it has none yet."""
    status = read_status(out)
    if status is None:
        return "no status yet"
    if status["status"] != "completed":
        return f"failed: {status.get('error', '')}"[:120]
    metrics = _scalar_metrics(status.get("result") or {})
    return "completed " + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def submit_finetune(hospitals_path: Path, checkpoint: Path, config: Path | None, overrides: list[str], out: Path,
                    res: SlurmResources, root: Path, *, array_parallelism: int, local: bool, dry_run: bool,
                    wait: bool, command: str) -> int:
    """Validate every hospital's config, then queue one array element per hospital and the summary job."""
    from dist_cardio.downstream.finetune import load_finetune_config

    if res.nodes != 1 or res.gpus_per_node > 1:
        raise LaunchError("fine-tuning runs one process per hospital on one node: use --gpus-per-node 0 or 1")
    if array_parallelism < 1:
        raise LaunchError(f"--array-parallelism {array_parallelism}: need at least 1")
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint}: no pretraining checkpoint (pass the file, its checkpoints/ folder or the run folder)")
    tasks = []
    for h in load_hospitals(hospitals_path):
        cfg = load_finetune_config(Path(h.config) if h.config else config, [*overrides, *h.set])
        tasks.append(HospitalTask(h.name, cfg, str(checkpoint.resolve()), h.data, str((out / h.name).resolve())))
    folder = submission_folder(root, "finetune")
    if dry_run:
        print(f"# sbatch script of the job array ({len(tasks)} hospitals, submitit folder {folder})")
        print(sbatch_script(folder, res, array_size=len(tasks), array_parallelism=array_parallelism))
        for t in tasks:
            print(f"# hospital {t.name}: data {t.data} -> {t.out}; resolved fine-tuning config:")
            print(dump_yaml(t.cfg))
        return 0
    check_request(res, local)
    for t in tasks:
        if (Path(t.out) / "metrics.json").exists():
            raise LaunchError(f"{t.out}: holds a finished fine-tuning run of hospital {t.name}; choose another --out")
        ensure_writable(Path(t.out), f"output folder of hospital {t.name}")
    executor = make_executor(folder, res, local, array_parallelism=array_parallelism)
    jobs = executor.map_array(run_hospital, tasks)
    out_root = out.resolve()
    job_ids = {t.name: j.job_id for t, j in zip(tasks, jobs)}
    summary_job = None
    if not local:
        summary_res = dataclasses.replace(res, gpus_per_node=0, cpus_per_task=None, mem=None, exclusive=False,
                                          constraint=None, time="00:10:00", job_name=f"{res.job_name}-summary")
        summary_ex = make_executor(folder, summary_res, local=False)
        summary_ex.update_parameters(dependency=f"afterany:{jobs[0].job_id.split('_')[0]}")
        summary_job = summary_ex.submit(write_summary, out_root, job_ids)
    sub = Submission("finetune", "local" if local else "slurm", str(folder), now(), command,
                     tuple(JobEntry(t.name, j.job_id, t.out) for t, j in zip(tasks, jobs)),
                     summary_job.job_id if summary_job else None)
    announce_submission(sub, f"{len(jobs)} fine-tuning jobs ({', '.join(f'{n}={j}' for n, j in job_ids.items())})",
                        f"summary -> {out_root / 'summary.csv'}", root, follow=not (local or wait))
    if not (local or wait):
        return 0
    for job in jobs:
        job.wait()
    rows = summary_job.result() if summary_job is not None else write_summary(out_root, job_ids)
    if summary_job is not None:
        print(summary_table(rows))
    return 0 if all(r["status"] == "completed" for r in rows) else 1
