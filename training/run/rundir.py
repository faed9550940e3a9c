"""Who owns a run directory, and whether a new run may start in it.

A run directory has one owner at a time: its lock (`RunDir.lock`) names it (an owner
token, host, pid, the scheduler's job, start time). `gptrain launch` takes it before
it writes anything and passes its token to the ranks (`GPTRAIN_RUN_OWNER`); ranks
started by hand or by a scheduler take it themselves (one token per torchrun or
scheduler job, so every rank of one run agrees, and a requeued job is still the
owner). A lock whose pid is dead on this host, or whose job the launcher's backend
says is over (`JobContext.job_active`), is stale and taken over. `train.resume:
never` refuses a directory that holds another run's checkpoints or metrics;
`overwrite` first moves them to the run dir's archive.

Training knows no scheduler by name: whoever starts a rank hands it a `JobContext`
(a backend's task directly; `gptrain train` builds one from the environment with the
backends' help, `launcher.backends.rank_context`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharding.atomic import atomic_write
from training.errors import TrainingError
from training.run.paths import RunDir

OWNER_ENV = "GPTRAIN_RUN_OWNER"  # set by `gptrain launch` for the ranks it starts
STOP_BUDGET_ENV = "GPTRAIN_STOP_BUDGET_S"  # JobContext.stop_budget_s, read by `from_env`


@dataclass(frozen=True)
class JobContext:
    """What the launcher backend that started this rank tells training.

    token: the run dir's owner token, the same on every rank of one run (and of its
        requeues). job: the scheduler's job ("<backend>:<id>"), recorded in the lock.
    job_active: whether a job recorded in some lock still runs or waits (None: cannot
        tell); how a stale lock of a job that died elsewhere is recognised.
    on_hang: called by the hang watchdog before the rank exits (e.g. requeue the job).
    launcher_holds_lock: a launcher process holds the lock and releases it, not rank 0.
    stop_budget_s: seconds from a stop signal until the scheduler kills the job (None:
        no limit); a checkpoint write that cannot finish in it is dropped cleanly.
    """

    token: str
    job: str | None = None
    job_active: Callable[[str], bool | None] | None = None
    on_hang: Callable[[str], None] | None = None
    launcher_holds_lock: bool = False
    stop_budget_s: float | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **hooks: Any) -> JobContext:
        """The context of a rank in its own process, from `environ` alone (a launcher's
        token, else torchrun's, else this process's); `hooks`: the other fields."""
        budget = environ.get(STOP_BUDGET_ENV)
        return cls(
            token=owner_token(environ),
            launcher_holds_lock=bool(environ.get(OWNER_ENV)),
            stop_budget_s=float(budget) if budget else None,
            **hooks,
        )


def owner_token(environ: Mapping[str, str]) -> str:
    """The same token on every rank of one run: the launcher's, the torchrun
    rendezvous's, else this process's."""
    if environ.get(OWNER_ENV):
        return environ[OWNER_ENV]
    if environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{socket.gethostname()}:{environ['TORCHELASTIC_RUN_ID']}"
    return f"pid:{socket.gethostname()}:{os.getpid()}"


def holder(run_dir: Path) -> dict[str, Any] | None:
    """The lock's content, or None when there is no (readable) lock."""
    try:
        return json.loads(RunDir(run_dir).lock.read_text())
    except (FileNotFoundError, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    """Whether process `pid` exists on this host (None: no process)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_live(lock: dict[str, Any], job_active: Callable[[str], bool | None] | None = None) -> bool:
    """A lock is stale when its job is over (as `job_active` says) or its pid is dead on
    this host."""
    if lock.get("job_id") and job_active is not None:
        active = job_active(str(lock["job_id"]))
        if active is not None:
            return active
    if lock.get("host") == socket.gethostname():
        return pid_alive(int(lock.get("pid", 0)))
    return True  # another host, no way to ask: assume it is running


def _describe(run_dir: Path, lock: dict[str, Any]) -> str:
    job = f", job {lock['job_id']}" if lock.get("job_id") else ""
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(lock.get("started", 0)))
    return (
        f"run.dir {run_dir}: in use by another run (host {lock.get('host')}, pid "
        f"{lock.get('pid')}{job}, since {since}); wait for it, stop it (gptrain cancel "
        f"{run_dir}), or use another run.dir (delete {RunDir(run_dir).lock} only if that run is "
        "gone)"
    )


def check_free(
    run_dir: Path, token: str, job_active: Callable[[str], bool | None] | None = None
) -> None:
    """TrainingError (one line) when a live run other than `token` owns `run_dir`."""
    lock = holder(run_dir)
    if lock is not None and lock.get("token") != token and is_live(lock, job_active):
        raise TrainingError(_describe(run_dir, lock))


def acquire(run_dir: Path, context: JobContext) -> None:
    """Own `run_dir` for `context.token` (idempotent for the same token; a stale lock is
    taken over); TrainingError when a live other run owns it."""
    token = context.token
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "token": token,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": context.job,
        "started": time.time(),
    }
    path = RunDir(run_dir).lock
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        lock = holder(run_dir)
        if lock is not None and lock.get("token") == token:
            return
        if lock is not None and is_live(lock, context.job_active):
            raise TrainingError(_describe(run_dir, lock)) from None
        atomic_write(path, json.dumps(record), fsync=False)  # stale: take it over
        return
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record))


def release(run_dir: Path, token: str) -> None:
    """Remove the lock if `token` holds it."""
    lock = holder(run_dir)
    if lock is not None and lock.get("token") == token:
        RunDir(run_dir).lock.unlink(missing_ok=True)


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run's checkpoints (complete or not) or metrics."""
    paths = RunDir(run_dir)
    steps = paths.checkpoints
    if steps.is_dir() and any(p.name.startswith(("step_", ".tmp_step_")) for p in steps.iterdir()):
        return True
    metrics = paths.metrics
    return metrics.is_file() and metrics.stat().st_size > 0


def check_fresh(run_dir: Path, resume: str) -> None:
    """`train.resume: never` into a directory holding a run: refused, in one line."""
    if resume == "never" and holds_run(run_dir):
        raise TrainingError(
            f"train.resume: never, but run.dir {run_dir} holds another run's checkpoints or "
            "metrics; use another run.dir, or --set train.resume=overwrite to move the old run "
            f"to {RunDir(run_dir).archive}/<time>/ first"
        )


def archive(run_dir: Path, keep: tuple[str, ...] = ()) -> Path | None:
    """Move everything of the old run (all but the lock, archive/ and `keep`) to
    `RUN_DIR/archive/<time>/`; returns that directory, None when there was nothing."""
    if not run_dir.is_dir():
        return None
    paths = RunDir(run_dir)
    never = {paths.lock.name, paths.archive.name, *keep}
    items = [p for p in run_dir.iterdir() if p.name not in never]
    if not items:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = paths.archive / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = paths.archive / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for item in items:
        item.rename(dest / item.name)  # same filesystem: a rename, nothing copied
    return dest
