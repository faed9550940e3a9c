"""Run health: bad optimizer steps (non-finite or spiking loss) and hung ranks.

Bad steps. A non-finite gradient makes DeepSpeed drop the optimizer step and clear
the gradients (bf16 and ZeRO 1–3 check the global gradient norm; plain stage-0 fp32
uses `GuardedAdamW` below for the same). `StepHealth` counts those skips and, with
`train.spike_factor`, a loss above that factor × the running mean of good steps;
after `train.max_bad_steps` in a row the trainer rolls back to the last checkpoint
(going on with the next data) or stops, as `train.on_bad_steps` says. While the last
step was bad no checkpoint is written, so `latest` never names a diverged state.

Hangs. Every rank writes a heartbeat (`RunDir.heartbeat`: step, phase,
time) at each phase change; a watchdog thread in each rank notices no progress for
`train.hang_timeout_s`, dumps every thread's Python stack into the rank's log and
exits the process with the requeue code, so the launcher backend requeues the job and it resumes
from the last checkpoint. A stuck rank stops its peers too: they wait in the same
collective, make no progress either and fire as well (their stacks show where).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharding.atomic import atomic_write
from training.run.paths import RunDir

log = logging.getLogger("gptrain")
SPIKE_WINDOW_STEPS = 50  # running mean of the last good steps' losses
# Phases long by nature (setup, a first step that compiles, saves, a rollback's checkpoint
# load): not watched; their collectives time out after train.collective_timeout_s instead.
UNARMED_PHASES = ("setup", "warmup", "save", "rollback", "done")
BUSY_EMA = 0.2  # weight of the newest step in a rank's running busy time
STRAGGLER_FACTOR = 1.5  # busy time over this × the other ranks' median: a straggler


@dataclass
class StepVerdict:
    """What `StepHealth.record` decided about one optimizer step."""

    bad: bool
    reason: str = ""
    act: bool = False  # max_bad_steps in a row reached: roll back or stop now


class StepHealth:
    """Counts bad steps (skipped by the optimizer, or loss spikes) and decides when to
    act. Pure: the caller says what happened; no torch, no I/O."""

    def __init__(self, max_bad_steps: int, spike_factor: float | None = None) -> None:
        self.max_bad_steps = max_bad_steps
        self.spike_factor = spike_factor
        self.bad_in_a_row = 0
        self.skipped_steps = 0
        self.spikes = 0
        self.rollbacks = 0
        self.steps_seen = 0  # in this process (the first step may compile: unarmed)
        self._good_losses: list[float] = []

    @property
    def healthy(self) -> bool:
        """The last step was good (or none was bad yet): safe to checkpoint."""
        return self.bad_in_a_row == 0

    def is_spike(self, loss: float) -> bool:
        """Whether `loss` is non-finite or over spike_factor × the running mean."""
        if not math.isfinite(loss):
            return True
        if self.spike_factor is None or len(self._good_losses) < 5:
            return False
        mean = sum(self._good_losses) / len(self._good_losses)
        return loss > self.spike_factor * mean

    def record(
        self, *, applied: bool, spike: bool = False, loss: float | None = None
    ) -> StepVerdict:
        """One optimizer step: `applied` False when the optimizer skipped it, `spike`
        when the loss rule flagged it (and the step was dropped for it)."""
        self.steps_seen += 1
        if applied and not spike:
            self.bad_in_a_row = 0
            if loss is not None and math.isfinite(loss):
                self._good_losses = [*self._good_losses, loss][-SPIKE_WINDOW_STEPS:]
            return StepVerdict(bad=False)
        self.bad_in_a_row += 1
        if spike:
            self.spikes += 1
        self.skipped_steps += 1
        reason = "loss spike" if spike else "non-finite loss or gradient norm"
        return StepVerdict(bad=True, reason=reason, act=self.bad_in_a_row >= self.max_bad_steps)

    def rolled_back(self) -> None:
        self.rollbacks += 1
        self.bad_in_a_row = 0

    def counts(self) -> dict[str, int]:
        """What the metrics carry."""
        return {
            "skipped_steps": self.skipped_steps,
            "loss_spikes": self.spikes,
            "rollbacks": self.rollbacks,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self.counts(), "good_losses": list(self._good_losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.spikes = int(state.get("loss_spikes", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self._good_losses = [float(x) for x in state.get("good_losses", [])]


def guarded_adamw(groups: list[dict[str, Any]], **kwargs: Any) -> Any:
    """torch AdamW that skips a step whose gradients are not all finite (zeroing them)
    and says so in `.overflow`, as DeepSpeed's own optimizers do: DeepSpeed hands a
    plain stage-0 fp32 client optimizer the gradients unchecked. One host sync per
    step, in that configuration only."""
    import torch

    class GuardedAdamW(torch.optim.AdamW):
        overflow = False

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            self.overflow = not finite
            if not finite:
                self.zero_grad(set_to_none=True)
                return None
            return super().step(closure)

    return GuardedAdamW(groups, **kwargs)


class Heartbeat:
    """This rank's progress: `beat(step, phase)` rewrites its heartbeat file (atomic)."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.path = RunDir(run_dir).heartbeat(rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.step = 0
        self.phase = "setup"
        self.last_progress = time.monotonic()
        self.busy_s: float | None = None

    def record_busy(self, busy_s: float) -> None:
        """This rank's own pace: seconds of a step before its first collective (data and
        first forward, host clock), where ranks do not wait for each other; a running
        mean, so one slow step does not make a straggler."""
        prev = self.busy_s
        self.busy_s = busy_s if prev is None else prev + BUSY_EMA * (busy_s - prev)

    def beat(self, step: int, phase: str) -> None:
        self.step, self.phase, self.last_progress = step, phase, time.monotonic()
        record = {
            "rank": self.rank,
            "step": step,
            "phase": phase,
            "time": time.time(),
            "pid": os.getpid(),
            "busy_s": self.busy_s,
        }
        try:  # every step: no fsync (a lost heartbeat only looks like a slower rank)
            atomic_write(self.path, json.dumps(record), fsync=False)
        except OSError as exc:  # a full disk must not stop training here
            log.debug("heartbeat not written: %s", exc)


def read_heartbeats(run_dir: Path) -> list[dict[str, Any]]:
    """Every rank's last heartbeat, by rank (for `gptrain status`)."""
    out = []
    for path in sorted(RunDir(run_dir).heartbeats.glob("rank*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: r.get("rank", 0))


def stragglers(beats: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(rank, busy_s ÷ the other ranks' median) of each rank slower than
    STRAGGLER_FACTOR × that median; most lagging first."""
    paces = {b["rank"]: b["busy_s"] for b in beats if b.get("busy_s")}
    out = []
    for rank, busy in paces.items():
        others = sorted(v for r, v in paces.items() if r != rank)
        if not others:
            continue
        mid = len(others) // 2
        median = others[mid] if len(others) % 2 else (others[mid - 1] + others[mid]) / 2
        if median > 0 and busy > STRAGGLER_FACTOR * median:
            out.append((rank, busy / median))
    return sorted(out, key=lambda x: -x[1])


class Watchdog(threading.Thread):
    """Fires when `heartbeat` shows no progress for `timeout_s` outside the unarmed
    phases: dumps all threads' stacks into `log_path`, calls `on_hang`, and ends the
    process with `exit_code`."""

    def __init__(
        self,
        heartbeat: Heartbeat,
        timeout_s: float,
        log_path: Path,
        exit_code: int,
        on_hang: Any = None,
    ) -> None:
        super().__init__(name="gptrain-watchdog", daemon=True)
        self.heartbeat, self.timeout_s, self.log_path = heartbeat, timeout_s, log_path
        self.exit_code, self.on_hang = exit_code, on_hang
        self._stop_event = threading.Event()
        self.fired = threading.Event()  # a hang was declared: the process ends with it

    @property
    def poll_s(self) -> float:
        return min(5.0, max(0.2, self.timeout_s / 10))

    def run(self) -> None:
        while not self._stop_event.wait(self.poll_s):
            hb = self.heartbeat
            idle_s = time.monotonic() - hb.last_progress
            if hb.phase in UNARMED_PHASES or idle_s < self.timeout_s:
                continue
            self._fire(idle_s)

    def _fire(self, idle_s: float) -> None:
        self.fired.set()
        hb = self.heartbeat
        message = (
            f"hang: rank {hb.rank} made no progress for {idle_s:.0f} s in phase {hb.phase!r}"
            f" at step {hb.step} (train.hang_timeout_s {self.timeout_s:g}); stacks of every"
            f" thread follow; exiting {self.exit_code} to requeue"
        )
        log.error(message)
        for handler in log.handlers:
            handler.flush()
        try:
            with open(self.log_path, "a") as f:
                f.write(f"--- stacks of rank {hb.rank} (pid {os.getpid()})\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            faulthandler.dump_traceback(all_threads=True)
        if self.on_hang is not None:
            with contextlib.suppress(Exception):  # an alert must never block the exit
                self.on_hang(message)
        # The other ranks stalled at the same moment (they wait in this rank's collective)
        # and fire within a poll or two; leaving now would break their collective first,
        # and their stacks would show a connection error instead of where they waited.
        time.sleep(2 * self.poll_s + 1)
        os._exit(self.exit_code)

    def stop(self) -> None:
        self._stop_event.set()

    def exit_with_hang(self) -> None:
        """After `fired`: wait for the watchdog to end the process with the hang's code
        (never returns). A peer that leaves first breaks this rank's collective; that
        error is a consequence of the hang, and must not become this rank's exit."""
        self.join()
        os._exit(self.exit_code)
