"""The SLURM backend: one task per GPU via submitit, requeue-and-resume on preemption.

On SIGUSR2 (time limit, sent SIGNAL_LEAD_S early; submitit's preemption signal) every
rank finishes its step and saves a checkpoint (the trainer's StopFlag), then rank 0
requeues the job with `scontrol requeue` while `launch.max_requeues` allows; the
requeued job runs the same task, which resumes from that checkpoint. SIGTERM alone
(scancel, or Slurm's own preempt-and-requeue) saves and stops: the task returns and
rank 0 records CANCELLED (scancel) or STOPPED. A hung rank (the watchdog of
`training.observe.health`) requeues the job the same way (`HangRequeue`, the `on_hang`
of the `JobContext` each task hands the trainer), and Slurm ends every task of it
together. A sliced `gptrain prepare` is one array job and a merge job after it.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from launcher.backends import claim_run_dir, job_active, job_token
from launcher.config import Config, LaunchConfig, dump_yaml, load_config, train_job
from launcher.errors import LaunchError
from launcher.jobs import JobRecord, PrepareJob, load_job
from sharding.atomic import atomic_write
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
    without a cluster (for `launch --dry-run`).

    The three private names below are unavoidable: submitit renders the script only
    inside `submit` (which calls sbatch), and has no public renderer. The alternative, a
    script of our own, would be a second mapping of the config to SLURM that could drift
    from what is sent. pyproject.toml pins submitit below 1.6, and
    tests/unit/test_slurm_params.py compares this preview with the script a (fake)
    sbatch receives, so a change upstream fails a test rather than a user's dry run."""
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

        from training.run.rundir import JobContext
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
        context = JobContext(
            token=job_token(BACKEND.name, job_env.job_id),  # a requeued job keeps it
            job=job_token(BACKEND.name, job_env.job_id),
            job_active=job_active,
            on_hang=HangRequeue(run_dir, job_env.job_id, rank, restarts, self.max_requeues),
            stop_budget_s=SIGNAL_LEAD_S,  # the time-limit notice's lead; a write must fit
        )
        code = train(train_job(cfg), stop_signal=early[0] if early else None, context=context)
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
    """The hang hook (`JobContext.on_hang`): requeue the job, so it resumes from the
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


def _finish(run_dir: Path, state: JobState, code: int) -> JobState:
    """Record the run's end (a CANCELLED that `gptrain cancel` wrote stays); returns it."""
    record = load_job(run_dir)
    if record is None:
        return state
    if record.state == JobState.CANCELLED:
        state = JobState.CANCELLED
    return record.end(state, code).state


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
    _need_sbatch("launch.backend slurm")
    import submitit
    from submitit.core.utils import FailedJobError

    from training.run import rundir

    run_dir = Path(cfg.run.dir).resolve()
    rundir.check_free(run_dir, token="", job_active=job_active)
    cfg = claim_run_dir(cfg)
    config_file = RunDir(run_dir).launch_config
    atomic_write(config_file, dump_yaml(cfg))
    executor = submitit.AutoExecutor(folder=log_folder(run_dir), cluster="slurm")
    executor.update_parameters(**submitit_parameters(cfg.launch, job_name(cfg)))
    task = SlurmTrainTask(str(config_file), cfg.launch.max_requeues, dict(cfg.launch.slurm.env))
    sbatch_output = io.StringIO()  # submitit echoes sbatch's stderr; we report one line
    try:
        with contextlib.redirect_stdout(sbatch_output), contextlib.redirect_stderr(sbatch_output):
            job = executor.submit(task)
    except FailedJobError as exc:
        raise LaunchError(f"sbatch refused the job: {_sbatch_error(exc)}") from None
    sent = job.paths.submission_file.read_text()
    record = JobRecord(
        backend=BACKEND.name,
        run_dir=str(run_dir),
        job_ids=[job.job_id],
        state=JobState.PENDING,
        command=["sbatch", *sbatch_flags(sent)],
        nodes=cfg.launch.nodes,
        nproc_per_node=cfg.launch.nproc_per_node,
    )
    record.save()
    return record


def scancel(job_id: str, *, signal_only: bool = False) -> None:
    """End a job; `signal_only`: send its tasks SIGTERM and let them end themselves (after
    a checkpoint), instead of Slurm's SIGTERM then SIGKILL KillWait seconds later."""
    options = ["--signal=TERM"] if signal_only else []
    subprocess.run(["scancel", *options, job_id], check=True, timeout=60)


def submit_prepare(job: PrepareJob) -> JobRecord:
    """Stage here, then submit the pending slices as an array job and the merge after it."""
    from launcher.prepare_job import LOG_DIR, PrepareMergeTask, PrepareSliceTask
    from sharding.slices import pending_slices, stage

    _need_sbatch("--backend slurm")
    import submitit
    from submitit.core.utils import FailedJobError

    plan = stage(job.inputs, job.out_dir, job.tasks, job.options)
    todo = pending_slices(plan)
    out = Path(plan.out_dir)
    (out / LOG_DIR).mkdir(exist_ok=True)
    for stale in (out / LOG_DIR).glob("slice_*.error"):
        stale.unlink()
    params = submitit_parameters(job.launch, f"prepare-{out.name}")
    params.update(nodes=1, tasks_per_node=1)  # one slice per array element
    params.pop("gpus_per_node", None)  # tokenizing needs no GPU
    extra = dict(params.pop("slurm_additional_parameters", None) or {})
    executor = submitit.AutoExecutor(folder=out / LOG_DIR / "%j", cluster="slurm")
    output = io.StringIO()  # submitit echoes sbatch's stderr; we report one line
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            job_ids: list[str] = []
            if todo:
                executor.update_parameters(
                    **params,
                    slurm_array_parallelism=len(todo),
                    slurm_additional_parameters=extra or None,
                )
                task = PrepareSliceTask(
                    str(out), dict(job.launch.slurm.env), job.launch.slurm.cpus_per_task
                )
                jobs = executor.map_array(task, todo)
                job_ids.append(jobs[0].job_id.split("_")[0])
                extra = {**extra, "dependency": f"afterany:{job_ids[0]}"}
            executor.update_parameters(
                name=f"prepare-{out.name}-merge", slurm_additional_parameters=extra or None
            )
            job_ids.append(executor.submit(PrepareMergeTask(str(out))).job_id)
    except FailedJobError as exc:
        raise LaunchError(f"sbatch refused the job: {_sbatch_error(exc)}") from None
    record = JobRecord(
        backend=BACKEND.name,
        run_dir=str(out),
        command=job.command,
        nodes=job.launch.nodes,
        nproc_per_node=len(todo),
        job_ids=job_ids,
        state=JobState.PENDING,
        kind="prepare",
    )
    record.save()
    return record


def _need_sbatch(what: str) -> None:
    if shutil.which("sbatch") is None:
        raise LaunchError(
            f"{what}: sbatch not found; run on a SLURM login node "
            "(or start the local test cluster with slurm/start.sh)"
        )


def _sbatch_error(exc: Exception) -> str:
    """The line of sbatch's refusal worth showing (its `error:` line)."""
    errors = [ln.strip() for ln in str(exc).splitlines() if "error:" in ln]
    return errors[0] if errors else str(exc)


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
    """The job's state from accounting (RUNNING, COMPLETED, CANCELLED, ...), None if unknown.
    Slurm's own STOPPED (a job paused by SIGSTOP, still alive) is not the run's STOPPED."""
    states = sacct_states(job_id)
    state = JobState.parse(states[-1]) if states else None
    return None if state == JobState.STOPPED else state


# A task that returned after a stop ends COMPLETED in accounting; the run's own word wins.
RECORDED_ENDS = (JobState.STOPPED, JobState.PREEMPTED, JobState.CANCELLED)


class SlurmBackend:
    name = "slurm"

    def check(self, launch: LaunchConfig) -> None:
        pass  # any node count; sbatch itself is checked when submitting

    def preview(self, cfg: Config) -> list[str]:
        config_file = RunDir(cfg.run.dir).launch_config.resolve()
        return [
            "# sbatch script (as submitit will submit it)",
            sbatch_script(cfg).rstrip(),
            f"# each task: {SlurmTrainTask.__module__}.SlurmTrainTask, the trainer on "
            f"{config_file}",
        ]

    def launch(self, cfg: Config, *, follow: bool) -> int:
        record = submit(cfg)
        print(
            f"submitted job {record.job_ids[0]}: {record.run_dir} "
            f"({cfg.launch.nodes} node(s) × {cfg.launch.nproc_per_node} ranks)"
        )
        print(f"watch it: gptrain status {record.run_dir} | gptrain logs {record.run_dir} --follow")
        if follow:
            from launcher.status import follow_log

            follow_log(RunDir(record.run_dir).rank_log(0), Path(record.run_dir))
        return 0

    def default_tasks(self, launch: LaunchConfig) -> int:
        return launch.world_size

    def prepare(self, job: PrepareJob) -> int:
        record = submit_prepare(job)
        print(f"submitted jobs {', '.join(record.job_ids)}: prepare {record.run_dir}")
        print(f"watch it: gptrain status {record.run_dir}")
        return 0

    def refresh(self, record: JobRecord) -> JobRecord:
        if not record.job_ids:
            return record
        state = sacct_state(record.job_ids[-1])
        if state is not None and not (
            state == JobState.COMPLETED and record.state in RECORDED_ENDS
        ):
            record.state = state
        if (
            record.kind == "prepare"
            and record.state == JobState.PENDING
            and len(record.job_ids) > 1
            and JobState.RUNNING in sacct_states(record.job_ids[0])  # the slices run
        ):
            record.state = JobState.RUNNING
        return record

    def cancel(self, record: JobRecord) -> JobRecord:
        for job_id in record.job_ids:  # a running job saves first: only signal its tasks
            scancel(job_id, signal_only=record.state == JobState.RUNNING and record.kind == "train")
        record = load_job(record.run_dir) or record  # rank 0 may be recording the stop
        return record.end(JobState.CANCELLED)

    def job_active(self, job_id: str) -> bool | None:
        if shutil.which("squeue") is None:
            return None
        try:
            out = subprocess.run(
                ["squeue", "-h", "-j", job_id, "-o", "%T"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return bool(out.stdout.strip()) if out.returncode == 0 else False

    def log_files(self, record: JobRecord) -> list[Path]:
        from launcher.prepare_job import LOG_DIR

        run_dir = Path(record.run_dir)
        folders = [log_folder(run_dir).parent, run_dir / LOG_DIR]
        return sorted(p for d in folders if d.is_dir() for p in d.glob("*/*_log.*"))

    def job_of_env(self, environ: Mapping[str, str]) -> str | None:
        return environ.get("SLURM_JOB_ID") or None


BACKEND = SlurmBackend()
