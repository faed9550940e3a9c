"""One rank's components of a run, built once, in order: process group, logs, engine,
data, metrics, guard, then what joins them (the stepper, evaluator and checkpointer)."""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from training.checkpoint import store as ckpt
from training.checkpoint.resume import Preflight
from training.config import BatchLayout, TrainJob
from training.loop.checkpointer import Checkpointer
from training.loop.comm import Collectives
from training.loop.engine import Engine
from training.loop.evaluator import Evaluator
from training.loop.feed import DataFeed
from training.loop.guard import RunGuard
from training.loop.step import Stepper
from training.observe.health import Heartbeat
from training.observe.logs import setup_logging
from training.observe.sinks import Metrics, RunInfo
from training.parallel.dist import DistEnv
from training.run import rundir
from training.run.paths import RunDir
from training.schedule import lr_at, total_steps_for

log = logging.getLogger("gptrain")


@dataclass
class Components:
    """Everything one rank trains with; each part does one job and none reaches into
    another's fields (the trainer passes values between them)."""

    job: TrainJob
    env: DistEnv
    layout: BatchLayout
    pre: Preflight
    engine: Engine
    feed: DataFeed
    comm: Collectives
    metrics: Metrics
    guard: RunGuard
    stepper: Stepper
    evaluator: Evaluator
    checkpointer: Checkpointer
    total_steps: int

    @classmethod
    def build(
        cls,
        job: TrainJob,
        env: DistEnv,
        layout: BatchLayout,
        pre: Preflight,
        on_hang: Callable[[str], None] | None = None,
    ) -> Components:
        """Join the process group; `overwrite`: rank 0 archives the old run first; then
        logs, set-aside damaged checkpoints, and every component (resuming where the
        preflight's checkpoint says). `on_hang`: the launcher backend's hook (RunGuard)."""
        import torch.distributed as dist

        from training.parallel.dist import init_distributed

        run_dir = Path(job.run.dir)
        init_distributed(job.train.collective_timeout_s)
        if job.train.resume == "overwrite":
            if env.is_main:
                moved = rundir.archive(run_dir)
                if moved is not None:
                    print(f"moved the old run in {run_dir} to {moved}", flush=True)
            dist.barrier()  # nobody writes into the run dir before it is empty
        setup_logging(run_dir, env.rank)
        meta = pre.meta
        # This attempt's first heartbeat, before setup (which can take long: a universal
        # checkpoint conversion), so status never shows an earlier attempt's as this one's.
        Heartbeat(run_dir, env.rank).beat(meta.step if meta else 0, "setup")
        if env.is_main:
            _set_aside_damaged(RunDir(run_dir).checkpoints, pre.resume_from)

        engine = Engine.build(job, env, pre)
        comm = Collectives.start(job.train.collective_timeout_s, env.world_size)
        feed = DataFeed.build(job, env, layout, comm, meta.loader if meta else None)
        total = total_steps_for(
            max_steps=job.train.max_steps,
            max_tokens=job.train.max_tokens,
            epochs=job.train.epochs,
            global_batch_size=layout.global_batch_size,
            seq_len=job.data.seq_len,
            samples_per_epoch=feed.samples_per_epoch,
        )
        info = RunInfo(
            run_dir=RunDir(run_dir),
            name=job.run.name or run_dir.name,
            config=job.resolved,
            resume_step=meta.step if meta else None,
            params=engine.param_counts(),
        )
        metrics = Metrics(job.tracking, info, rank=env.rank)
        guard = RunGuard.start(job, env, metrics, meta, on_hang)
        cfg = job.train
        schedule = functools.partial(
            lr_at,
            max_lr=cfg.learning_rate,
            min_lr=cfg.min_lr,
            warmup_steps=cfg.lr_warmup_steps,
            total_steps=total,
            decay=cfg.lr_decay,
        )
        stepper = Stepper(
            engine, feed, comm, guard, layout, cfg, job.deepspeed.precision, schedule, env.rank
        )
        has_val = any(s.tokens for s in pre.manifest.splits.get("val", []))
        return cls(
            job=job,
            env=env,
            layout=layout,
            pre=pre,
            engine=engine,
            feed=feed,
            comm=comm,
            metrics=metrics,
            guard=guard,
            stepper=stepper,
            evaluator=Evaluator(job, env, layout, comm, has_val),
            checkpointer=Checkpointer(job, env, pre, engine, comm, metrics, guard.beat, guard.emit),
            total_steps=total,
        )

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation over all ranks; None where the device peak is unknown."""
        import torch

        from training.models.flops import peak_tflops

        peak = self.job.tracking.peak_tflops
        if peak is None and torch.cuda.is_available():
            peak = peak_tflops(torch.cuda.get_device_name())
        if peak is None:
            return None  # e.g. CPU: no honest peak to divide by
        return tokens_per_s * self.flops_per_token / (peak * 1e12 * self.env.world_size)

    @functools.cached_property
    def flops_per_token(self) -> float:
        from training.models.flops import model_flops_per_token

        return model_flops_per_token(
            self.pre.hf_config, self.engine.n_params, self.job.data.seq_len
        )

    def close(self) -> None:
        """Stop the guard, close the sinks, then leave the process group: gloo's threads
        must not be torn down by the interpreter's exit (which can abort with "terminate
        called ...")."""
        import torch.distributed as dist

        self.guard.close()
        self.metrics.finish()
        if dist.is_initialized():
            dist.destroy_process_group()


def _set_aside_damaged(root: Path, resume_from: Path | None) -> None:
    """One warning per checkpoint that `resume: auto` skipped; each is renamed out of the
    way so this run writes its own checkpoint of that step. The temp dir of a save that
    never finished (a kill during a write) is removed, with one line."""
    for tmp in ckpt.temp_dirs(root):
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning(
            "removed %s: a checkpoint whose write never finished (resuming from %s)",
            tmp.name,
            resume_from.name if resume_from else "scratch",
        )
    for bad, why in ckpt.damaged(root, resume_from):
        moved = ckpt.quarantine(bad)
        log.warning(
            "checkpoint %s is damaged (%s); resuming from %s instead (kept as %s)",
            bad.name,
            why,
            resume_from.name if resume_from else "scratch",
            moved.name,
        )
    if resume_from is not None and resume_from.parent == root and (root / ckpt.LATEST).is_file():
        ckpt.point_latest(resume_from)  # this run's pointer, never another run's
