"""`gptrain prepare --tasks N [--backend local|slurm]`: prepare in resumable slices.

    gptrain prepare corpus/ --out data/c --train-tokenizer 32000 --tasks 8
    gptrain prepare corpus/ --out data/c --train-tokenizer 32000 --backend slurm --tasks 64 \\
        --set launch.slurm.partition=cpu --set launch.slurm.cpus_per_task=8
    gptrain status data/c          # slices done/total, tokens, tokens/s

local runs `sharding.slices.prepare_sliced` here. slurm makes the plan and the
tokenizer here (once), then submits one array job (submitit `map_array`: one
element per slice still to do, each with `launch.slurm.cpus_per_task` tokenizer
processes) and a merge job that starts after it (`--dependency=afterany`) and
fails naming the slices that did not finish. Re-running the same command submits
only those. Both write the job record `OUT/job.json` (kind "prepare").
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from launcher.config import LaunchConfig, apply_overrides, build_section, read_yaml
from launcher.errors import LaunchError
from launcher.jobs import JobRecord, current_job, load_job, sacct_states
from sharding.errors import DataError
from sharding.options import PrepareOptions
from sharding.slices import pending_slices, prepare_sliced, progress_of, run_slice, stage
from training.run.failures import error_line
from training.run.paths import JobState
from training.run.rundir import pid_alive

LOG_DIR = ".prepare-slurm"  # submitit's scripts and logs, and failed slices' errors
_STOPPING_S = 120.0  # a cancelled local prepare stops its slices within this (then: pid reuse)


class PrepareSliceTask:
    """One array element: tokenize one slice with this task's CPUs."""

    def __init__(self, out_dir: str, env: dict[str, str]) -> None:
        self.out_dir, self.env = out_dir, env

    def __call__(self, k: int) -> dict[str, Any]:
        os.environ.update(self.env)
        workers = int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        try:
            return run_slice(self.out_dir, k, workers=workers)
        except Exception as exc:  # the merge job reports it
            error = Path(self.out_dir) / LOG_DIR / f"slice_{k:04d}.error"
            error.write_text(error_line(exc) + "\n")
            raise


class PrepareMergeTask:
    """The job after the array: verify and merge the slices; the outcome goes to job.json."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def __call__(self) -> dict[str, Any]:
        from sharding.slices import merge

        out = Path(self.out_dir)
        record = load_job(out)
        started = record.submit_time if record is not None else None
        try:
            result = merge(out, started=started)
        except DataError as exc:
            errors = sorted((out / LOG_DIR).glob("slice_*.error"))
            first = f" (first failure: {errors[0].read_text().strip()})" if errors else ""
            _finish(out, JobState.FAILED, {"error": f"{exc}{first}"})
            raise DataError(f"{exc}{first}") from None
        _finish(out, JobState.COMPLETED, result)
        return result


def _finish(out: Path, state: str, result: dict[str, Any]) -> None:
    record = load_job(out)
    if record is not None:
        record.state, record.result, record.end_time = state, result, time.time()
        record.save()


def launch_settings(config: str | None, overrides: list[str]) -> LaunchConfig:
    """The `launch` section of CONFIG (when given) and `--set launch.…` overrides; a training
    config's other sections are not read, so any config of the project will do."""
    tree = {"launch": (read_yaml(config) if config else {}).get("launch") or {}}
    apply_overrides(tree, overrides, only="launch")
    return build_section(LaunchConfig, tree["launch"], "launch", config or "--set")


def run_prepare(
    inputs: list[str],
    out_dir: str,
    *,
    backend: str | None,
    tasks: int | None,
    launch: LaunchConfig,
    workers: int | None,
    command: list[str],
    options: PrepareOptions,
) -> int:
    """Sliced prepare on `backend` (default `launch.backend`); returns the exit code."""
    backend = backend or launch.backend
    if tasks is None:
        tasks = launch.world_size if backend == "slurm" else (os.cpu_count() or 1)
    if tasks < 1:
        raise LaunchError(f"--tasks {tasks}: must be >= 1")
    _refuse_if_running(Path(out_dir))
    if backend == "slurm":
        record = submit_prepare(
            inputs, out_dir, tasks=tasks, launch=launch, command=command, options=options
        )
        print(f"submitted jobs {', '.join(record.job_ids)}: prepare {record.run_dir}")
        print(f"watch it: gptrain status {record.run_dir}")
        return 0
    out = Path(out_dir).resolve()
    # `gptrain cancel` signals the process group only when this process leads it (started from
    # a shell); from a script or make it would reach the script too, so this pid alone.
    record = JobRecord(
        backend="local",
        run_dir=str(out),
        command=command,
        nodes=1,
        nproc_per_node=tasks,
        pid=os.getpid(),
        state=JobState.RUNNING,
        kind="prepare",
        group_leader=os.getpgid(0) == os.getpid(),
    )
    record.save()
    with _TerminateCancels() as term:
        try:
            result = prepare_sliced(inputs, out, options, tasks=tasks, workers=workers)
            term.armed = False  # merged: a late SIGTERM changes nothing
        except BaseException as exc:
            cancelled = term.received or isinstance(exc, KeyboardInterrupt)
            error = "cancelled (SIGTERM)" if term.received else str(exc)
            _finish(out, JobState.CANCELLED if cancelled else JobState.FAILED, {"error": error})
            if term.received:
                print(
                    f"prepare {out}: cancelled; re-run the same command to resume", file=sys.stderr
                )
                return 128 + int(signal.SIGTERM)
            raise
        _finish(out, JobState.COMPLETED, result)
    return 0


class _Terminated(BaseException):
    """SIGTERM (`gptrain cancel`) arrived: unwinds the local prepare like Ctrl-C."""


class _TerminateCancels:
    """While active, SIGTERM raises `_Terminated` once (later ones are noted, not raised, so
    the cleanup runs to its end); the previous handler is restored on exit."""

    def __init__(self) -> None:
        self.received, self.armed = False, True
        self._previous: Any = None
        self._installed = threading.current_thread() is threading.main_thread()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.armed and not self.received:
            self.received = True
            raise _Terminated(f"signal {signum}")

    def __enter__(self) -> _TerminateCancels:
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            previous = self._previous
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _refuse_if_running(out: Path) -> None:
    """Two prepares writing the same slices would clean up each other's temp dirs."""
    record = current_job(out)
    if record is None:
        return
    if (
        record.backend == "local"
        and record.state == JobState.CANCELLED
        and record.result is None
        and time.time() - (record.end_time or 0) < _STOPPING_S
        and record.pid != os.getpid()
        and pid_alive(record.pid)
    ):
        # `gptrain cancel` signalled it; it writes `result` once it has stopped its slices.
        raise LaunchError(
            f"{out}: the cancelled prepare (pid {record.pid}) is still stopping; "
            "try again in a few seconds"
        )
    s = prepare_summary(out, record)
    if JobState(s["state"]).active:
        raise LaunchError(
            f"{out}: a prepare is still {s['state']} ({s['backend']}, {s['job']}); "
            f"wait for it or stop it with gptrain cancel {out}"
        )


def submit_prepare(
    inputs: list[str],
    out_dir: str,
    *,
    tasks: int,
    launch: LaunchConfig,
    command: list[str],
    options: PrepareOptions,
) -> JobRecord:
    """Stage here, then submit the pending slices as an array job and the merge after it."""
    from launcher.slurm import submitit_parameters

    if shutil.which("sbatch") is None:
        raise LaunchError(
            "--backend slurm: sbatch not found; run on a SLURM login node "
            "(or start the local test cluster with slurm/start.sh)"
        )
    import submitit
    from submitit.core.utils import FailedJobError

    plan = stage(inputs, out_dir, tasks, options)
    todo = pending_slices(plan)
    out = Path(plan.out_dir)
    (out / LOG_DIR).mkdir(exist_ok=True)
    for stale in (out / LOG_DIR).glob("slice_*.error"):
        stale.unlink()
    params = submitit_parameters(launch, f"prepare-{out.name}")
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
                jobs = executor.map_array(PrepareSliceTask(str(out), dict(launch.slurm.env)), todo)
                job_ids.append(jobs[0].job_id.split("_")[0])
                extra = {**extra, "dependency": f"afterany:{job_ids[0]}"}
            executor.update_parameters(
                name=f"prepare-{out.name}-merge", slurm_additional_parameters=extra or None
            )
            job_ids.append(executor.submit(PrepareMergeTask(str(out))).job_id)
    except FailedJobError as exc:
        errors = [ln.strip() for ln in str(exc).splitlines() if "error:" in ln]
        raise LaunchError(f"sbatch refused the job: {errors[0] if errors else exc}") from None
    record = JobRecord(
        backend="slurm",
        run_dir=str(out),
        command=command,
        nodes=launch.nodes,
        nproc_per_node=len(todo),
        job_ids=job_ids,
        state=JobState.PENDING,
        kind="prepare",
    )
    record.save()
    return record


def prepare_summary(out_dir: Path, record: JobRecord) -> dict[str, Any]:
    """`gptrain status` of a prepare: state, slices done/total, tokens, tokens/s, error."""
    state = record.state
    if record.backend == "slurm" and state == JobState.PENDING and len(record.job_ids) > 1:
        state = JobState.RUNNING if JobState.RUNNING in sacct_states(record.job_ids[0]) else state
    progress = progress_of(out_dir)
    result = record.result or {}
    if progress is None and "tokens" in result:  # merged: .slices/ is gone
        total = result.get("slices") or record.nproc_per_node
        progress = {
            "slices_done": total,
            "slices_total": total,
            "tokens": result["tokens"],
            "tokens_per_s": result.get("tokens_per_s"),
        }
    progress = progress or {
        "slices_done": 0,
        "slices_total": None,
        "tokens": 0,
        "tokens_per_s": None,
    }
    end = record.end_time or time.time()
    return {
        "run": str(out_dir),
        "kind": "prepare",
        "state": state,
        "backend": record.backend,
        "job": ",".join(record.job_ids) or (f"pid {record.pid}" if record.pid else "-"),
        "slices_done": progress["slices_done"],
        "slices_total": progress["slices_total"],
        "tokens": progress["tokens"],
        "tokens_per_s": progress["tokens_per_s"],
        "elapsed_s": end - record.submit_time,
        "error": result.get("error"),
        # the keys of a training run's summary, for `gptrain status` listings
        "step": progress["slices_done"],
        "total_steps": progress["slices_total"],
        "loss": None,
        "requeues": record.requeues,
    }


def format_prepare_summary(s: dict[str, Any]) -> str:
    """The human-readable `gptrain status` of a prepare."""
    from training.observe.logs import hms

    total = "?" if s["slices_total"] is None else s["slices_total"]
    rows = [
        ("prepare", s["run"]),
        ("state", f"{s['state']} ({s['backend']}, {s['job']})"),
        ("slices", f"{s['slices_done']} / {total} done"),
        ("tokens", f"{s['tokens']:,}"),
        ("tokens/s", "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:,.0f}"),
        ("elapsed", hms(s["elapsed_s"])),
    ]
    if s["error"]:
        rows.append(("error", s["error"]))
    return "\n".join(f"{key:<10} {value}" for key, value in rows)
