"""The job record of a run dir (`RunDir.job_file`): what was launched, where, and in which
state it is (a `JobState`)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.run.paths import JobState, RunDir

if TYPE_CHECKING:
    from launcher.config import LaunchConfig
    from sharding.options import PrepareOptions


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

    def end(self, state: JobState, exit_code: int | None = None) -> JobRecord:
        """Record that the job ended in `state` (and saves); returns the record."""
        self.state = state
        self.exit_code = self.exit_code if exit_code is None else exit_code
        self.end_time = time.time()
        self.save()
        return self


def load_job(run_dir: str | Path) -> JobRecord | None:
    """The job record as saved (`launcher.backends.current_job`: with its state now)."""
    data = RunDir(Path(run_dir)).read_job()
    return None if data is None else JobRecord(**data)


@dataclass(frozen=True)
class PrepareJob:
    """A sliced `gptrain prepare` for a backend to run (`Backend.prepare`)."""

    inputs: list[str]  # files, directories or globs
    out_dir: Path
    tasks: int  # slices
    launch: LaunchConfig  # the launch section (its scheduler settings)
    workers: int | None  # tokenizer processes here (None: all cores)
    command: list[str]  # as typed, for the job record
    options: PrepareOptions
