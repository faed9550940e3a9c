"""Where jobs run: one backend per scheduler, each behind the same small interface.

    local   torchrun on this machine                  (launcher.backends.local)
    slurm   one SLURM job per launch, through submitit (launcher.backends.slurm)

`gptrain launch`, `prepare --backend`, `status`, `cancel` and `logs` ask
`backend(name)` and never branch on a backend's name; training knows none of them
(a backend hands its ranks a `training.run.rundir.JobContext`).

To add a backend (e.g. Kubernetes): write `launcher/backends/NAME.py` with a class that
implements `Backend`, list it in `_MODULES` and in `LaunchConfig.backend`, and copy
the local backend's tests (tests/unit/test_backends.py checks that the lists agree).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from launcher.config import Config, LaunchConfig
    from launcher.jobs import JobRecord, PrepareJob
    from training.run.rundir import JobContext

# name → module; each module's `BACKEND` is its instance (imported when first asked for).
_MODULES = {"local": "launcher.backends.local", "slurm": "launcher.backends.slurm"}
NAMES = tuple(_MODULES)


class Backend(Protocol):
    """One way to run jobs. A job's record (`job.json`, `launcher.jobs.JobRecord`) names
    its backend, so `status`, `cancel` and `logs` find it again."""

    name: str

    def check(self, launch: LaunchConfig) -> None:
        """LaunchError (one line, naming the key) for a launch section this backend cannot
        run; before anything else is checked."""

    def preview(self, cfg: Config) -> list[str]:
        """What `launch --dry-run` shows of what would be sent: the command or script."""

    def launch(self, cfg: Config, *, follow: bool) -> int:
        """Run or submit a checked config; returns the exit code."""

    def default_tasks(self, launch: LaunchConfig) -> int:
        """How many slices `gptrain prepare --tasks` makes by default here."""

    def prepare(self, job: PrepareJob) -> int:
        """Run or submit a sliced `gptrain prepare`; returns the exit code."""

    def refresh(self, record: JobRecord) -> JobRecord:
        """The record with its state brought up to date from the scheduler (not saved)."""

    def cancel(self, record: JobRecord) -> JobRecord:
        """Stop the active job (a training job saves a checkpoint first); returns its
        record, saved as it ends (CANCELLED, or the end the job recorded itself)."""

    def job_active(self, job_id: str) -> bool | None:
        """Whether the scheduler still runs or queues `job_id`; None when it cannot tell."""

    def log_files(self, record: JobRecord) -> list[Path]:
        """The scheduler's own logs of a job (besides the ranks' logs in the run dir)."""

    def job_of_env(self, environ: Mapping[str, str]) -> str | None:
        """The id of this scheduler's job that a process with `environ` runs in (e.g. a
        `gptrain train` that srun started directly), None outside one."""


def backend(name: str) -> Backend:
    """The backend called `name` (one of NAMES)."""
    if name not in _MODULES:
        from launcher.errors import LaunchError

        raise LaunchError(f"launch.backend: {name!r} is not one of {', '.join(NAMES)}")
    return importlib.import_module(_MODULES[name]).BACKEND


def job_token(name: str, job_id: str) -> str:
    """How a scheduler job is named in a run dir's lock: "<backend>:<job id>"."""
    return f"{name}:{job_id}"


def job_active(token: str) -> bool | None:
    """Whether the job a lock names (`job_token`) still runs; None when nobody can tell.
    A bare id is a lock written before locks named their backend: only SLURM wrote ids."""
    name, _, job_id = token.rpartition(":")
    if name not in _MODULES:
        return None if name else backend("slurm").job_active(job_id)
    return backend(name).job_active(job_id)


def rank_context(environ: Mapping[str, str]) -> JobContext:
    """The `JobContext` of a rank in its own process (`gptrain train` under torchrun, by
    hand, or started by a scheduler directly): a launcher's token when it holds the run
    dir, else the scheduler job's (every rank and requeue of the job shares it), else
    torchrun's or this process's."""
    from training.run.rundir import OWNER_ENV, JobContext

    if not environ.get(OWNER_ENV):
        for name in NAMES:
            job_id = backend(name).job_of_env(environ)
            if job_id:
                token = job_token(name, job_id)
                return JobContext(token=token, job=token, job_active=job_active)
    return JobContext.from_env(environ, job_active=job_active)


def current_job(run_dir: str | Path) -> JobRecord | None:
    """`job.json` with its state brought up to date by its backend (not saved)."""
    from launcher.jobs import load_job

    record = load_job(run_dir)
    return None if record is None else backend(record.backend).refresh(record)


def claim_run_dir(cfg: Config) -> Config:
    """Before a launch writes: `train.resume: never` into a used run dir is refused and
    `overwrite` moves the old run to the archive. Either way the ranks then run with
    `auto`, so a restart or requeue resumes this run."""
    from training.run import rundir

    resume, run_dir = cfg.train.resume, Path(cfg.run.dir)
    if resume not in ("never", "overwrite"):
        return cfg
    rundir.check_fresh(run_dir, resume)
    if resume == "overwrite":
        moved = rundir.archive(run_dir)
        if moved is not None:
            print(f"moved the old run in {run_dir} to {moved}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="auto"))
