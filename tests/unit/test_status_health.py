"""`gptrain status` health, from fabricated run files: per-rank heartbeat age, step and
phase, a stalled and a straggling rank flagged, the health counts, and SLURM states."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from launcher import status
from launcher.backends import slurm
from launcher.jobs import JobRecord
from training.run.paths import JobState


def write_run(run: Path, beats: list[dict], state: str = "RUNNING", ranks: int = 3) -> None:
    JobRecord(
        backend="local",
        run_dir=str(run),
        command=[],
        nodes=1,
        nproc_per_node=ranks,
        pid=os.getpid(),
        state=state,
    ).save()
    (run / "launch").mkdir()
    launched = "train:\n  hang_timeout_s: 30\n  micro_batch_size: 1\n"
    (run / "launch" / "config.yaml").write_text(launched)
    record = {
        "step": 10,
        "total_steps": 20,
        "tokens": 1000,
        "loss": 2.5,
        "step_time_s": 0.5,
        "tokens_per_s": 100.0,
        "skipped_steps": 2,
        "loss_spikes": 1,
        "rollbacks": 0,
    }
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (run / "heartbeat").mkdir()
    for beat in beats:
        (run / "heartbeat" / f"rank{beat['rank']}.json").write_text(json.dumps(beat))


def beat(rank: int, age_s: float, busy_s: float, phase: str = "step", step: int = 11) -> dict:
    return {
        "rank": rank,
        "step": step,
        "phase": phase,
        "time": time.time() - age_s,
        "pid": 1,
        "busy_s": busy_s,
    }


def test_status_names_the_stalled_and_the_straggling_rank(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(
        run, [beat(0, 1, 0.10), beat(1, 2, 0.35), beat(2, 95, 0.12, step=9), beat(3, 1, 9.0)]
    )  # rank 3: a heartbeat of an earlier, larger world
    s = status.summary(run)
    assert s["health"] == {"skipped_steps": 2, "loss_spikes": 1, "rollbacks": 0}
    ranks = {r["rank"]: r for r in s["ranks"]}
    assert sorted(ranks) == [0, 1, 2]
    assert [r for r in ranks if ranks[r]["stalled"]] == [2]
    assert [r for r in ranks if ranks[r]["straggler"]] == [1]
    assert ranks[1]["straggler"] == pytest.approx(0.35 / 0.11, rel=1e-3)
    text = status.format_summary(s).splitlines()
    assert "health     skipped steps 2, loss spikes 1, rollbacks 0" in text
    assert text[text.index("health     skipped steps 2, loss spikes 1, rollbacks 0") + 1] == (
        "ranks      rank 0: step 11 (step), heartbeat 1 s ago"
    )
    assert (
        "           rank 1: step 11 (step), heartbeat 2 s ago — STRAGGLER (busy 3.2× the "
        "other ranks' median)" in text
    )
    assert (
        "           rank 2: step 9 (step), heartbeat 95 s ago — STALLED (no heartbeat for "
        "over train.hang_timeout_s)" in text
    )


def test_old_heartbeats_are_not_a_stall_when_the_run_is_over_or_saving(tmp_path: Path) -> None:
    over = tmp_path / "over"
    write_run(
        over,
        [beat(0, 500, 0.1, phase="done"), beat(1, 500, 0.1, phase="done")],
        state="COMPLETED",
        ranks=2,
    )
    assert not any(r["stalled"] for r in status.summary(over)["ranks"])
    saving = tmp_path / "saving"
    write_run(saving, [beat(0, 500, 0.1, phase="save"), beat(1, 500, 0.1)], ranks=2)
    assert [r["stalled"] for r in status.summary(saving)["ranks"]] == [False, True]


def test_many_ranks_are_summed_up_with_the_flagged_ones_listed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, [beat(r, 1, 0.9 if r == 5 else 0.1) for r in range(16)], ranks=16)
    lines = status.rank_lines(status.summary(run)["ranks"])
    assert lines[0] == "16 ranks at step 11, heartbeats 1 s old; 1 flagged"
    assert len(lines) == 2 and lines[1].startswith("rank 5: ") and "STRAGGLER" in lines[1]


def test_slurm_state_is_accountings_unless_the_run_recorded_its_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def record(state: str) -> None:
        JobRecord(
            backend="slurm",
            run_dir=str(tmp_path),
            command=[],
            nodes=1,
            nproc_per_node=1,
            job_ids=["7"],
            state=state,
        ).save()

    for recorded, sacct, shown in (
        ("STOPPED", "COMPLETED", "STOPPED"),
        ("RUNNING", "CANCELLED", "CANCELLED"),
        ("REQUEUED", "RUNNING", "RUNNING"),
        ("RUNNING", None, "RUNNING"),
        ("RUNNING", "COMPLETED", "COMPLETED"),
    ):
        record(recorded)
        monkeypatch.setattr(slurm, "sacct_state", lambda job_id, s=sacct: JobState.parse(s or ""))
        assert status.summary(tmp_path)["state"] == shown, (recorded, sacct)


def test_status_shows_the_last_checkpoint_and_a_write_in_flight(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, [beat(0, 1, 0.1)], ranks=1)
    assert status.format_checkpoint(status.summary(run)["checkpoint"]) == "none yet"
    root = run / "checkpoints"
    (root / "step_000008").mkdir(parents=True)
    (root / "step_000008" / "meta.json").write_text("{}")
    (root / "latest").write_text("step_000008")
    (root / ".tmp_step_000012").mkdir()  # being written in the background
    saved = {"step": 9, "checkpoint_step": 8, "checkpoint_s": 9.1, "checkpoint_stall_s": 0.3}
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**saved, "checkpoint_gb": 1.2}) + "\n")
    line = status.format_checkpoint(status.summary(run)["checkpoint"])
    assert line.startswith("step 8 (") and line.endswith(
        "ago; 1.20 GB; last save 9.1 s, the loop waited 0.3 s); writing step 12"
    )
    assert f"checkpoint {line}" in status.format_summary(status.summary(run)).splitlines()
    write_run(tmp_path / "done", [beat(0, 1, 0.1)], state="COMPLETED", ranks=1)
    (tmp_path / "done" / "checkpoints" / ".tmp_step_000004").mkdir(parents=True)
    assert status.summary(tmp_path / "done")["checkpoint"]["writing_step"] is None
