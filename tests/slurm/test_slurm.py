"""The SLURM backend on a real cluster (2 nodes): run, status, logs, preempt + requeue +
resume, cancel, sbatch errors. Every wait is bounded."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.distributed.conftest import losses, tiny_config
from training.checkpoint import latest_checkpoint, read_meta

pytestmark = pytest.mark.slurm
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED")


def slurm_config(tmp_path: Path, data: Path, tracking: dict | None = None, **train) -> Path:
    return tiny_config(
        tmp_path, data, train={"max_steps": 20, **train},
        launch={"backend": "slurm", "nodes": 2, "nproc_per_node": 1,
                "slurm": {"time_min": 60, "cpus_per_task": 1}},
        tracking=tracking or {},
    )  # fmt: skip


def status(run: Path) -> dict:
    result = run_cli("status", str(run), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(run: Path, done, timeout_s: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = status(run)
        if done(s):
            return s
        time.sleep(1)
    raise AssertionError(f"{what} not reached within {timeout_s}s: {status(run)}")


def launch(config: Path, *args: str) -> str:
    result = run_cli("launch", str(config), *args, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "submitted job" in result.stdout
    return result.stdout.split("submitted job ")[1].split(":")[0]


def test_two_node_job_runs_to_completion(tmp_path: Path, prepared: Path) -> None:
    job_id = launch(slurm_config(tmp_path / "runs", prepared))
    run = tmp_path / "runs" / "run"
    s = wait_for(run, lambda s: s["state"] in FINAL, 240, "job end")
    assert s["state"] == "COMPLETED", s
    assert s["step"] == 20 and s["job"] == job_id
    meta = read_meta(latest_checkpoint(run / "checkpoints"))
    assert meta["world_size"] == 2 and meta["step"] == 20
    logs = run_cli("logs", str(run), "--rank", "1")
    assert logs.returncode == 0 and "rank1" in logs.stdout
    text = run_cli("status", str(run)).stdout
    assert "COMPLETED (slurm" in text and "20 / 20" in text
    by_id = run_cli("status", job_id, cwd=tmp_path)
    assert by_id.returncode == 0 and "20 / 20" in by_id.stdout


def test_preemption_checkpoints_requeues_and_resumes(tmp_path: Path, prepared: Path) -> None:
    import submitit

    offline = {"wandb": {"mode": "offline", "project": "gptrain-test"}}
    job_id = launch(slurm_config(tmp_path, prepared, tracking=offline, max_steps=120,
                                 save_every=1000, eval_every=1000))  # fmt: skip
    run = tmp_path / "run"
    wait_for(run, lambda s: s["step"] >= 10, 240, "step 10")
    submitit.SlurmJob(run / "slurm" / "%j", job_id)._interrupt()  # SIGTERM + SIGUSR2
    s = wait_for(run, lambda s: s["state"] in FINAL, 300, "job end")
    assert s["state"] == "COMPLETED", s
    assert s["requeues"] == 1
    steps = sorted(losses(run))
    assert steps == list(range(1, 121)), "each step once: resumed at the checkpoint"
    log = (run / "logs" / "rank0.log").read_text()
    assert "stopped by signal at step" in log and "resumed from" in log
    run_id = (run / "wandb_run_id").read_text().strip()
    wandb_dirs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(wandb_dirs) == 2, "one W&B run dir per attempt"
    assert all(d.name.endswith(f"-{run_id}") for d in wandb_dirs), "same W&B run after requeue"


def test_cancel_stops_the_job(tmp_path: Path, prepared: Path) -> None:
    launch(slurm_config(tmp_path, prepared, max_steps=100000))
    run = tmp_path / "run"
    wait_for(run, lambda s: s["state"] == "RUNNING" and s["step"] >= 2, 240, "running")
    result = run_cli("cancel", str(run))
    assert result.returncode == 0 and "CANCELLED" in result.stdout
    wait_for(run, lambda s: s["state"] == "CANCELLED", 90, "cancelled")


def test_sbatch_errors_are_one_line(tmp_path: Path, prepared: Path) -> None:
    config = slurm_config(tmp_path, prepared)
    result = run_cli("launch", str(config), "--set", "launch.slurm.partition=nope", env=ENV)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "sbatch refused the job" in result.stderr and "partition" in result.stderr
