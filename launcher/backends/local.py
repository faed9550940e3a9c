"""The local backend: torchrun on this machine, the launcher waiting for it.

    gptrain launch configs/demo-cpu.yaml --backend local --nproc-per-node 2
    gptrain prepare corpus/ --out data/c --train-tokenizer 32000 --tasks 8

The launcher owns the run dir while the ranks run (`training.run.rundir`), hands them its
token (`GPTRAIN_RUN_OWNER`), and turns Ctrl-C or SIGTERM (`gptrain cancel`) into a
checkpoint-then-stop of every rank (exit 76). A failed launch reports the ranks'
recorded failures, first in time first.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from launcher.backends import claim_run_dir
from launcher.config import Config, LaunchConfig, dump_yaml, train_job
from launcher.errors import LaunchError, StatusError
from launcher.jobs import JobRecord, PrepareJob, load_job
from launcher.ranks import EXIT_REQUEUE, EXIT_STOPPED
from sharding.atomic import atomic_write
from training.run import failures, rundir
from training.run.paths import JobState, RunDir

STOP_TIMEOUT_S = 120  # ranks finish the step and save a checkpoint before this


def torchrun_command(launch: LaunchConfig, run_dir: Path) -> list[str]:
    """The single-node torchrun command that runs `gptrain train` on every rank (through
    `launcher.ranks`: torchrun, quiet, ending with the ranks' stop or requeue code)."""
    return [
        sys.executable,
        "-m",
        "launcher.ranks",
        "--run-dir",
        str(run_dir),
        "--standalone",
        f"--nproc-per-node={launch.nproc_per_node}",
        "-m",
        "launcher.cli",
        "train",
        str(RunDir(run_dir).launch_config),
    ]


class LocalBackend:
    name = "local"

    def check(self, launch: LaunchConfig) -> None:
        if launch.nodes != 1:
            raise LaunchError(
                f"launch.nodes: the local backend runs on one node, got {launch.nodes}; "
                "use --backend slurm for several nodes"
            )

    def preview(self, cfg: Config) -> list[str]:
        return ["# command", " ".join(torchrun_command(cfg.launch, Path(cfg.run.dir)))]

    def launch(self, cfg: Config, *, follow: bool) -> int:
        return run_local(cfg)

    def default_tasks(self, launch: LaunchConfig) -> int:
        return os.cpu_count() or 1

    def prepare(self, job: PrepareJob) -> int:
        return prepare_here(job)

    def refresh(self, record: JobRecord) -> JobRecord:
        if record.state == JobState.RUNNING and not rundir.pid_alive(record.pid):
            record.state = JobState.FAILED  # the launcher itself died (e.g. killed); say so
        return record

    def cancel(self, record: JobRecord) -> JobRecord:
        if record.pid is not None:
            _terminate(record)  # raises unless delivered or the process is gone
        current = load_job(record.run_dir)
        if current is not None and not current.state.active:
            return current  # the process wrote its own end meanwhile: keep it
        return (current or record).end(JobState.CANCELLED)

    def job_active(self, job_id: str) -> bool | None:
        return None  # local runs have no job ids: their locks are judged by pid

    def log_files(self, record: JobRecord) -> list[Path]:
        return []  # the ranks' logs are all there is; the launcher prints to the terminal

    def job_of_env(self, environ: Mapping[str, str]) -> str | None:
        return None  # no job ids: the launcher hands its ranks its token


BACKEND = LocalBackend()


def run_local(cfg: Config) -> int:
    """torchrun with `nproc_per_node` ranks. The launcher owns the run dir while it runs;
    Ctrl-C or SIGTERM stops every rank after a checkpoint (exit 76)."""
    from training.checkpoint.resume import preflight as rank_preflight

    run_dir = Path(cfg.run.dir)
    token = f"launch:{socket.gethostname()}:{os.getpid()}"
    rundir.acquire(run_dir, rundir.JobContext(token))  # before any write: a live run is refused
    previous = os.environ.get(rundir.OWNER_ENV)
    os.environ[rundir.OWNER_ENV] = token  # the ranks' checks below and in torchrun: ours
    try:
        rank_preflight(train_job(cfg), cfg.batch_layout())  # the ranks' own checks, no write
        cfg = claim_run_dir(cfg)
        failures.clear(run_dir)
        return _run_torchrun(cfg, run_dir, token)
    finally:
        rundir.release(run_dir, token)
        if previous is None:
            os.environ.pop(rundir.OWNER_ENV, None)


def _run_torchrun(cfg: Config, run_dir: Path, token: str) -> int:
    atomic_write(RunDir(run_dir).launch_config, dump_yaml(cfg))
    command = torchrun_command(cfg.launch, run_dir)
    record = JobRecord(
        backend=BACKEND.name,
        run_dir=str(run_dir),
        command=command,
        nodes=1,
        nproc_per_node=cfg.launch.nproc_per_node,
        group_leader=False,
    )
    # Own session, so a terminal's Ctrl-C reaches only this process; it is relayed (as
    # SIGTERM) through launcher.ranks, which stops the ranks after a checkpoint.
    proc = subprocess.Popen(
        command, start_new_session=True, env={**os.environ, rundir.OWNER_ENV: token}
    )
    record.pid, record.state = proc.pid, JobState.RUNNING
    record.save()
    print(f"launched {run_dir} (local, {cfg.launch.nproc_per_node} ranks, pid {proc.pid})")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        code = _stop(proc)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code == EXIT_REQUEUE and _record_hangs(run_dir, record.submit_time):
        code = 1  # the watchdog's requeue code, but locally nobody requeues: a failure
    final = load_job(run_dir) or record
    final.end(final.state if final.state == JobState.CANCELLED else _final_state(code), code)
    if code not in (0, EXIT_REQUEUE, EXIT_STOPPED):
        raise LaunchError(
            failure_report(run_dir, failures.failures(run_dir, record.submit_time), code)
        )
    if code in (EXIT_REQUEUE, EXIT_STOPPED):
        print(f"stopped {run_dir} after a checkpoint; launch it again to resume")
    return code


def _record_hangs(run_dir: Path, since: float) -> bool:
    """Record each rank's watchdog hang (an event) since `since` as its failure; whether
    there was one."""
    from training.observe.events import read_events

    hangs = [e for e in read_events(run_dir) if e["kind"] == "hang" and e["time"] >= since]
    for event in hangs:
        line = event["message"].split("; stacks")[0]  # the stacks are in the rank's log
        failures.write_failure(run_dir, event["rank"], line, event["time"])
    return bool(hangs)


def failure_report(run_dir: Path, found: list[dict[str, Any]], code: int) -> str:
    """What a failed launch tells the user, from the ranks' recorded failures (first in
    time first): the first error, its ranks and where its log is, then one line for each
    further distinct error (mostly peers that lost the failed rank)."""
    if not found:
        return f"{run_dir}: training failed (exit code {code}); see gptrain logs {run_dir}"
    ranks_of: dict[str, list[int]] = {}
    for entry in found:
        ranks_of.setdefault(entry["error"], []).append(entry["rank"])
    lines: list[str] = []
    for error, ranks in ranks_of.items():
        listed = ", ".join(map(str, sorted(ranks)))
        who = f"rank {listed}" if len(ranks) == 1 else f"ranks {listed}"
        if not lines:
            lines.append(
                f"{run_dir}: training failed ({who}: {error}); "
                f"see gptrain logs {run_dir} --rank {ranks[0]}"
            )
        else:
            lines.append(f"  and {who}: {error}")
    return "\n".join(lines)


def _final_state(code: int) -> JobState:
    return {
        0: JobState.COMPLETED,
        EXIT_STOPPED: JobState.STOPPED,
        EXIT_REQUEUE: JobState.PREEMPTED,
    }.get(code, JobState.FAILED)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop(proc: subprocess.Popen) -> int:
    print("\nstopping: every rank saves a checkpoint first (Ctrl-C again to kill)", flush=True)
    proc.send_signal(signal.SIGTERM)  # launcher.ranks relays it to the ranks
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def _terminate(record: JobRecord) -> None:
    """SIGTERM to a local job's process group when its pid leads one, else to the pid alone
    (killpg of a pid that leads no group would fail and leave the process running)."""
    assert record.pid is not None
    pid = record.pid
    try:
        leader = record.group_leader
        if leader is None:  # a record of `gptrain launch` (own session) or an older one
            leader = os.getpgid(pid) == pid
        if leader:
            os.killpg(pid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # already gone: nothing left to stop
    except PermissionError:
        raise StatusError(
            f"{record.run_dir}: cannot signal pid {pid} (another user's process?)"
        ) from None


# --- sliced prepare, here --------------------------------------------------------------------


def prepare_here(job: PrepareJob) -> int:
    """`sharding.slices.prepare_sliced` in this process, recorded as a local job;
    `gptrain cancel` (SIGTERM) stops it, and the same command resumes it."""
    from launcher.prepare_job import finish_prepare
    from sharding.slices import prepare_sliced

    out = job.out_dir.resolve()
    # `gptrain cancel` signals the process group only when this process leads it (started from
    # a shell); from a script or make it would reach the script too, so this pid alone.
    record = JobRecord(
        backend=BACKEND.name,
        run_dir=str(out),
        command=job.command,
        nodes=1,
        nproc_per_node=job.tasks,
        pid=os.getpid(),
        state=JobState.RUNNING,
        kind="prepare",
        group_leader=os.getpgid(0) == os.getpid(),
    )
    record.save()
    with _TerminateCancels() as term:
        try:
            result = prepare_sliced(
                job.inputs, out, job.options, tasks=job.tasks, workers=job.workers
            )
            term.armed = False  # merged: a late SIGTERM changes nothing
        except BaseException as exc:
            cancelled = term.received or isinstance(exc, KeyboardInterrupt)
            error = "cancelled (SIGTERM)" if term.received else str(exc)
            state = JobState.CANCELLED if cancelled else JobState.FAILED
            finish_prepare(out, state, {"error": error})
            if term.received:
                print(
                    f"prepare {out}: cancelled; re-run the same command to resume", file=sys.stderr
                )
                return 128 + int(signal.SIGTERM)
            raise
        finish_prepare(out, JobState.COMPLETED, result)
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
