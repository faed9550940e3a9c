"""`RUN_DIR/job.json`: what was launched, where, and in which state it is."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.rundir import pid_alive  # noqa: F401  (callers import it from here)

JOB_FILE = "job.json"


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




def to_json(record: JobRecord) -> dict[str, Any]:
    return asdict(record)
