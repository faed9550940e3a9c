"""The job record of a run dir (`RunDir.job_file`): what was launched, where, and in which
state it is (a `JobState`)."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.run.paths import JobState, RunDir
from training.run.rundir import pid_alive

# A task that returned after a stop ends COMPLETED in accounting; the run's own word wins.
RECORDED_ENDS = (JobState.STOPPED, JobState.PREEMPTED, JobState.CANCELLED)


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
    state: JobState = JobState.PENDING
    exit_code: int | None = None
    kind: str = "train"  # or "prepare": run_dir is a prepare's OUT dir (launcher.prepare_job)
    result: dict[str, Any] | None = None  # prepare: the merged dataset's summary

    def __post_init__(self) -> None:
        self.state = JobState(self.state)  # read back from JSON as a plain string

    def save(self) -> None:
        RunDir(self.run_dir).write_job(asdict(self))


def load_job(run_dir: str | Path) -> JobRecord | None:
    data = RunDir(Path(run_dir)).read_job()
    return None if data is None else JobRecord(**data)


def current_job(run_dir: str | Path) -> JobRecord | None:
    """`job.json` with its state brought up to date (not saved): a local launcher that
    died is FAILED; a SLURM job takes its accounting state, except that a run's own
    recorded stop outlives the COMPLETED its returned task gets."""
    record = load_job(run_dir)
    if record is None:
        return None
    if record.state == JobState.RUNNING and record.backend == "local" and not pid_alive(record.pid):
        record.state = JobState.FAILED  # the launcher itself died (e.g. killed); say so
    if record.backend == "slurm" and record.job_ids:
        state = sacct_state(record.job_ids[-1])
        if state is not None and not (
            state == JobState.COMPLETED and record.state in RECORDED_ENDS
        ):
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


def sacct_state(job_id: str) -> JobState | None:
    """The job's state from accounting (RUNNING, COMPLETED, CANCELLED, ...), None if unknown."""
    states = sacct_states(job_id)
    return JobState.parse(states[-1]) if states else None
