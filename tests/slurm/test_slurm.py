"""The SLURM backend on a real cluster (2 nodes): run, status, logs, preempt + requeue +
resume, cancel, sbatch errors. Every wait is bounded."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from launcher.backends.slurm import sbatch_flags
from tests.conftest import run_cli
from tests.distributed.conftest import losses, tiny_config
from training.checkpoint.store import latest_checkpoint, read_meta

pytestmark = pytest.mark.slurm
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED")


def slurm_config(tmp_path: Path, data: Path, tracking: dict | None = None, **train) -> Path:
    return tiny_config(
        tmp_path,
        data,
        train={"max_steps": 20, **train},
        launch={
            "backend": "slurm",
            "nodes": 2,
            "nproc_per_node": 1,
            "slurm": {"time_min": 60, "cpus_per_task": 1},
        },
        tracking=tracking or {},
    )


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


def scontrol_job(job_id: str) -> dict[str, str]:
    """What the controller holds for the job (`scontrol show job`), as KEY: value."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def submitit_logs(run: Path) -> dict[str, str]:
    """The job's task logs that submitit keeps (RUN_DIR/slurm/JOB_ID/*.out|err)."""
    return {str(p): p.read_text() for p in sorted((run / "slurm").glob("*/*_log.*"))}


def test_two_node_job_runs_to_completion(tmp_path: Path, prepared: Path) -> None:
    job_id = launch(
        slurm_config(tmp_path / "runs", prepared),
        "--set",
        "launch.slurm.sbatch_extra={comment: gptrain-test}",
    )
    run = tmp_path / "runs" / "run"
    sent = scontrol_job(job_id)  # the parameters Slurm got are the config's
    assert sent["NumNodes"].split("-")[0] == "2" and sent["NumTasks"] == "2", sent
    assert sent["TimeLimit"] == "01:00:00" and sent["JobName"] == "run", sent
    assert sent["Comment"] == "gptrain-test", sent
    script = (run / "slurm" / job_id / f"{job_id}_submission.sh").read_text()
    record = json.loads((run / "job.json").read_text())
    assert record["command"] == ["sbatch", *sbatch_flags(script)]  # job.json: what was sent
    assert "--comment=gptrain-test" in record["command"]
    s = wait_for(run, lambda s: s["state"] in FINAL, 240, "job end")
    assert s["state"] == "COMPLETED", s
    assert s["step"] == 20 and s["job"] == job_id
    meta = read_meta(latest_checkpoint(run / "checkpoints"))
    assert meta.world_size == 2 and meta.step == 20
    logs = run_cli("logs", str(run), "--rank", "1")
    assert logs.returncode == 0 and "rank1" in logs.stdout
    text = run_cli("status", str(run)).stdout
    assert "COMPLETED (slurm" in text and "20 / 20" in text
    by_id = run_cli("status", job_id, cwd=tmp_path)
    assert by_id.returncode == 0 and "20 / 20" in by_id.stdout


def test_preemption_checkpoints_requeues_and_resumes(tmp_path: Path, prepared: Path) -> None:
    offline = {"wandb": {"mode": "offline", "project": "gptrain-test"}}
    job_id = launch(
        slurm_config(
            tmp_path, prepared, tracking=offline, max_steps=120, save_every=1000, eval_every=1000
        )
    )
    run = tmp_path / "run"
    wait_for(run, lambda s: s["step"] >= 10, 240, "step 10")
    # A preemption notice: SIGUSR2, then SIGTERM (submitit's `_interrupt()` sends them the
    # other way round, and ranks that agree on the SIGTERM's stop before the SIGUSR2
    # arrives stop instead of requeueing: a race of a few ms on this tiny model).
    for signal in ("USR2", "TERM"):
        subprocess.run(["scancel", "--signal", signal, job_id], check=True, timeout=30)
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


def test_preemption_past_max_requeues_ends_in_one_line(tmp_path: Path, prepared: Path) -> None:
    import submitit

    job_id = launch(
        slurm_config(tmp_path, prepared, max_steps=100000, save_every=1000, eval_every=1000),
        "--set",
        "launch.max_requeues=0",
    )
    run = tmp_path / "run"
    wait_for(run, lambda s: s["state"] == "RUNNING" and s["step"] >= 3, 240, "step 3")
    submitit.SlurmJob(run / "slurm" / "%j", job_id)._interrupt(timeout=True)  # SIGUSR2 only
    s = wait_for(run, lambda s: s["state"] in FINAL, 120, "job end")
    record = json.loads((run / "job.json").read_text())
    assert (s["state"], record["exit_code"], record["requeues"]) == ("PREEMPTED", 75, 0), s
    assert latest_checkpoint(run / "checkpoints") is not None
    logs = submitit_logs(run)
    assert not [p for p, text in logs.items() if "Traceback" in text], logs
    said = [ln for t in logs.values() for ln in t.splitlines() if "launch.max_requeues" in ln]
    assert said == [
        "preempted after 0 requeues (launch.max_requeues); launch again to resume "
        f"from the last checkpoint in {run}"
    ], said


def test_cancel_stops_the_job_after_a_checkpoint_without_a_traceback(
    tmp_path: Path, prepared: Path
) -> None:
    launch(slurm_config(tmp_path, prepared, max_steps=100000, save_every=5, eval_every=1000))
    run = tmp_path / "run"
    wait_for(run, lambda s: latest_checkpoint(run / "checkpoints") is not None, 240, "checkpoint")
    result = run_cli("cancel", str(run))
    assert result.returncode == 0 and "CANCELLED" in result.stdout
    wait_for(run, lambda s: s["state"] == "CANCELLED", 90, "cancelled")
    deadline = time.monotonic() + 60  # rank 0 records the stop after its last checkpoint
    while json.loads((run / "job.json").read_text())["exit_code"] is None:
        assert time.monotonic() < deadline, "rank 0 never recorded the stop"
        time.sleep(1)
    record = json.loads((run / "job.json").read_text())
    assert (record["state"], record["exit_code"]) == ("CANCELLED", 76)
    assert status(run)["state"] == "CANCELLED" and status(run)["error"] is None
    final = latest_checkpoint(run / "checkpoints")
    assert final is not None and read_meta(final).step >= 5
    assert "stopped by signal at step" in (run / "logs" / "rank0.log").read_text()
    logs = submitit_logs(run)
    assert logs and not [p for p, text in logs.items() if "Traceback" in text], logs
    assert any("training cancelled; launch again to resume" in t for t in logs.values()), logs


def test_sbatch_errors_are_one_line(tmp_path: Path, prepared: Path) -> None:
    config = slurm_config(tmp_path, prepared)
    result = run_cli("launch", str(config), "--set", "launch.slurm.partition=nope", env=ENV)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "sbatch refused the job" in result.stderr and "partition" in result.stderr
