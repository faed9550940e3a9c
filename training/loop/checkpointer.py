"""A checkpoint of the state after a step, never of a diverged state, and the `best`
pointer of the best eval loss.

Every rank writes its files into a temp dir; once all ranks are done, rank 0 writes
`meta.json` last, renames the dir into place and points `latest` at it
(`training.checkpoint.store`). With `train.async_save` the step loop waits only for a
snapshot of the state in host memory: the files are written in the background
(`training.checkpoint.writer`), and the checkpoint is published at the first step
boundary where every rank's writes are done (`poll`), or when something must wait for it
(`finish`: the next save, the end of training, a stop). At most one write is in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharding import faults
from training.checkpoint import store as ckpt
from training.checkpoint.resume import Preflight
from training.checkpoint.store import TrainState
from training.checkpoint.writer import WriteStats
from training.config import TrainJob
from training.errors import TrainingError
from training.loop.comm import Collectives
from training.loop.engine import Engine
from training.observe.sinks import Metrics
from training.parallel.dist import DistEnv
from training.run.paths import RunDir

log = logging.getLogger("gptrain")


@dataclass
class InFlight:
    """A checkpoint whose files are being written: published once every rank is done."""

    step: int
    tmp: Path
    meta: ckpt.CheckpointMeta
    best: bool  # point `best` at it once published
    started_s: float  # time.perf_counter() when the save began
    stall_s: float  # how long the step loop has waited for it so far


class Checkpointer:
    """Saves this run's checkpoints into its run dir."""

    def __init__(
        self,
        job: TrainJob,
        env: DistEnv,
        pre: Preflight,
        engine: Engine,
        comm: Collectives,
        metrics: Metrics,
        beat: Callable[[int, str], None],
        emit: Callable[..., None],
    ) -> None:
        self.root = RunDir(job.run.dir).checkpoints
        self.job, self.env, self.pre = job, env, pre
        self.engine, self.comm, self.metrics = engine, comm, metrics
        self.beat = beat  # the guard's heartbeat: writing is long by nature, unwatched
        self.emit = emit  # the guard's events (rank 0 speaks)
        self.writer = engine.writer  # None: blocking saves
        self.in_flight: InFlight | None = None
        self.last_save_s: float | None = None  # start to published, of the last save
        self.last_stall_s: float | None = None  # the step loop's share of the last save

    # --- saving ------------------------------------------------------------------------

    def save(
        self,
        state: TrainState,
        loader: dict[str, Any],
        health: dict[str, Any],
        healthy: bool,
        *,
        best: bool = False,
    ) -> bool:
        """Checkpoint the state after `state.step` (`loader`: the data position, `health`:
        the guard's counts; `best`: point `best` at it). False (nothing saved, `latest`
        kept) while the last step was bad (`healthy` false: the same verdict on every
        rank). With async saving the checkpoint appears once its files are written."""
        step = state.step
        if not healthy:
            log.warning(
                "step %d: no checkpoint while steps are bad (the last good one stays latest)",
                step,
            )
            return False
        step_dir = self.root / ckpt.step_dir_name(step)
        if ckpt.is_complete(step_dir):  # e.g. saved as best at this step
            if best:
                self.mark_best(step_dir)
            return True
        if self.in_flight is not None and self.in_flight.step == step:
            self.in_flight.best |= best
            return True
        self.finish(step, why="the next save")  # at most one write in flight
        start = time.perf_counter()
        meta = self._meta(state, loader, health)
        self.beat(step, "save")
        tmp = ckpt.begin_save(self.root, step, rank=self.env.rank, barrier=self.comm.barrier)
        self.engine.save_shards(tmp)  # async: a snapshot; the files follow in the background
        faults.signal_at(faults.KILL_IN_SAVE, self.env.rank, step, signal.SIGKILL)
        flight = InFlight(step, tmp, meta, best, start, time.perf_counter() - start)
        if self.writer is None:
            self._publish(flight, step, None, time.perf_counter())
        else:
            self.in_flight = flight
            log.info(
                "step %d: checkpoint queued in %.2f s, copied and written in the background",
                step,
                flight.stall_s,
            )
        self.beat(step, "step")
        return True

    def _meta(
        self, state: TrainState, loader: dict[str, Any], health: dict[str, Any]
    ) -> ckpt.CheckpointMeta:
        return ckpt.CheckpointMeta(
            state=dataclasses.replace(state),
            loader=dict(loader),
            world_size=self.env.world_size,
            config=self.job.resolved,
            tokenizer_sha256=self.pre.manifest.tokenizer_sha256,
            model=self.pre.fingerprint,
            hf_config=self.pre.hf_config.to_dict(),
            saved_at=time.time(),
            health=dict(health),
        )

    def poll(self, step: int) -> None:
        """At a step boundary (`step` just finished): publish the checkpoint in flight if
        every rank's files are written. One small collective while a write is in flight,
        none otherwise."""
        flight = self.in_flight
        if flight is None or self.writer is None:
            return
        start = time.perf_counter()
        if self.comm.everyone(not self.writer.pending):
            self._publish(flight, step, self.writer.wait(), start)
        else:
            flight.stall_s += time.perf_counter() - start

    def finish(self, step: int, *, why: str, deadline_s: float | None = None) -> bool:
        """Wait for the write in flight (for `why`, logged) and publish it; True when no
        write is left in flight. `deadline_s` (time.monotonic): a write not done on
        every rank by then is dropped, its temp dir removed, and an event says so."""
        flight = self.in_flight
        if flight is None or self.writer is None:
            return True
        self.beat(step, "save")
        start = time.perf_counter()
        timeout_s = None if deadline_s is None else max(0.0, deadline_s - time.monotonic())
        stats = self.writer.wait(timeout_s)
        if self.comm.everyone(stats is not None):
            log.info(
                "waited %.2f s for checkpoint step %d (%s)",
                time.perf_counter() - start,
                flight.step,
                why,
            )
            self._publish(flight, step, stats, start)
            return True
        flight.stall_s += time.perf_counter() - start
        self._drop(flight, step, f"its write was not done when {why} had to go on")
        return False

    def save_on_stop(
        self,
        state: TrainState,
        loader: dict[str, Any],
        health: dict[str, Any],
        healthy: bool,
        deadline_s: float | None,
    ) -> str:
        """A stop signal: finish the write in flight (or drop it if `deadline_s`, a
        time.monotonic, passes first), then save this step and wait for it, unless less
        time is left than the last save took. Returns what was saved, for the stop's
        message; the events file says what was finished, dropped or skipped."""
        step = state.step
        if not self.finish(step, why="the stop", deadline_s=deadline_s):
            return "no checkpoint (out of time)"
        left_s = None if deadline_s is None else deadline_s - time.monotonic()
        short = left_s is not None and left_s < (self.last_save_s or 0.0)
        if self.comm.agree(short):
            message = (
                f"no checkpoint of step {step} on stop: {max(left_s or 0.0, 0.0):.0f} s left "
                f"before the job is killed, the last save took {self.last_save_s:.0f} s"
            )
            log.warning(message)
            self.emit("checkpoint_skipped", message, step=step)
            return "no checkpoint of this step (out of time)"
        if not self.save(state, loader, health, healthy):
            return "no checkpoint (last step was bad)"
        if not self.finish(step, why="the stop", deadline_s=deadline_s):
            return "no checkpoint of this step (out of time)"
        return "checkpoint saved"

    # --- publishing --------------------------------------------------------------------

    def _publish(
        self, flight: InFlight, step: int, stats: WriteStats | None, waited_since_s: float
    ) -> None:
        """Every rank's files of `flight` are written (`stats`: this rank's writes, None
        for a blocking save): rank 0 writes meta.json, renames, points `latest` (and
        `best`) and prunes; a failed write on any rank drops the checkpoint and raises.
        The step loop's stall adds its waits for the snapshot (in the optimizer step),
        the time since `waited_since_s` (a perf_counter: the wait that led here) and the
        publish."""
        errors = stats.errors if stats is not None else []
        if stats is not None:
            flight.stall_s += stats.snapshot_wait_s
        failed = self.comm.all_reduce_sum([1.0 if errors else 0.0])[0]
        if failed:
            for error in errors:
                log.error("checkpoint step %d: writing %s", flight.step, error)
            self._drop(flight, step, f"{failed:.0f} rank(s) failed to write it")
            self.in_flight = None
            raise TrainingError(
                f"checkpoint step {flight.step}: {failed:.0f} rank(s) failed to write their "
                f"files ({errors[0] if errors else 'see the other ranks logs'})"
            )
        self.comm.barrier()
        record: dict[str, Any] = {}
        if self.env.is_main:
            best = ckpt.best_name(self.root)
            path = ckpt.publish_checkpoint(
                flight.tmp,
                flight.meta,
                keep_last=self.job.train.keep_last,
                protect=(best,) if best else (),
            )
            if flight.best:
                ckpt.mark_best(path)
            size_gb = sum(ckpt.file_sizes(path).values()) / 1e9
            record = {"checkpoint_step": flight.step, "checkpoint_gb": size_gb}
        self.comm.barrier()
        self.in_flight = None
        flight.stall_s += time.perf_counter() - waited_since_s
        save_s = time.perf_counter() - flight.started_s
        self.last_stall_s = flight.stall_s
        self.last_save_s = save_s
        record.update(checkpoint_s=save_s, checkpoint_stall_s=flight.stall_s)
        self.metrics.log(step, record)
        log.info(
            "saved checkpoint step %d in %.1f s (the step loop waited %.2f s)",
            flight.step,
            save_s,
            flight.stall_s,
        )

    def _drop(self, flight: InFlight, step: int, why: str) -> None:
        """Give up the checkpoint in flight: rank 0 removes its temp dir; `latest` stays."""
        self.comm.barrier()
        if self.env.is_main:
            shutil.rmtree(flight.tmp, ignore_errors=True)
        self.in_flight = None
        latest = ckpt.latest_checkpoint(self.root)
        message = (
            f"checkpoint step {flight.step} dropped: {why}; the last complete one is "
            f"{latest.name if latest else 'none'}"
        )
        log.warning(message)
        self.emit("checkpoint_dropped", message, step=step)

    def mark_best(self, path: Path) -> None:
        """`path` holds the best eval loss so far (rank 0 writes the pointer)."""
        if self.env.is_main:
            ckpt.mark_best(path)
