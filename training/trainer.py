"""The training loop: setup → fit, one code path for every ZeRO stage and launcher.

    # 2 CPU ranks (what `gptrain launch configs/demo-cpu.yaml` runs):
    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 -m launcher.cli \
        train configs/demo-cpu.yaml
    # one process:
    DS_ACCELERATOR=cpu gptrain train configs/demo-cpu.yaml --set launch.nproc_per_node=1

The trainer reads only the torchrun environment (see `training.parallel.dist`); the
components it wires are in `training.loop`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from sharding import faults
from sharding.atomic import atomic_dir, atomic_write
from training.checkpoint.resume import preflight
from training.checkpoint.store import TrainState
from training.config import BatchLayout, TrainJob
from training.errors import EXIT_REQUEUE, EXIT_STOPPED, TrainingError
from training.loop.components import Components
from training.loop.step import StepResult, window_record
from training.loop.stop import StopFlag
from training.observe.logs import hms
from training.observe.progress import ProgressBar
from training.parallel.dist import DistEnv, dist_env
from training.parallel.sequence import ParallelDims
from training.run import failures, rundir
from training.run.paths import RunDir
from training.run.rundir import JobContext

log = logging.getLogger("gptrain")


def build_components(job: TrainJob, context: JobContext | None = None) -> Components:
    """Check everything, join the process group, build every component (resuming)."""
    env = dist_env(os.environ)
    layout = _layout(job, env)
    pre = preflight(job, layout, context)  # fail fast, before process groups and models
    return Components.build(job, env, layout, pre, context.on_hang if context else None)


def _layout(job: TrainJob, env: DistEnv) -> BatchLayout:
    try:
        dims = ParallelDims(env.world_size, job.deepspeed.sequence_parallel_size)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    try:
        return job.train.batch_layout(dims.dp_size)
    except ValueError as exc:
        raise TrainingError(f"train.{exc} (world size {env.world_size})") from None


def train(job: TrainJob, stop_signal: int | None = None, context: JobContext | None = None) -> int:
    """Run (or resume) training; returns the process exit code. An unexpected error
    after the run dir is ours is recorded there (`training.run.failures`) and raised as
    one line; the run dir's lock is released at the end unless a launcher holds it.
    `stop_signal`: a stop signal that reached the process before this call (the run
    stops at its first step boundary, as if it had come now)."""
    context = context or JobContext.from_env()
    stop = StopFlag(budget_s=context.stop_budget_s)
    if stop_signal is not None:
        stop.receive(stop_signal)
    env = dist_env(os.environ)
    layout = _layout(job, env)
    pre = preflight(job, layout, context)  # refusals here leave the run dir as it was
    run_dir = Path(job.run.dir)
    try:
        run = Components.build(job, env, layout, pre, context.on_hang)
        try:
            state = _start_state(run)
            code = fit(run, state, stop)
            if code in (EXIT_REQUEUE, EXIT_STOPPED):
                stop.settle()
            return code
        except Exception as exc:  # told where people watch, while the trackers are open
            run.guard.on_error()  # a declared hang wins over the errors it causes
            run.guard.report_failure(failures.error_line(exc))
            raise
        finally:
            run.close()
    except Exception as exc:
        raise failures.record(run_dir, env.rank, exc) from exc
    finally:
        if env.is_main and not context.launcher_holds_lock:
            rundir.release(run_dir, context.token)


def _start_state(run: Components) -> TrainState:
    """Where training stands: a resumed checkpoint's state, or the start; rank 0 records
    the run's config and tokenizer in the run dir."""
    state = TrainState()
    if run.pre.resume is not None:
        state = dataclasses.replace(run.pre.resume.meta.state)
        log.info("resumed from %s at step %d", run.pre.resume.path, state.step)
    if run.env.is_main:
        _record_run(run.job, run.pre.manifest.tokenizer_dir, fresh=run.pre.resume_from is None)
    layout, total = run.layout, run.total_steps
    log.info(
        "training %s for %d steps: global batch %d = %d × %d accum × %d ranks, %d tokens/step",
        run.job.run.dir,
        total,
        layout.global_batch_size,
        layout.micro_batch_size,
        layout.grad_accum_steps,
        layout.data_parallel_size,
        layout.global_batch_size * run.job.data.seq_len,
    )
    warmup = run.job.train.lr_warmup_steps
    if run.env.is_main and warmup > total / 2:
        log.warning(
            "train.lr_warmup_steps %d is more than half of the run's %d steps: the learning "
            "rate peaks late or never",
            warmup,
            total,
        )
    return state


def fit(run: Components, state: TrainState, stop: StopFlag) -> int:
    """Train from `state` to the last step (or an early stop, or a stop signal)."""
    cfg, total = run.job.train, run.total_steps
    window: list[StepResult] = []
    window_start = time.perf_counter()
    bar = ProgressBar(total, state.step, enabled=run.env.is_main)
    try:
        while state.step < total:
            result = run.stepper.run(state.step)
            state.step += 1
            state.tokens += result.tokens
            window.append(result)
            if state.step % cfg.log_every == 0 or state.step == total:
                record = log_window(run, state, window, time.perf_counter() - window_start)
                bar.update(state.step, record["loss"], record["tokens_per_s"])
                window, window_start = [], time.perf_counter()
            else:
                bar.update(state.step)
            if run.evaluator.due(state.step, total) and _evaluate(run, state):
                break  # early stopping
            if state.step % cfg.save_every == 0:
                _save(run, state)
            run.checkpointer.poll(state.step)  # publish a checkpoint written in the background
            faults.signal_at(faults.SIGNAL_AT_STEP, run.env.rank, state.step, signal.SIGUSR1)
            if run.comm.agree(stop.signum is not None):
                return _stop(run, state, stop)
        _save(run, state)
        run.checkpointer.finish(state.step, why="the end of training")
        message = f"done: {state.step} steps, {state.tokens} tokens"
        log.info(message)
        run.guard.emit("completed", message, step=state.step)
        return 0
    finally:
        bar.close()


def _stop(run: Components, state: TrainState, stop: StopFlag) -> int:
    """Every rank saw a stop signal: save (a write in flight first), then exit to stop or
    to be requeued."""
    saved = run.checkpointer.save_on_stop(
        state,
        run.feed.state_dict(),
        run.guard.health_state(),
        run.guard.healthy,
        deadline_s=stop.deadline_s,
    )
    requeue = run.comm.agree(stop.requeue)
    message = (
        f"stopped by signal at step {state.step}; {saved}{'; requeue requested' if requeue else ''}"
    )
    log.warning(message)
    if requeue:
        run.guard.emit("requeue", message, step=state.step)
    return EXIT_REQUEUE if requeue else EXIT_STOPPED


def log_window(
    run: Components, state: TrainState, window: list[StepResult], elapsed_s: float
) -> dict[str, Any]:
    """Log the steps of `window` (`elapsed_s` in all): one metrics record (returned) and
    the log line. Stragglers and OOM risk show on rank 0: the window's stats are every
    rank's."""
    total = run.total_steps
    record = {
        "total_steps": total,
        "tokens": state.tokens,
        **window_record(
            window,
            elapsed_s,
            run.comm,
            run.engine.peak_memory_gb(),
            run.mfu,
            run.job.data.seq_len,
        ),
        "epoch": run.feed.state_dict()["epoch"],
        **run.guard.counts(),  # skipped_steps, loss_spikes, rollbacks
    }
    sp = run.job.deepspeed.sequence_parallel_size
    if sp > 1:  # tokens_per_s_per_device divides by every rank, SP ranks included
        record["sequence_parallel_size"] = sp
    run.metrics.log(state.step, record)
    threshold = run.job.train.expert_load_alert
    if threshold is not None and record.get("expert_load_max", 0.0) > threshold:
        run.guard.emit(
            "expert_collapse",
            f"MoE router collapsing: the busiest expert got {record['expert_load_max']:.0%} of "
            f"a layer's tokens (train.expert_load_alert {threshold:.0%})",
            step=state.step,
        )
    eta_s = record["step_time_s"] * (total - state.step)
    log.info(
        "step %d/%d | loss %.4f | lr %.2e | grad %.2f | %.0f tok/s | %.2f s/step | eta %s",
        state.step,
        total,
        record["loss"],
        record["lr"],
        record["grad_norm"],
        record["tokens_per_s"],
        record["step_time_s"],
        hms(eta_s),
    )
    return record


def _evaluate(run: Components, state: TrainState) -> bool:
    """Eval on the val split; keep the best checkpoint; True when early stopping fires."""
    run.guard.beat(state.step, "eval")
    loss = run.evaluator.evaluate(run.engine)
    ppl = math.exp(min(loss, 50.0))
    run.metrics.log(state.step, {"eval_loss": loss, "eval_ppl": ppl})
    log.info("eval step %d | loss %.4f | ppl %.2f", state.step, loss, ppl)
    if state.best_eval_loss is None or loss < state.best_eval_loss:
        before = (state.best_eval_loss, state.best_step, state.evals_without_improvement)
        state.best_eval_loss, state.best_step = loss, state.step
        state.evals_without_improvement = 0
        if not _save(run, state, best=True):  # meta records this step as the best
            # not saved (a bad step): the best is still the old one
            state.best_eval_loss, state.best_step, state.evals_without_improvement = before
        return False
    state.evals_without_improvement += 1
    patience = run.job.train.early_stopping_patience
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


def _save(run: Components, state: TrainState, *, best: bool = False) -> bool:
    """A checkpoint of the state after `state.step` (`best`: the best eval loss so far);
    False (nothing saved) while the last step was bad."""
    return run.checkpointer.save(
        state, run.feed.state_dict(), run.guard.health_state(), run.guard.healthy, best=best
    )


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


def _record_run(job: TrainJob, tokenizer_dir: Path, fresh: bool) -> None:
    import yaml

    paths = RunDir(job.run.dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write(paths.config, yaml.safe_dump(job.resolved, sort_keys=False))
    if fresh or not paths.tokenizer.is_dir():  # usable without the data dir
        copy_tokenizer(tokenizer_dir, paths.tokenizer)
