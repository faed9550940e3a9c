"""`gptrain launch --backend local` (torchrun, 2 CPU ranks), status, logs and cancel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.distributed.conftest import metrics, tiny_config
from training.checkpoint import latest_checkpoint, read_meta

pytestmark = pytest.mark.dist


def test_local_launch_trains_checkpoints_and_reports(tmp_path: Path, prepared: Path) -> None:
    config = tiny_config(tmp_path / "runs", prepared, "demo", train={"max_steps": 6})
    result = run_cli("launch", str(config), "--backend", "local", "--nproc-per-node", "2",
                     cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})  # fmt: skip
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
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "launch", str(config)], cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not any("loss" in r and r["step"] >= 3 for r in metrics(run)):
            assert time.monotonic() < deadline and launcher.poll() is None, "never trained"
            time.sleep(0.5)
        status = run_cli("status", str(run))
        assert "RUNNING" in status.stdout
        cancelled = run_cli("cancel", str(run))
        assert cancelled.returncode == 0 and "CANCELLED" in cancelled.stdout
        out, err = launcher.communicate(timeout=150)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 76, err[-3000:]  # a stop, not a failure
    assert "Traceback" not in out + err
    assert "CANCELLED" in run_cli("status", str(run)).stdout
    saved = latest_checkpoint(run / "checkpoints")
    assert saved is not None and 3 <= read_meta(saved)["step"] < 100000
