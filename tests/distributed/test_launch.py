"""`gptrain launch --backend local` (torchrun, 2 CPU ranks), status, logs, cancel, and what
a launch whose ranks fail prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.distributed.conftest import launched, tiny_config
from training.checkpoint.store import latest_checkpoint, read_meta

pytestmark = pytest.mark.dist


def test_local_launch_trains_checkpoints_and_reports(tmp_path: Path, prepared: Path) -> None:
    config = tiny_config(tmp_path / "runs", prepared, "demo", train={"max_steps": 6})
    result = run_cli(
        "launch",
        str(config),
        "--backend",
        "local",
        "--nproc-per-node",
        "2",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "demo"
    assert latest_checkpoint(run / "checkpoints").name == "step_000006"
    job = json.loads((run / "job.json").read_text())
    assert job["state"] == "COMPLETED" and job["backend"] == "local" and job["exit_code"] == 0
    status = run_cli("status", str(run), cwd=tmp_path)
    assert status.returncode == 0
    assert "COMPLETED (local" in status.stdout and "6 / 6" in status.stdout
    listing = run_cli("status", cwd=tmp_path)
    assert "runs/demo" in listing.stdout and "COMPLETED" in listing.stdout
    logs = run_cli("logs", str(run), "--rank", "1", cwd=tmp_path)
    assert logs.returncode == 0 and "rank1" in logs.stdout
    missing = run_cli("logs", str(run), "--rank", "7", cwd=tmp_path)
    assert missing.returncode == 2 and "rank0.log, rank1.log" in missing.stderr


def test_cancel_stops_every_rank_after_a_checkpoint(tmp_path: Path, prepared: Path) -> None:
    config = tiny_config(tmp_path, prepared, train={"max_steps": 100000, "save_every": 100000})
    run = tmp_path / "run"
    with launched(config, at_step=3) as launcher:
        status = run_cli("status", str(run))
        assert "RUNNING" in status.stdout
        cancelled = run_cli("cancel", str(run))
        assert cancelled.returncode == 0 and "CANCELLED" in cancelled.stdout
        out, err = launcher.communicate(timeout=150)
    assert launcher.returncode == 76, err[-3000:]  # a stop, not a failure
    assert "Traceback" not in out + err
    assert "CANCELLED" in run_cli("status", str(run)).stdout
    saved = latest_checkpoint(run / "checkpoints")
    assert saved is not None and 3 <= read_meta(saved).step < 100000


def test_failed_ranks_are_one_line_with_a_log_pointer(tmp_path: Path, prepared: Path) -> None:
    """Ranks that fail at runtime (what no preflight can see: the loss turns NaN and
    train.on_bad_steps is stop): one line per distinct error, where the log is, no
    traceback."""
    config = tiny_config(
        tmp_path, prepared, train={"max_steps": 6, "max_bad_steps": 2, "on_bad_steps": "stop"}
    )
    result = run_cli(
        "launch",
        str(config),
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1", "GPTRAIN_FAULT_NAN_AT_STEPS": "0:2-3"},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    run = tmp_path / "run"
    assert len(lines) == 1, result.stderr[-3000:]  # both ranks: the same error, said once
    assert lines[0].startswith(f"gptrain launch: error: {run}: training failed (ranks 0, 1: ")
    assert "step 3: 2 bad steps in a row" in lines[0]
    first = lines[0].rsplit(" ", 1)[1]  # the rank that failed first
    assert lines[0].endswith(f"see gptrain logs {run} --rank {first}") and first in ("0", "1")
    assert "Traceback" in (run / "logs" / f"rank{first}.log").read_text()  # kept for the user
    assert json.loads((run / "job.json").read_text())["state"] == "FAILED"
