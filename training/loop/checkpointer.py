"""A checkpoint of the state after a step (`training.checkpoint.store` writes it: every
rank's shards into a temp dir, `meta.json` last, rename, then `latest`), never of a
diverged state, and the `best` pointer of the best eval loss."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.checkpoint import store as ckpt
from training.checkpoint.resume import Preflight
from training.checkpoint.store import TrainState
from training.config import TrainJob
from training.loop.comm import Collectives
from training.loop.engine import Engine
from training.observe.sinks import Metrics
from training.parallel.dist import DistEnv
from training.run.paths import RunDir

log = logging.getLogger("gptrain")


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
    ) -> None:
        self.root = RunDir(job.run.dir).checkpoints
        self.job, self.env, self.pre = job, env, pre
        self.engine, self.comm, self.metrics = engine, comm, metrics
        self.beat = beat  # the guard's heartbeat: writing is long by nature, unwatched

    def save(
        self, state: TrainState, loader: dict[str, Any], health: dict[str, Any], healthy: bool
    ) -> Path | None:
        """Checkpoint the state after `state.step` (`loader`: the data position, `health`:
        the guard's counts); None (nothing written, `latest` kept) while the last step
        was bad (`healthy` false: the same verdict on every rank)."""
        step_dir = self.root / ckpt.step_dir_name(state.step)
        if not healthy:
            log.warning(
                "step %d: no checkpoint while steps are bad (the last good one stays latest)",
                state.step,
            )
            return None
        if ckpt.is_complete(step_dir):
            return step_dir  # e.g. saved as best at this step
        start = time.perf_counter()
        best = ckpt.best_name(self.root)
        meta = ckpt.CheckpointMeta(
            state=dataclasses.replace(state),
            loader=loader,
            world_size=self.env.world_size,
            config=self.job.resolved,
            tokenizer_sha256=self.pre.manifest.tokenizer_sha256,
            model=self.pre.fingerprint,
            hf_config=self.pre.hf_config.to_dict(),
            saved_at=time.time(),
            health=health,
        )
        path = ckpt.save_checkpoint(
            self.root,
            state.step,
            rank=self.env.rank,
            barrier=self.comm.barrier,
            write_shards=lambda directory: self._write_shards(state.step, directory),
            meta=meta,
            keep_last=self.job.train.keep_last,
            protect=(best,) if best else (),
        )
        save_s = time.perf_counter() - start
        self.metrics.log(state.step, {"checkpoint_s": save_s})
        log.info("saved %s in %.1f s", path, save_s)
        return path

    def _write_shards(self, step: int, directory: Path) -> None:
        self.beat(step, "save")
        self.engine.save_shards(directory)

    def mark_best(self, path: Path) -> None:
        """`path` holds the best eval loss so far (rank 0 writes the pointer)."""
        if self.env.is_main:
            ckpt.mark_best(path)
