"""`RUN_DIR/job.json`: what was launched, where, and in which state it is."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.run.rundir import pid_alive

JOB_FILE = "job.json"
ACTIVE = ("RUNNING", "PENDING", "REQUEUED")  # states of a job that is not over
SACCT_STATES = (
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "COMPLETED",
    "CANCELLED",
    "FAILED",
    "TIMEOUT",
    "PREEMPTED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "SUSPENDED",
)
# A task that returned after a stop ends COMPLETED in accounting; the run's own word wins.
RECORDED_ENDS = ("STOPPED", "PREEMPTED", "CANCELLED")


@dataclass
class JobRecord:
    """One launch of a run. Never holds secrets: the environment is not recorded."""

    backend: str
    run_dir: str
    command: list[str]
    nodes: int
    nproc_per_node: int
    job_ids: list[str] = field(default_factory=list)
    pid: int | None = None
    # local: whether `pid` leads its own process group (cancel signals the group) or not (cancel
    # signals `pid` only: its group is e.g. the script that started it); None: ask the system
    group_leader: bool | None = None
    submit_time: float = field(default_factory=time.time)
    end_time: float | None = None
    requeues: int = 0
    state: str = "PENDING"  # PENDING RUNNING COMPLETED STOPPED PREEMPTED FAILED CANCELLED
    exit_code: int | None = None
    kind: str = "train"  # or "prepare": run_dir is a prepare's OUT dir (launcher.prepare_job)
    result: dict[str, Any] | None = None  # prepare: the merged dataset's summary

    def save(self) -> None:
        path = Path(self.run_dir) / JOB_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temp name of this process: `gptrain cancel` and the run may save at the same time.
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(json.dumps(asdict(self), indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def load_job(run_dir: str | Path) -> JobRecord | None:
    path = Path(run_dir) / JOB_FILE
    if not path.is_file():
        return None
    return JobRecord(**json.loads(path.read_text()))


def current_job(run_dir: str | Path) -> JobRecord | None:
    """`job.json` with its state brought up to date (not saved): a local launcher that
    died is FAILED; a SLURM job takes its accounting state, except that a run's own
    recorded stop outlives the COMPLETED its returned task gets."""
    record = load_job(run_dir)
    if record is None:
        return None
    if record.state == "RUNNING" and record.backend == "local" and not pid_alive(record.pid):
        record.state = "FAILED"  # the launcher itself died (e.g. killed); say so
    if record.backend == "slurm" and record.job_ids:
        state = sacct_state(record.job_ids[-1])
        if state is not None and not (state == "COMPLETED" and record.state in RECORDED_ENDS):
            record.state = state
    return record


def sacct_states(job_id: str) -> list[str]:
    """The accounting state word of each line sacct gives for `job_id` (one per array
    element; e.g. "CANCELLED" of "CANCELLED by 0"); [] without sacct or an answer."""
    if shutil.which("sacct") is None:
        return []
    try:
        out = subprocess.run(
            ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State", "-S", "2000-01-01"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split()[0] for line in out if line.split()]


def sacct_state(job_id: str) -> str | None:
    """The job's state from accounting (RUNNING, COMPLETED, CANCELLED, ...), None if unknown."""
    states = sacct_states(job_id)
    return states[-1] if states and states[-1] in SACCT_STATES else None


def to_json(record: JobRecord) -> dict[str, Any]:
    return asdict(record)
