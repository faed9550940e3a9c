"""Run health on 2 CPU ranks: NaN steps are skipped and counted, a streak rolls back to the
last checkpoint and the run still lands near an uninjected one; a hung rank is caught by
the watchdog with every rank's stacks in its log."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.distributed.conftest import check, losses, metrics, tiny_config, torchrun
from tests.distributed.wandb_files import alerts
from training.checkpoint.store import latest_checkpoint, read_meta
from training.observe.events import read_events

pytestmark = pytest.mark.dist

STEPS = 24
TRAIN = {"max_steps": STEPS, "save_every": 8, "eval_every": 100}


def test_nan_steps_are_skipped_then_rolled_back(tmp_path: Path, prepared: Path) -> None:
    clean = tiny_config(tmp_path, prepared, "clean", train=TRAIN)
    check(torchrun(2, clean))
    offline = {"wandb": {"mode": "offline", "project": "gptrain-test"}}
    hurt = tiny_config(
        tmp_path, prepared, "hurt", train={**TRAIN, "max_bad_steps": 3}, tracking=offline
    )
    # NaN steps at 5 and 8 (skipped; 8 is not checkpointed), then 18..20: a streak of 3
    # → back to step_000016
    result = torchrun(2, hurt, env={"GPTRAIN_FAULT_NAN_AT_STEPS": "1:5,8,18-20"})
    check(result)
    rows = metrics(tmp_path / "hurt")
    last = [r for r in rows if "skipped_steps" in r][-1]
    assert (last["skipped_steps"], last["rollbacks"]) == (5, 1), last
    assert all("skipped_steps" in r for r in rows if "loss" in r)  # every log line counts
    assert any(r.get("rollback_to_step") == 16 for r in rows)
    log = (tmp_path / "hurt" / "logs" / "rank0.log").read_text()
    assert "step 5 skipped (non-finite loss or gradient norm)" in log
    assert "rolled back to step_000016" in log
    assert "step 8: no checkpoint while steps are bad" in log
    final = latest_checkpoint(tmp_path / "hurt" / "checkpoints")
    assert final is not None and read_meta(final).step == STEPS
    assert read_meta(final).health["rollbacks"] == 1  # counts continue after a resume
    kinds = [e["kind"] for e in read_events(tmp_path / "hurt")]
    assert kinds.count("bad_step") == 5 and kinds[-2:] == ["rollback", "completed"], kinds
    # the same events as W&B alerts (rate-limited: the first of each kind)
    (run_file,) = (tmp_path / "hurt" / "wandb").glob("offline-run-*/run-*.wandb")
    titles = [a["title"] for a in alerts(run_file)]
    assert titles == ["gptrain: bad_step", "gptrain: rollback", "gptrain: completed"], titles
    # 19 updates instead of 24 on a steep curve (6 → 2.6): close, and well trained
    a, b = losses(tmp_path / "clean"), losses(tmp_path / "hurt")
    assert b[STEPS] == pytest.approx(a[STEPS], abs=0.6), (a[STEPS], b[STEPS])
    assert b[STEPS] < a[1] - 2.5

    # on_bad_steps=stop: one line, and no checkpoint is written after the streak began
    stop = tiny_config(
        tmp_path, prepared, "stop", train={**TRAIN, "max_bad_steps": 2, "on_bad_steps": "stop"}
    )
    stopped = torchrun(2, stop, env={"GPTRAIN_FAULT_NAN_AT_STEPS": "0:15-16"})
    assert stopped.returncode != 0
    assert "step 16: 2 bad steps in a row (non-finite loss or gradient norm)" in stopped.stderr
    assert latest_checkpoint(tmp_path / "stop" / "checkpoints").name == "step_000008"
    failure = [e for e in read_events(tmp_path / "stop") if e["kind"] == "failure"]
    assert failure and "2 bad steps in a row" in failure[0]["message"]


def test_a_hung_rank_is_caught_with_every_ranks_stacks(tmp_path: Path, prepared: Path) -> None:
    config = tiny_config(
        tmp_path, prepared, train={**TRAIN, "hang_timeout_s": 5, "collective_timeout_s": 120}
    )
    start = time.monotonic()
    result = run_cli(
        "launch",
        str(config),
        cwd=tmp_path,
        timeout_s=200,
        env={"OMP_NUM_THREADS": "1", "GPTRAIN_FAULT_SLEEP_IN_STEP": "1:6:300"},
    )
    elapsed_s = time.monotonic() - start
    assert elapsed_s < 100, elapsed_s  # not the 300 s sleep, nor the collective timeout
    # locally nobody requeues: the launch fails, naming the hang, and status says FAILED
    assert result.returncode == 2, result.stderr[-3000:]
    assert "training failed (rank" in result.stderr and "made no progress" in result.stderr
    assert "FAILED" in run_cli("status", str(tmp_path / "run")).stdout
    for rank in (0, 1):
        log = (tmp_path / "run" / "logs" / f"rank{rank}.log").read_text()
        assert f"hang: rank {rank} made no progress" in log and "at step 6" in log
        # each rank's stacks show it inside the step (Stepper.run in training/loop/step.py)
        assert f"stacks of rank {rank}" in log and "loop/step.py" in log
    assert "sleep_in_step" in (tmp_path / "run" / "logs" / "rank1.log").read_text()
