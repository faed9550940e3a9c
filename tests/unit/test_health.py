"""Run health, pure parts: bad-step counting and spikes, the fp32 guard, heartbeats, and a
watchdog that really fires in a child process (stacks in the log, the requeue code)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from tests.conftest import ROOT
from training.errors import EXIT_REQUEUE
from training.observe.health import (
    Heartbeat,
    StepHealth,
    guarded_adamw,
    read_heartbeats,
    stragglers,
)


def test_bad_steps_act_after_max_in_a_row_and_reset_on_a_good_step() -> None:
    health = StepHealth(max_bad_steps=3)
    assert not health.record(applied=True, loss=2.0).bad
    assert [health.record(applied=False).act for _ in range(2)] == [False, False]
    assert not health.healthy
    assert not health.record(applied=True, loss=2.0).bad and health.healthy  # streak broken
    verdicts = [health.record(applied=False) for _ in range(3)]
    assert [v.act for v in verdicts] == [False, False, True]
    assert verdicts[-1].reason == "non-finite loss or gradient norm"
    health.rolled_back()
    assert health.healthy and health.counts() == {
        "skipped_steps": 5,
        "loss_spikes": 0,
        "rollbacks": 1,
    }
    restored = StepHealth(3)
    restored.load_state_dict(health.state_dict())
    assert restored.counts() == health.counts()


def test_spike_rule_against_the_running_mean() -> None:
    health = StepHealth(max_bad_steps=2, spike_factor=3.0)
    assert not health.is_spike(100.0)  # too few good steps to judge
    for loss in (2.0, 2.2, 1.8, 2.0, 2.0):
        health.record(applied=True, loss=loss)
    assert not health.is_spike(5.9) and health.is_spike(6.1) and health.is_spike(math.nan)
    assert health.record(applied=False, spike=True).reason == "loss spike"
    assert health.spikes == 1
    assert StepHealth(2).is_spike(math.inf) and not StepHealth(2).is_spike(1e9)  # no rule


def test_guarded_adamw_skips_non_finite_gradients() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    opt = guarded_adamw([{"params": [weight]}], lr=0.1)
    weight.grad = torch.tensor([1.0, math.nan, 1.0])
    opt.step()
    assert opt.overflow and torch.equal(weight.detach(), torch.ones(3)) and weight.grad is None
    weight.grad = torch.ones(3)
    opt.step()
    assert not opt.overflow and bool((weight.detach() < 1).all())


def test_heartbeats_are_written_and_read_per_rank(tmp_path: Path) -> None:
    for rank in (1, 0):
        hb = Heartbeat(tmp_path, rank)
        hb.record_busy(0.5)
        hb.beat(7 + rank, "step")
    beats = read_heartbeats(tmp_path)
    assert [(b["rank"], b["step"], b["phase"]) for b in beats] == [(0, 7, "step"), (1, 8, "step")]
    assert time.time() - beats[0]["time"] < 60 and beats[0]["busy_s"] == 0.5


def test_stragglers_against_the_other_ranks_median() -> None:
    beats = [{"rank": r, "busy_s": s} for r, s in enumerate([0.1, 0.11, 0.4, 0.09, None])]
    assert [r for r, _ in stragglers(beats)] == [2]
    assert stragglers(beats[:2]) == [] and stragglers(beats[:1]) == []
    pair = [{"rank": 0, "busy_s": 0.05}, {"rank": 1, "busy_s": 0.35}]
    assert [r for r, _ in stragglers(pair)] == [1]


def test_watchdog_dumps_stacks_and_exits_to_requeue(tmp_path: Path) -> None:
    log_path = tmp_path / "rank0.log"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from training.observe.health import Heartbeat, Watchdog
        hb = Heartbeat(Path({str(tmp_path)!r}), 0)
        hb.beat(3, "step")
        Watchdog(hb, 1.0, Path({str(log_path)!r}), {EXIT_REQUEUE}).start()
        def stuck_in_a_collective():
            time.sleep(60)
        stuck_in_a_collective()
    """)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, timeout=50, capture_output=True, text=True
    )
    assert proc.returncode == EXIT_REQUEUE, proc.stderr
    assert time.monotonic() - start < 20
    text = log_path.read_text()
    assert "stacks of rank 0" in text and "stuck_in_a_collective" in text


def test_watchdog_stays_quiet_in_unarmed_phases(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from training.observe.health import Heartbeat, Watchdog
        hb = Heartbeat(Path({str(tmp_path)!r}), 0)
        hb.beat(3, "save")
        Watchdog(hb, 0.5, Path({str(tmp_path / "log")!r}), 75).start()
        time.sleep(2.5)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=50)
    assert proc.returncode == 0


def test_fault_hooks_live_in_one_module_and_the_readme_lists_them() -> None:
    from sharding import faults

    hooks = {v for k, v in vars(faults).items() if k.isupper() and v.startswith("GPTRAIN_FAULT_")}
    assert len(hooks) >= 4
    readme = (ROOT / "README.md").read_text()
    assert not [h for h in sorted(hooks) if f"`{h}`" not in readme], "README's fault-hook list"
    elsewhere = [
        str(path.relative_to(ROOT))
        for package in ("launcher", "training", "sharding")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "faults.py" and "GPTRAIN_FAULT_" in path.read_text()
    ]
    assert elsewhere == [], "fault hooks are read only through sharding.faults"


def test_an_error_after_a_declared_hang_leaves_with_the_hang_code(tmp_path: Path) -> None:
    """A peer that leaves first breaks this rank's collective; the error that raises in
    the main thread must not replace the hang as this rank's exit (and cause)."""
    script = f"""
from pathlib import Path
from training.observe.health import Heartbeat, Watchdog
beat = Heartbeat(Path({str(tmp_path)!r}), 0)
beat.beat(1, "step")
dog = Watchdog(beat, 0.5, Path({str(tmp_path / "rank0.log")!r}), 75)
dog.start()
assert dog.fired.wait(30)
try:
    raise RuntimeError("Connection closed by peer")  # what the peer's exit does
except RuntimeError:
    dog.exit_with_hang()
raise SystemExit(1)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 75, result.stderr
    assert "stacks of rank 0" in (tmp_path / "rank0.log").read_text()
