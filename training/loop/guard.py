"""The run's guard around each step: bad-step accounting and its action (roll back or
stop), heartbeats, the hang watchdog, and the events people are told about.

The policy lives in `training.observe.health` (pure, unit-tested); this module wires it to a
running engine: what DeepSpeed says of each step, the last checkpoint to roll back to,
the metrics and `events.jsonl`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.checkpoint import store as ckpt
from training.config import TrainJob
from training.errors import EXIT_REQUEUE, TrainingError
from training.observe.events import Events
from training.observe.health import Heartbeat, StepHealth, Watchdog
from training.observe.sinks import Metrics
from training.parallel.dist import DistEnv
from training.run.paths import RunDir

log = logging.getLogger("gptrain")


@dataclass
class RunGuard:
    """One rank's guard of the run around each step: what `training.observe.health` decides
    about a step, acted on here (roll back or stop), its heartbeat and watchdog, and the
    events people are told about (rank 0 speaks for the run)."""

    job: TrainJob
    env: DistEnv
    health: StepHealth
    heartbeat: Heartbeat
    watchdog: Watchdog
    events: Events
    metrics: Metrics

    @classmethod
    def start(
        cls,
        job: TrainJob,
        env: DistEnv,
        metrics: Metrics,
        meta: ckpt.CheckpointMeta | None,
        on_hang: Callable[[str], None] | None = None,
    ) -> RunGuard:
        """Health counts continued from the resume checkpoint; heartbeat and watchdog on.
        `on_hang(message)` runs in the watchdog thread before the process exits to
        requeue (the launcher backend's hook, e.g. requeue the job)."""
        run_dir = Path(job.run.dir)
        health = StepHealth(job.train.max_bad_steps, job.train.spike_factor)
        if meta is not None:
            health.load_state_dict(meta.health)
        events = Events(run_dir, env.rank, metrics)
        heartbeat = Heartbeat(run_dir, env.rank)
        heartbeat.beat(meta.step if meta else 0, "setup")
        watchdog = Watchdog(
            heartbeat,
            job.train.hang_timeout_s,
            RunDir(run_dir).rank_log(env.rank),
            EXIT_REQUEUE,
            on_hang=lambda message: _on_hang(events, heartbeat, message, on_hang),
        )
        watchdog.start()
        return cls(job, env, health, heartbeat, watchdog, events, metrics)

    @property
    def step(self) -> int:
        """The step the last heartbeat named."""
        return self.heartbeat.step

    def beat(self, step: int, phase: str) -> None:
        """This rank is at `step` in `phase` (the watchdog's sign of progress)."""
        self.heartbeat.beat(step, phase)

    def start_step(self, step: int) -> None:
        """Step `step` begins: "warmup" until a step has been seen (compiles, first
        collectives: not watched as closely), "step" after."""
        self.beat(step, "step" if self.health.steps_seen else "warmup")

    def is_spike(self, mean_loss: float) -> bool:
        """Whether the step's loss spikes against the recent ones (train.spike_factor)."""
        return self.health.is_spike(mean_loss)

    def record_busy(self, busy_s: float) -> None:
        """This rank's own pace this step (the straggler check in `gptrain status`)."""
        self.heartbeat.record_busy(busy_s)

    @property
    def healthy(self) -> bool:
        """The last step was good (the same verdict on every rank: a global norm)."""
        return self.health.healthy

    def counts(self) -> dict[str, int]:
        """skipped_steps, loss_spikes, rollbacks: in every metrics record."""
        return self.health.counts()

    def health_state(self) -> dict[str, Any]:
        """What a checkpoint keeps, so a resumed run continues the counts."""
        return self.health.state_dict()

    def emit(self, kind: str, message: str, *, step: int | None = None) -> None:
        """An event of the run (rank 0 speaks for all ranks)."""
        if self.env.is_main:
            self.events.emit(kind, message, step=step)

    def after_step(
        self,
        step: int,
        *,
        applied: bool,
        spike: bool,
        mean_loss: float | None,
        restore: Callable[[Path], None],
        position: Callable[[], dict[str, Any]],
    ) -> bool:
        """Count a dropped step; after max_bad_steps in a row roll back or stop. Returns
        whether the step was dropped. `restore(step_dir)` loads a checkpoint's weights
        and optimizer state into the engine; `position()` is the loader's state."""
        verdict = self.health.record(applied=applied and not spike, spike=spike, loss=mean_loss)
        if not verdict.bad:
            return False
        message = (
            f"step {step} skipped ({verdict.reason}); {self.health.bad_in_a_row} bad in "
            f"a row (train.max_bad_steps {self.health.max_bad_steps})"
        )
        log.warning(message)
        self.emit("bad_step", message, step=step)
        if verdict.act:
            self._act_on_bad_steps(step, verdict.reason, restore, position)
        return True

    def _act_on_bad_steps(
        self,
        step: int,
        reason: str,
        restore: Callable[[Path], None],
        position: Callable[[], dict[str, Any]],
    ) -> None:
        """`train.on_bad_steps`: stop with one line, or load the last checkpoint's weights
        and optimizer state and go on with the next data (the samples the dropped steps
        saw are not seen again this epoch; logged)."""
        cfg, n = self.job.train, self.health.bad_in_a_row
        what = f"step {step}: {n} bad steps in a row ({reason})"
        if cfg.on_bad_steps == "stop":
            raise TrainingError(
                f"{what}; stopped (train.on_bad_steps=stop): lower train.learning_rate or set"
                " train.grad_clip, then resume"
            )
        root = RunDir(self.job.run.dir).checkpoints
        good = ckpt.latest_checkpoint(root)
        meta = ckpt.read_meta(good) if good is not None else None
        if good is None or meta is None or meta.world_size != self.env.world_size:
            raise TrainingError(
                f"{what} and no checkpoint of this world size to roll back "
                f"to in {root}; lower train.learning_rate or set "
                "train.grad_clip"
            )
        self.beat(step, "rollback")  # a checkpoint load: long by nature, unwatched
        restore(good)
        self.beat(step, "step")
        self.health.rolled_back()
        message = (
            f"{what}: rolled back to {good.name} (step {meta.step}); training goes "
            f"on with the next data: samples {meta.loader.get('consumed')}.."
            f"{position().get('consumed')} (loader positions) were trained on by "
            "dropped or undone steps"
        )
        log.warning(message)
        self.emit("rollback", message, step=step)
        self.metrics.log(step, {"rollback_to_step": meta.step, **self.health.counts()})

    def report_failure(self, message: str) -> None:
        """This rank's failure, as an event (every rank reports its own)."""
        self.events.emit("failure", message, step=self.step)

    def on_error(self) -> None:
        """The step loop raised: if this rank's watchdog declared a hang, the error is its
        consequence (a peer left first), so the rank leaves with the hang's code and the
        hang stays the recorded cause (never returns then)."""
        if self.watchdog.fired.is_set():
            self.watchdog.exit_with_hang()

    def close(self) -> None:
        """Stop watching: the run is over (or failed) on this rank."""
        self.watchdog.stop()
        self.heartbeat.beat(self.heartbeat.step, "done")


def _on_hang(
    events: Events, heartbeat: Heartbeat, message: str, hook: Callable[[str], None] | None
) -> None:
    events.emit("hang", message, step=heartbeat.step)
    if hook is not None:
        hook(message)
