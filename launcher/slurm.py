"""The SLURM backend: one task per GPU via submitit, requeue-and-resume on preemption.

On SIGUSR2 (time limit, sent 90 s early; submitit's preemption signal) every rank
finishes its step and saves a checkpoint (the trainer's StopFlag), then rank 0
requeues the job with `scontrol requeue` while `launch.max_requeues` allows;
the requeued job runs the same task, which resumes from that checkpoint. SIGTERM
alone (scancel, or Slurm's own preempt-and-requeue) saves and stops.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from launcher.config import Config, LaunchConfig, dump_yaml, load_config, train_job
from launcher.jobs import JobRecord, load_job

REQUEUE_WAIT_S = 300  # Slurm kills the tasks of a requeued job well before this
_SACCT_STATES = ("PENDING", "RUNNING", "REQUEUED", "COMPLETED", "CANCELLED", "FAILED",
                 "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "SUSPENDED")  # fmt: skip


def master_port(job_id: str) -> int:
    """A rendezvous port every task of a job derives alike, distinct between jobs."""
    return 20000 + int(job_id.split("_")[0]) % 20000


def submitit_parameters(launch: LaunchConfig, name: str) -> dict[str, Any]:
    """AutoExecutor parameters for `launch` (see `launch.sbatch_parameters` for the flags)."""
    slurm = launch.slurm
    params: dict[str, Any] = {
        "name": name,
        "nodes": launch.nodes,
        "tasks_per_node": launch.nproc_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        "timeout_min": slurm.time_min,
        "slurm_signal_delay_s": 90,
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


class SlurmTrainTask:
    """What each SLURM task runs: torchrun variables from submitit, then the trainer."""

    def __init__(self, config_file: str, max_requeues: int, env: dict[str, str]) -> None:
        self.config_file = config_file
        self.max_requeues = max_requeues
        self.env = env

    def __call__(self) -> int:
        import submitit

        from training.trainer import EXIT_REQUEUE, EXIT_STOPPED, train

        job_env = submitit.JobEnvironment()
        os.environ.update(self.env)
        os.environ.update(
            RANK=str(job_env.global_rank), WORLD_SIZE=str(job_env.num_tasks),
            LOCAL_RANK=str(job_env.local_rank), MASTER_ADDR=job_env.hostnames[0],
            MASTER_PORT=str(master_port(job_env.job_id)),
        )  # fmt: skip
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        cfg = load_config(self.config_file)
        if job_env.global_rank == 0:
            _update_record(Path(cfg.run.dir), state="RUNNING", requeues=restarts)
        code = train(train_job(cfg))
        if code == EXIT_STOPPED:  # SIGTERM: cancelled, or Slurm preempts and requeues itself
            raise RuntimeError("stopped by SIGTERM; checkpoint saved — relaunch to resume")
        if code == EXIT_REQUEUE:
            if restarts >= self.max_requeues:
                raise RuntimeError(
                    f"preempted after {restarts} requeues (launch.max_requeues); checkpoint "
                    f"saved — relaunch to resume"
                )
            if job_env.global_rank == 0:
                subprocess.run(["scontrol", "requeue", job_env.job_id], check=True, timeout=60)
            time.sleep(REQUEUE_WAIT_S)  # the requeue ends this task
            raise RuntimeError("requeue requested but the job was not restarted")
        if code != 0:
            raise RuntimeError(f"training exited with code {code}")
        if job_env.global_rank == 0:
            _update_record(Path(cfg.run.dir), state="COMPLETED")
        return code


def _update_record(run_dir: Path, **changes: Any) -> None:
    record = load_job(run_dir)
    if record is None:
        return
    for key, value in changes.items():
        setattr(record, key, value)
    record.save()


def submit(cfg: Config) -> JobRecord:
    """Submit the run as one SLURM job; returns its job record (also in RUN_DIR/job.json)."""
    from launcher.launch import LaunchError, sbatch_parameters

    if shutil.which("sbatch") is None:
        raise LaunchError(
            "launch.backend slurm: sbatch not found; run on a SLURM login node "
            "(or start the local test cluster with slurm/start.sh)"
        )
    import submitit
    from submitit.core.utils import FailedJobError

    run_dir = Path(cfg.run.dir).resolve()
    cfg = _claim_run_dir(cfg, run_dir)
    config_file = run_dir / "launch" / "config.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(dump_yaml(cfg))
    executor = submitit.AutoExecutor(folder=run_dir / "slurm" / "%j", cluster="slurm")
    executor.update_parameters(**submitit_parameters(cfg.launch, cfg.run.name or run_dir.name))
    task = SlurmTrainTask(str(config_file), cfg.launch.max_requeues, dict(cfg.launch.slurm.env))
    sbatch_output = io.StringIO()  # submitit echoes sbatch's stderr; we report one line
    try:
        with contextlib.redirect_stdout(sbatch_output), contextlib.redirect_stderr(sbatch_output):
            job = executor.submit(task)
    except FailedJobError as exc:
        errors = [ln.strip() for ln in str(exc).splitlines() if "error:" in ln]
        raise LaunchError(f"sbatch refused the job: {errors[0] if errors else exc}") from None
    params = sbatch_parameters(cfg.launch)
    record = JobRecord(
        backend="slurm", run_dir=str(run_dir), job_ids=[job.job_id], state="PENDING",
        command=["sbatch", *(f"--{k}" if v is True else f"--{k}={v}" for k, v in params.items())],
        nodes=cfg.launch.nodes, nproc_per_node=cfg.launch.nproc_per_node,
    )  # fmt: skip
    record.save()
    return record


def _claim_run_dir(cfg: Config, run_dir: Path) -> Config:
    """Refuse a run dir a live run owns, or `never` into a used one; `overwrite` archives
    the old run. The job then runs with `auto`, so its requeues resume its checkpoints
    (its ranks take the lock, as `slurm:JOB_ID`)."""
    import dataclasses

    from training import rundir

    rundir.check_free(run_dir, token="")
    resume = cfg.train.resume
    if resume not in ("never", "overwrite"):
        return cfg
    rundir.check_fresh(run_dir, resume)
    if resume == "overwrite":
        rundir.archive(run_dir)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="auto"))


def sacct_state(job_id: str) -> str | None:
    """The job's state from accounting (RUNNING, COMPLETED, CANCELLED, ...), None if unknown."""
    if shutil.which("sacct") is None:
        return None
    try:
        out = subprocess.run(
            ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State", "-S", "2000-01-01"],
            capture_output=True, text=True, timeout=30,
        ).stdout.split()  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    state = out[-1] if out else None
    return state if state in _SACCT_STATES else None


def scancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], check=True, timeout=60)
