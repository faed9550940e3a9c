"""The SLURM backend: one task per GPU via submitit, requeue-and-resume on preemption.

On SIGUSR2 (time limit, sent SIGNAL_LEAD_S early; submitit's preemption signal) every
rank finishes its step and saves a checkpoint (the trainer's StopFlag), then rank 0
requeues the job with `scontrol requeue` while `launch.max_requeues` allows; the
requeued job runs the same task, which resumes from that checkpoint. SIGTERM alone
(scancel, or Slurm's own preempt-and-requeue) saves and stops: the task returns and
rank 0 records CANCELLED (scancel) or STOPPED. A hung rank (the watchdog of
`training.observe.health`) requeues the job the same way (`HangRequeue`), and Slurm ends
every task of it together.

What is submitted is one set of parameters (`submitit_parameters`); the dry-run's
preview is submitit's own sbatch script for them (`sbatch_script`), and job.json
records the `#SBATCH` lines of the script that was actually sent.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launcher.config import Config, LaunchConfig, dump_yaml, load_config, train_job
from launcher.errors import LaunchError
from launcher.jobs import JobRecord, load_job
from training.errors import EXIT_REQUEUE, EXIT_STOPPED
from training.observe.events import Events
from training.run.failures import write_failure
from training.run.paths import JobState, RunDir

REQUEUE_WAIT_S = 300  # Slurm kills the tasks of a requeued job well before this
REQUEUE_TRIES = 3  # a hung rank's `scontrol requeue`, when refused while the job runs
REQUEUE_SETTLE_S = 1.0  # a peer's requeue takes the job out of RUNNING within this
REQUEUE_DEFER_S = 20.0  # a hung rank other than 0 waits 1-2× this for rank 0's requeue
SIGNAL_LEAD_S = 90  # SIGUSR2 this long before the time limit: time to checkpoint


def master_port(job_id: str) -> int:
    """A rendezvous port every task of a job derives alike, distinct between jobs."""
    return 20000 + int(job_id.split("_")[0]) % 20000


def submitit_parameters(launch: LaunchConfig, name: str) -> dict[str, Any]:
    """AutoExecutor parameters for `launch`: the one mapping of the config to SLURM (the
    preview and job.json are rendered from what these make submitit write)."""
    slurm = launch.slurm
    params: dict[str, Any] = {
        "name": name,
        "nodes": launch.nodes,
        "tasks_per_node": launch.nproc_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        "timeout_min": slurm.time_min,
        "slurm_signal_delay_s": SIGNAL_LEAD_S,
    }
    optional = {
        "gpus_per_node": slurm.gpus_per_node or None,
        "mem_gb": slurm.mem_gb,
        "slurm_partition": slurm.partition,
        "slurm_account": slurm.account,
        "slurm_qos": slurm.qos,
        "slurm_constraint": slurm.constraint,
        "slurm_exclusive": slurm.exclusive or None,
        "slurm_additional_parameters": dict(slurm.sbatch_extra) or None,
        "slurm_setup": list(slurm.setup) or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def job_name(cfg: Config) -> str:
    return cfg.run.name or Path(cfg.run.dir).resolve().name


def log_folder(run_dir: Path) -> Path:
    """submitit's folder of a run's jobs (scripts, pickles, task logs)."""
    return run_dir.resolve() / "slurm" / "%j"


def sbatch_script(cfg: Config) -> str:
    """The sbatch script `submit(cfg)` makes submitit write, by submitit's own renderer,
    without a cluster (for `launch --dry-run`)."""
    from submitit import SlurmExecutor

    class ScriptOnly(SlurmExecutor):  # renders only: no srun needed on this machine
        @classmethod
        def affinity(cls) -> int:
            return 1

    executor = ScriptOnly(folder=log_folder(Path(cfg.run.dir)))
    params = submitit_parameters(cfg.launch, job_name(cfg))
    # What AutoExecutor does: shared names converted by the SLURM executor, `slurm_` ones as is
    shared = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    native = {k.removeprefix("slurm_"): v for k, v in params.items() if k.startswith("slurm_")}
    executor.update_parameters(**executor._convert_parameters(shared), **native)
    return executor._make_submission_file_text(executor._submitit_command_str, uid="")


def sbatch_flags(script: str) -> list[str]:
    """`--key=value` of each `#SBATCH` line of an sbatch script."""
    return [ln.removeprefix("#SBATCH ") for ln in script.splitlines() if ln.startswith("#SBATCH ")]


class SlurmTrainTask:
    """What each SLURM task runs: torchrun variables from submitit, then the trainer.
    A stop or a spent requeue budget ends the task with one line, never a traceback."""

    def __init__(self, config_file: str, max_requeues: int, env: dict[str, str]) -> None:
        self.config_file = config_file
        self.max_requeues = max_requeues
        self.env = env

    def __call__(self) -> int:
        # A SIGTERM (gptrain cancel) before the trainer's handler is up is kept for it:
        # submitit's own handler would only log it, and the job would train on.
        early: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, frame: early.append(signum))
        import submitit

        from training.observe.guard import HANG_HOOKS
        from training.trainer import train

        job_env = submitit.JobEnvironment()
        os.environ.update(self.env)
        os.environ.update(
            RANK=str(job_env.global_rank),
            WORLD_SIZE=str(job_env.num_tasks),
            LOCAL_RANK=str(job_env.local_rank),
            MASTER_ADDR=job_env.hostnames[0],
            MASTER_PORT=str(master_port(job_env.job_id)),
        )
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        cfg = load_config(self.config_file)
        run_dir, rank, main = Path(cfg.run.dir), job_env.global_rank, job_env.global_rank == 0
        if main:
            _update_record(run_dir, state=JobState.RUNNING, requeues=restarts)
        HANG_HOOKS.append(HangRequeue(run_dir, job_env.job_id, rank, restarts, self.max_requeues))
        code = train(train_job(cfg), stop_signal=early[0] if early else None)
        if code == EXIT_STOPPED:  # SIGTERM: cancelled, or Slurm preempts and requeues itself
            if main:
                cancelled = job_state(job_env.job_id) == JobState.CANCELLED
                state = _finish(
                    run_dir, JobState.CANCELLED if cancelled else JobState.STOPPED, code
                )
                _say(
                    f"training {state.lower()}; launch again to resume from the last "
                    f"checkpoint in {run_dir}"
                )
            return code
        if code == EXIT_REQUEUE:
            if restarts >= self.max_requeues:
                if main:
                    _finish(run_dir, JobState.PREEMPTED, code)
                    _say(
                        f"preempted after {restarts} requeues (launch.max_requeues); launch "
                        f"again to resume from the last checkpoint in {run_dir}"
                    )
                return code
            why = requeue(run_dir, job_env.job_id, restarts) if main else None
            if why is not None:
                raise RuntimeError(f"scontrol requeue {job_env.job_id}: {why}")
            await_requeue()
            raise RuntimeError("requeue requested but the job was not restarted")
        if code != 0:
            raise RuntimeError(f"training exited with code {code}")
        if main:
            _finish(run_dir, JobState.COMPLETED, code)
        return code


class HangRequeue:
    """A hang hook (`training.observe.guard.HANG_HOOKS`): requeue the job, so it resumes from the
    last checkpoint, while `launch.max_requeues` allows; else record the hang as the
    run's failure. Every rank of a hung job fires (a stuck rank stalls its peers at the
    next collective). Rank 0 requeues at once and records it in the run's job.json; the
    others give it REQUEUE_DEFER_S (jittered) and read that record on the shared run
    dir, so a job of hundreds of ranks sends slurmctld one request, not hundreds. Only
    if rank 0 has not requeued do they ask themselves; a refused request (the job is no
    longer running) means a peer's won. Once requeued, the rank waits for Slurm to end
    it with every other task: a rank that exited on its own would break its peers'
    collective, and they would fail with a traceback instead."""

    def __init__(
        self, run_dir: Path, job_id: str, rank: int, restarts: int, max_requeues: int
    ) -> None:
        self.run_dir, self.job_id, self.rank = run_dir, job_id, rank
        self.restarts, self.max_requeues = restarts, max_requeues

    def __call__(self, message: str) -> None:
        if self.restarts >= self.max_requeues:
            write_failure(
                self.run_dir,
                self.rank,
                f"{message}; not requeued: {self.restarts} requeues (launch.max_requeues)",
            )
            return
        if self.rank != 0:
            time.sleep(REQUEUE_DEFER_S * (1 + random.random()))  # Slurm may end us here
            record = load_job(self.run_dir)
            if record is not None and record.requeues > self.restarts:  # rank 0 did it
                await_requeue()
                return
        for _ in range(REQUEUE_TRIES):
            why = requeue(self.run_dir, self.job_id, self.restarts)
            if why is None:
                Events(self.run_dir, self.rank).emit(
                    "requeue",
                    f"job {self.job_id} requeued after a hang (requeue "
                    f"{self.restarts + 1}); it resumes from the last checkpoint",
                )
                break
            time.sleep(REQUEUE_SETTLE_S)
            if job_state(self.job_id) not in (JobState.RUNNING, None):
                break
        else:
            write_failure(
                self.run_dir, self.rank, f"{message}; scontrol requeue {self.job_id} failed: {why}"
            )
            return
        await_requeue()


def requeue(run_dir: Path, job_id: str, restarts: int) -> str | None:
    """`scontrol requeue` the job and record REQUEUED; returns why it was refused, or None."""
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if result.returncode != 0:
        return result.stderr.strip() or f"exit code {result.returncode}"
    _update_record(run_dir, state=JobState.REQUEUED, requeues=restarts + 1)
    return None


def await_requeue() -> None:
    """Wait for Slurm to end this task of a requeued job (with all the others)."""
    time.sleep(REQUEUE_WAIT_S)


def job_state(job_id: str) -> str | None:
    """The job's state from the controller now (sacct may lag): e.g. CANCELLED as soon as
    scancel is given, while its tasks are still saving."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def _finish(run_dir: Path, state: str, code: int) -> str:
    """Record the run's end (a CANCELLED that `gptrain cancel` wrote stays); returns it."""
    record = load_job(run_dir)
    if record is None:
        return state
    if record.state == JobState.CANCELLED:
        state = JobState.CANCELLED
    record.state, record.exit_code, record.end_time = state, code, time.time()
    record.save()
    return state


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _update_record(run_dir: Path, **changes: Any) -> None:
    record = load_job(run_dir)
    if record is None:
        return
    for key, value in changes.items():
        setattr(record, key, value)
    record.save()


def submit(cfg: Config) -> JobRecord:
    """Submit the run as one SLURM job; returns its job record (also in RUN_DIR/job.json),
    whose `command` holds the `#SBATCH` lines of the script submitit sent."""
    if shutil.which("sbatch") is None:
        raise LaunchError(
            "launch.backend slurm: sbatch not found; run on a SLURM login node "
            "(or start the local test cluster with slurm/start.sh)"
        )
    import submitit
    from submitit.core.utils import FailedJobError

    run_dir = Path(cfg.run.dir).resolve()
    cfg = _claim_run_dir(cfg, run_dir)
    config_file = RunDir(run_dir).launch_config
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(dump_yaml(cfg))
    executor = submitit.AutoExecutor(folder=log_folder(run_dir), cluster="slurm")
    executor.update_parameters(**submitit_parameters(cfg.launch, job_name(cfg)))
    task = SlurmTrainTask(str(config_file), cfg.launch.max_requeues, dict(cfg.launch.slurm.env))
    sbatch_output = io.StringIO()  # submitit echoes sbatch's stderr; we report one line
    try:
        with contextlib.redirect_stdout(sbatch_output), contextlib.redirect_stderr(sbatch_output):
            job = executor.submit(task)
    except FailedJobError as exc:
        errors = [ln.strip() for ln in str(exc).splitlines() if "error:" in ln]
        raise LaunchError(f"sbatch refused the job: {errors[0] if errors else exc}") from None
    sent = job.paths.submission_file.read_text()
    record = JobRecord(
        backend="slurm",
        run_dir=str(run_dir),
        job_ids=[job.job_id],
        state=JobState.PENDING,
        command=["sbatch", *sbatch_flags(sent)],
        nodes=cfg.launch.nodes,
        nproc_per_node=cfg.launch.nproc_per_node,
    )
    record.save()
    return record


def _claim_run_dir(cfg: Config, run_dir: Path) -> Config:
    """Refuse a run dir a live run owns, or `never` into a used one; `overwrite` archives
    the old run. The job then runs with `auto`, so its requeues resume its checkpoints
    (its ranks take the lock, as `slurm:JOB_ID`)."""
    import dataclasses

    from training.run import rundir

    rundir.check_free(run_dir, token="")
    resume = cfg.train.resume
    if resume not in ("never", "overwrite"):
        return cfg
    rundir.check_fresh(run_dir, resume)
    if resume == "overwrite":
        rundir.archive(run_dir)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="auto"))


def scancel(job_id: str, *, signal_only: bool = False) -> None:
    """End a job; `signal_only`: send its tasks SIGTERM and let them end themselves (after
    a checkpoint), instead of Slurm's SIGTERM then SIGKILL KillWait seconds later."""
    options = ["--signal=TERM"] if signal_only else []
    subprocess.run(["scancel", *options, job_id], check=True, timeout=60)
