"""Checkpoints written in the background (`train.async_save`, the default) on 2 CPU ranks:
training goes on while a write is in flight, a resume is exact, a kill mid-write loses
only that write, a stop waits for it, and a stop with too little time drops it cleanly.
The writer is slowed by a test hook (GPTRAIN_FAULT_SLOW_WRITE) so writes overlap steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sharding import faults
from tests.distributed.conftest import check, losses, metrics, tiny_config, torchrun
from training.checkpoint.store import latest_checkpoint, list_checkpoints, temp_dirs
from training.run.rundir import STOP_BUDGET_ENV

pytestmark = pytest.mark.dist


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _output(result) -> str:  # noqa: ANN001 (a CompletedProcess)
    return result.stdout + result.stderr


@pytest.mark.parametrize("stage", [2, 3])
def test_async_saves_overlap_training_and_resume_exactly(
    tmp_path: Path, prepared: Path, stage: int
) -> None:
    """Saves every 3 steps written while training goes on; SIGTERM at step 8 waits for the
    write in flight, saves step 8 and stops; the resumed run's losses are the
    uninterrupted (blocking-save) run's at every step. The copy to host memory is slowed
    too, so it overlaps the next step's forward and backward: checkpoint 6, resumed on
    its own, holds the state after step 6 (the optimizer step waited for the copy)."""
    zero = {"zero_stage": stage}
    full = tiny_config(
        tmp_path, prepared, "full", train={"max_steps": 12, "async_save": False}, deepspeed=zero
    )
    check(torchrun(2, full))
    split = tiny_config(tmp_path, prepared, "split", train={"max_steps": 12, "save_every": 3})
    split_sets = (f"deepspeed.zero_stage={stage}",)
    env = {
        faults.SLOW_WRITE: "*:0.5",
        faults.SLOW_COPY: "*:0.3",
        faults.SIGNAL_AT_STEP: "1:8:TERM",
    }
    stopped = torchrun(2, split, *split_sets, env=env)
    assert stopped.returncode != 0 and "stopped by signal at step 8; checkpoint saved" in _output(
        stopped
    )
    run = tmp_path / "split"
    saved = [r for r in metrics(run) if "checkpoint_step" in r]
    assert [r["checkpoint_step"] for r in saved] == [3, 6, 8]
    assert any(r["step"] > r["checkpoint_step"] for r in saved), "no step overlapped a write"
    assert all(0 < r["checkpoint_stall_s"] < r["checkpoint_s"] for r in saved[:-1])
    assert all(r["checkpoint_gb"] > 0 for r in saved)
    assert latest_checkpoint(run / "checkpoints").name == "step_000008"
    assert temp_dirs(run / "checkpoints") == []
    six = tiny_config(tmp_path, prepared, "six", train={"max_steps": 12})
    (tmp_path / "six" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        run / "checkpoints" / "step_000006", tmp_path / "six" / "checkpoints" / "step_000006"
    )
    check(torchrun(2, split, *split_sets))
    a, b = losses(tmp_path / "full"), losses(run)
    assert sorted(b) == list(range(1, 13)), "each step logged exactly once"
    for step in range(1, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-4), f"step {step}"
    check(torchrun(2, six, *split_sets))
    c = losses(tmp_path / "six")
    assert sorted(c) == list(range(7, 13))
    for step in range(7, 13):
        assert c[step] == pytest.approx(a[step], rel=1e-4, abs=1e-4), f"step {step}"


def test_kill_9_during_a_background_write_resumes_from_the_previous_checkpoint(
    tmp_path: Path, prepared: Path
) -> None:
    """Rank 1 is killed at step 9 while checkpoint 8 is being written: with keep_last 1
    the previous checkpoint is still there (pruning waits for the new one), the
    half-written dir is never chosen, and the next launch removes it and finishes."""
    config = tiny_config(
        tmp_path, prepared, train={"max_steps": 12, "save_every": 4, "keep_last": 1}
    )
    env = {faults.SLOW_WRITE: "*:2", faults.SIGNAL_AT_STEP: "1:9:KILL"}
    crashed = torchrun(2, config, env=env)
    assert crashed.returncode != 0
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in temp_dirs(root)] == [".tmp_step_000008"], "no write in flight"
    assert [p.name for p in list_checkpoints(root)] == ["step_000004"]
    result = torchrun(2, config)
    check(result)
    assert "removed .tmp_step_000008" in _output(result)
    assert "resumed from" in _output(result) and "step_000004" in _output(result)
    assert sorted(losses(tmp_path / "run")) == list(range(1, 13))
    # keep_last 1: the newest, and the best eval loss's as it stood when the newest was
    # published (evals at steps 10 and 12)
    kept = [p.name for p in list_checkpoints(root)]
    assert kept[-1] == "step_000012" and len(kept) <= 2
    assert (root / "best").read_text() in kept
    assert temp_dirs(root) == []


def test_a_stop_with_too_little_time_left_drops_the_write_cleanly(
    tmp_path: Path, prepared: Path
) -> None:
    """A stop whose job is killed 2 s later (GPTRAIN_STOP_BUDGET_S, what the SLURM
    backend sets from its signal lead) while a write needs ~15 s: the write is dropped,
    its temp dir removed, the events file says so, and the run stops."""
    config = tiny_config(tmp_path, prepared, train={"max_steps": 12, "save_every": 4})
    env = {faults.SLOW_WRITE: "*:5", faults.SIGNAL_AT_STEP: "1:5:TERM", STOP_BUDGET_ENV: "2"}
    stopped = torchrun(2, config, env=env)
    assert stopped.returncode != 0
    assert "stopped by signal at step 5; no checkpoint (out of time)" in _output(stopped)
    dropped = [e for e in _events(tmp_path / "run") if e["kind"] == "checkpoint_dropped"]
    assert len(dropped) == 1 and "checkpoint step 4 dropped" in dropped[0]["message"]
    root = tmp_path / "run" / "checkpoints"
    assert list_checkpoints(root) == [] and temp_dirs(root) == []
