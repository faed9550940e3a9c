"""The training loop: setup → fit, one code path for every ZeRO stage and launcher.

    # 2 CPU ranks (what `gptrain launch configs/demo-cpu.yaml` runs):
    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 -m launcher.cli \
        train configs/demo-cpu.yaml
    # one process:
    DS_ACCELERATOR=cpu gptrain train configs/demo-cpu.yaml --set launch.nproc_per_node=1

The trainer reads only the torchrun environment (see `training.parallel.dist`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sharding import faults
from sharding.atomic import atomic_dir, atomic_write
from training.checkpoint import store as ckpt
from training.checkpoint.resume import Preflight, preflight
from training.checkpoint.store import TrainState
from training.config import BatchLayout, TrainJob
from training.errors import EXIT_REQUEUE, EXIT_STOPPED, TrainingError
from training.observe.health import Heartbeat
from training.observe.logs import hms, setup_logging
from training.observe.progress import ProgressBar
from training.parallel.dist import DistEnv, dist_env
from training.run import failures, rundir
from training.run.paths import RunDir
from training.run.rundir import JobContext
from training.steps import StepRunner

log = logging.getLogger("gptrain")


class StopFlag:
    """Set by SIGTERM/SIGUSR1/SIGUSR2 or a first Ctrl-C; ranks agree on it at step
    boundaries, save and exit. SIGUSR2 (SLURM's time-limit/preemption notice) also
    asks for a requeue. A second Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.requeue = False
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.receive(signum)

    def receive(self, signum: int) -> None:
        """Stop signal `signum` arrived (from the handler, or one that came earlier)."""
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self.requeue = self.requeue or signum == signal.SIGUSR2

    def settle(self) -> None:
        """The rank is exiting after a stop: further stop signals change nothing, and must
        not kill it while the interpreter shuts down (Python restores the default
        handlers then, and torchrun SIGTERMs the ranks left once one has exited)."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def build_runner(job: TrainJob) -> StepRunner:
    """Check everything, join the process group, build engine and data (resuming)."""
    env = dist_env(os.environ)
    layout = _layout(job, env)
    pre = preflight(job, layout)  # fail fast, before process groups and models
    return _start(job, env, layout, pre)


def _layout(job: TrainJob, env: DistEnv) -> BatchLayout:
    try:
        return job.train.batch_layout(env.world_size)
    except ValueError as exc:
        raise TrainingError(f"train.{exc} (world size {env.world_size})") from None


def _start(
    job: TrainJob,
    env: DistEnv,
    layout: BatchLayout,
    pre: Preflight,
    on_hang: Callable[[str], None] | None = None,
) -> StepRunner:
    """Join the process group; `overwrite`: rank 0 archives the old run first; then logs,
    set-aside damaged checkpoints, engine and data."""
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
    # This attempt's first heartbeat, before setup (which can take long: a universal
    # checkpoint conversion), so status never shows an earlier attempt's as this one's.
    Heartbeat(run_dir, env.rank).beat(pre.meta.step if pre.meta else 0, "setup")
    if env.is_main:
        _set_aside_damaged(RunDir(run_dir).checkpoints, pre.resume_from)
    return StepRunner.setup(job, env, layout, pre, on_hang)


def _set_aside_damaged(root: Path, resume_from: Path | None) -> None:
    """One warning per checkpoint that `resume: auto` skipped; each is renamed out of the
    way so this run writes its own checkpoint of that step."""
    for bad, why in ckpt.damaged(root, resume_from):
        moved = ckpt.quarantine(bad)
        log.warning(
            "checkpoint %s is damaged (%s); resuming from %s instead (kept as %s)",
            bad.name,
            why,
            resume_from.name if resume_from else "scratch",
            moved.name,
        )
    if resume_from is not None and (root / ckpt.LATEST).is_file():
        ckpt.point_latest(resume_from)


def train(job: TrainJob, stop_signal: int | None = None, context: JobContext | None = None) -> int:
    """Run (or resume) training; returns the process exit code. An unexpected error
    after the run dir is ours is recorded there (`training.run.failures`) and raised as one
    line; the run dir's lock is released at the end unless a launcher holds it.
    `stop_signal`: a stop signal that reached the process before this call (the run
    stops at its first step boundary, as if it had come now)."""
    stop = StopFlag()
    if stop_signal is not None:
        stop.receive(stop_signal)
    env = dist_env(os.environ)
    layout = _layout(job, env)
    context = context or JobContext.from_env()
    pre = preflight(job, layout, context)  # refusals here leave the run dir as it was
    run_dir = Path(job.run.dir)
    try:
        runner = _start(job, env, layout, pre, context.on_hang)
        try:
            code = _train(job, runner, stop)
            if code in (EXIT_REQUEUE, EXIT_STOPPED):
                stop.settle()
            return code
        except Exception as exc:  # told where people watch, while W&B is still open
            runner.guard.events.emit("failure", failures.error_line(exc), step=runner.guard.step)
            raise
        finally:
            runner.close()
    except Exception as exc:
        raise failures.record(run_dir, env.rank, exc) from exc
    finally:
        if env.is_main and not context.launcher_holds_lock:
            rundir.release(run_dir, context.token)


def _train(job: TrainJob, runner: StepRunner, stop: StopFlag) -> int:
    state = TrainState()
    if runner.pre.resume is not None:
        state = dataclasses.replace(runner.pre.resume.meta.state)
        log.info("resumed from %s at step %d", runner.pre.resume.path, state.step)
    if runner.env.is_main:
        _record_run(
            job,
            Path(job.run.dir),
            runner.pre.manifest.tokenizer_dir,
            fresh=runner.pre.resume_from is None,
        )
    return _fit(job, runner, state, stop)


# What a run dir keeps of the `--tokenizer` dir given to prepare: never model weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "config.json",  # small; lets AutoTokenizer tell the tokenizer class of older dirs
)


def copy_tokenizer(src: Path, dest: Path) -> None:
    """Copy the tokenizer files of `src` (not weights or configs of a model) to `dest`,
    atomically (temp dir + rename), replacing what `dest` held."""
    with atomic_dir(dest) as tmp:
        for path in sorted(src.iterdir()):
            if path.is_file() and path.name in TOKENIZER_FILES:
                shutil.copy2(path, tmp / path.name)


def _record_run(job: TrainJob, run_dir: Path, tokenizer_dir: Path, fresh: bool) -> None:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    paths = RunDir(run_dir)
    atomic_write(paths.config, yaml.safe_dump(job.resolved, sort_keys=False))
    if fresh or not paths.tokenizer.is_dir():  # usable without the data dir
        copy_tokenizer(tokenizer_dir, paths.tokenizer)


def _fit(job: TrainJob, runner: StepRunner, state: TrainState, stop: StopFlag) -> int:
    total = runner.total_steps
    log.info(
        "training %s for %d steps: global batch %d = %d × %d accum × %d ranks, %d tokens/step",
        job.run.dir,
        total,
        runner.layout.global_batch_size,
        runner.layout.micro_batch_size,
        runner.layout.grad_accum_steps,
        runner.layout.data_parallel_size,
        runner.layout.global_batch_size * job.data.seq_len,
    )
    if runner.env.is_main and job.train.lr_warmup_steps > total / 2:
        log.warning(
            "train.lr_warmup_steps %d is more than half of the run's %d steps: the "
            "learning rate peaks late or never",
            job.train.lr_warmup_steps,
            total,
        )
    bar = ProgressBar(total, state.step, enabled=runner.env.is_main)
    try:
        return _loop(job, runner, state, stop, bar)
    finally:
        bar.close()


def _loop(
    job: TrainJob, runner: StepRunner, state: TrainState, stop: StopFlag, bar: ProgressBar
) -> int:
    cfg, total = job.train, runner.total_steps
    window: list[dict[str, float]] = []
    window_start = time.perf_counter()
    while state.step < total:
        result = runner.train_step(state.step)
        state.step += 1
        state.tokens += result["tokens"]
        window.append(result)
        if state.step % cfg.log_every == 0 or state.step == total:
            record = log_window(runner, state, window, time.perf_counter() - window_start, total)
            bar.update(state.step, record["loss"], record["tokens_per_s"])
            window, window_start = [], time.perf_counter()
        else:
            bar.update(state.step)
        eval_due = state.step % cfg.eval_every == 0 or state.step == total
        if runner.has_val and eval_due and _evaluate_and_maybe_stop(job, runner, state):
            break
        if state.step % cfg.save_every == 0:
            _save(job, runner, state)
        faults.signal_at(faults.SIGNAL_AT_STEP, runner.env.rank, state.step, signal.SIGUSR1)
        if runner.agree(stop.signum is not None):
            saved = _save(job, runner, state)
            requeue = runner.agree(stop.requeue)
            message = (
                f"stopped by signal at step {state.step}; "
                f"{'checkpoint saved' if saved else 'no checkpoint (last step was bad)'}"
                f"{'; requeue requested' if requeue else ''}"
            )
            log.warning(message)
            if requeue:
                runner.guard.emit("requeue", message, step=state.step)
            return EXIT_REQUEUE if requeue else EXIT_STOPPED
    _save(job, runner, state)
    message = f"done: {state.step} steps, {state.tokens} tokens"
    log.info(message)
    runner.guard.emit("completed", message, step=state.step)
    return 0


def log_window(
    runner: StepRunner,
    state: TrainState,
    window: list[dict[str, float]],
    elapsed_s: float,
    total: int,
) -> dict[str, Any]:
    """Log the steps of `window` (their `train_step` results, `elapsed_s` in all): one
    metrics record, the log line, and the record returned."""
    tokens = sum(r["tokens"] for r in window)
    samples = sum(r["samples"] for r in window)
    step_time_s = elapsed_s / len(window)
    stats = runner.window_stats(window, step_time_s)  # stragglers and OOM risk show on rank 0
    record = {
        "step": state.step,
        "total_steps": total,
        "tokens": state.tokens,
        "loss": stats["loss"],
        "lr": window[-1]["lr"],
        "grad_norm": stats["grad_norm"],
        "tokens_per_s": tokens / elapsed_s,
        "tokens_per_s_per_device": tokens / elapsed_s / runner.env.world_size,
        "samples_per_s": samples / elapsed_s,
        "step_time_s": step_time_s,
        "data_wait_s": sum(r["data_wait_s"] for r in window) / len(window),
        "step_time_max_s": stats["step_time_max_s"],
        "memory_gb": stats["memory_gb"],
        # FLOPs are spent on every position, targets or not (masked prompts too).
        "mfu": runner.mfu(samples * runner.job.data.seq_len / elapsed_s),
        "epoch": runner.loader.state_dict()["epoch"],
        **runner.guard.health.counts(),  # skipped_steps, loss_spikes, rollbacks
    }
    runner.metrics.log(state.step, {k: v for k, v in record.items() if k != "step"})
    eta_s = step_time_s * (total - state.step)
    log.info(
        "step %d/%d | loss %.4f | lr %.2e | grad %.2f | %.0f tok/s | %.2f s/step | eta %s",
        state.step,
        total,
        record["loss"],
        record["lr"],
        record["grad_norm"],
        record["tokens_per_s"],
        step_time_s,
        hms(eta_s),
    )
    return record


def _evaluate_and_maybe_stop(job: TrainJob, runner: StepRunner, state: TrainState) -> bool:
    """Eval on the val split; keep the best checkpoint; True when early stopping fires."""
    loss = runner.evaluate(job.train.eval_steps)
    ppl = math.exp(min(loss, 50.0))
    runner.metrics.log(state.step, {"eval_loss": loss, "eval_ppl": ppl})
    log.info("eval step %d | loss %.4f | ppl %.2f", state.step, loss, ppl)
    if state.best_eval_loss is None or loss < state.best_eval_loss:
        before = (state.best_eval_loss, state.best_step, state.evals_without_improvement)
        state.best_eval_loss, state.best_step = loss, state.step
        state.evals_without_improvement = 0
        path = _save(job, runner, state)  # meta records this step as the best
        if path is None:  # not saved (a bad step): the best is still the old one
            state.best_eval_loss, state.best_step, state.evals_without_improvement = before
        elif runner.env.is_main:
            ckpt.mark_best(path)
        return False
    state.evals_without_improvement += 1
    patience = job.train.early_stopping_patience
    if patience is not None and state.evals_without_improvement >= patience:
        log.warning(
            "early stopping at step %d: no eval improvement in %d evals (best %.4f at step %s)",
            state.step,
            patience,
            state.best_eval_loss,
            state.best_step,
        )
        return True
    return False


def _save(job: TrainJob, runner: StepRunner, state: TrainState) -> Path | None:
    """Checkpoint the state after `state.step`; None (nothing written, `latest` kept)
    while the last step was bad: a checkpoint never holds a diverged state."""
    root = RunDir(job.run.dir).checkpoints
    if not runner.guard.health.healthy:  # the same verdict on every rank (global norm)
        log.warning(
            "step %d: no checkpoint while steps are bad (the last good one stays latest)",
            state.step,
        )
        return None
    if ckpt.is_complete(root / ckpt.step_dir_name(state.step)):
        return root / ckpt.step_dir_name(state.step)  # e.g. saved as best at this step
    start = time.perf_counter()
    best = ckpt.best_name(root)
    meta = ckpt.CheckpointMeta(
        state=dataclasses.replace(state),
        loader=runner.loader.state_dict(),
        world_size=runner.env.world_size,
        config=job.resolved,
        tokenizer_sha256=runner.pre.manifest.tokenizer_sha256,
        model=runner.pre.fingerprint,
        hf_config=runner.pre.hf_config.to_dict(),
        saved_at=time.time(),
        health=runner.guard.health.state_dict(),
    )
    path = ckpt.save_checkpoint(
        root,
        state.step,
        rank=runner.env.rank,
        barrier=runner.barrier,
        write_shards=runner.write_shards,
        meta=meta,
        keep_last=job.train.keep_last,
        protect=(best,) if best else (),
    )
    save_s = time.perf_counter() - start
    runner.metrics.log(state.step, {"checkpoint_s": save_s})
    log.info("saved %s in %.1f s", path, save_s)
    return path
