"""The launcher backends: one interface, one registry that the config, the CLI and the
dispatchers agree on, and the parts of the local backend that need no torchrun."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from launcher import backends
from launcher.config import LaunchConfig
from launcher.errors import LaunchError
from launcher.jobs import JobRecord, load_job
from training.run import rundir
from training.run.paths import JobState, RunDir


def test_every_backend_implements_the_interface_and_the_lists_agree() -> None:
    assert typing.get_args(typing.get_type_hints(LaunchConfig)["backend"]) == backends.NAMES
    wanted = {
        name
        for name, member in vars(backends.Backend).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }
    for name in backends.NAMES:
        impl = backends.backend(name)
        assert impl.name == name
        for method in wanted:
            ours = inspect.signature(getattr(backends.Backend, method))
            theirs = inspect.signature(getattr(type(impl), method))
            assert list(ours.parameters) == list(theirs.parameters), (name, method)
    with pytest.raises(LaunchError, match="launch.backend: 'k8s' is not one of local, slurm"):
        backends.backend("k8s")


def test_a_lock_names_its_job_and_is_judged_by_its_backend(monkeypatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(
        backends.backend("slurm"), "job_active", lambda job_id: asked.append(job_id) or False
    )
    assert backends.job_token("slurm", "42") == "slurm:42"
    assert backends.job_active("slurm:42") is False
    assert backends.job_active("17") is False  # a lock from before locks named the backend
    assert backends.job_active("local:1") is None  # local locks are judged by their pid
    assert backends.job_active("nobody:1") is None
    assert asked == ["42", "17"]
    lock = {"token": "slurm:42", "host": "elsewhere", "pid": 1, "job_id": "slurm:42"}
    assert not rundir.is_live(lock, backends.job_active)  # its job is over: stale
    assert rundir.is_live(lock)  # another host and no one to ask: assume it runs


def test_a_rank_in_a_scheduler_job_owns_the_run_dir_by_the_job() -> None:
    """`gptrain train` started by srun (no launcher): every task and every requeue of
    the job shares one token; under `gptrain launch`, the launcher's token wins."""
    environ = {"SLURM_JOB_ID": "5", "TORCHELASTIC_RUN_ID": "x"}
    context = backends.rank_context(environ)
    assert (context.token, context.job) == ("slurm:5", "slurm:5")
    assert not context.launcher_holds_lock and context.job_active is backends.job_active
    launched = backends.rank_context({**environ, rundir.OWNER_ENV: "launch:h:1"})
    assert (launched.token, launched.launcher_holds_lock) == ("launch:h:1", True)
    assert backends.rank_context({"TORCHELASTIC_RUN_ID": "x"}).token.endswith(":x")


def _record(tmp_path: Path, **fields) -> JobRecord:
    record = JobRecord(
        backend="local", run_dir=str(tmp_path), command=["x"], nodes=1, nproc_per_node=1, **fields
    )
    record.save()
    return record


def test_local_backend_says_a_dead_launcher_failed_and_cancels_a_live_one(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _record(tmp_path, pid=dead.pid, state=JobState.RUNNING)
    assert backends.current_job(tmp_path).state == JobState.FAILED
    assert load_job(tmp_path).state == JobState.RUNNING  # refreshed, not saved

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    record = _record(tmp_path, pid=sleeper.pid, state=JobState.RUNNING, group_leader=False)
    try:
        ended = backends.backend("local").cancel(record)
        assert sleeper.wait(timeout=30) != 0  # SIGTERM reached it
    finally:
        if sleeper.poll() is None:
            os.kill(sleeper.pid, 9)
    assert ended.state == JobState.CANCELLED and ended.end_time is not None
    assert load_job(tmp_path).state == JobState.CANCELLED


def test_job_state_is_one_enum_read_back_from_json(tmp_path: Path) -> None:
    _record(tmp_path, state=JobState.PREEMPTED)
    assert '"state": "PREEMPTED"' in RunDir(tmp_path).job_file.read_text()
    record = load_job(tmp_path)
    assert record.state is JobState.PREEMPTED and not record.state.active
    assert JobState.parse("CANCELLED") is JobState.CANCELLED and JobState.parse("x") is None
    assert [s for s in JobState if s.active] == [
        JobState.PENDING,
        JobState.RUNNING,
        JobState.REQUEUED,
    ]
