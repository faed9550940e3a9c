"""How long a checkpoint stalls the step loop: background writes (`train.async_save`)
vs the blocking save, and what training pays while a write is in flight.

    python bench/checkpoint_stall.py [--ranks 2] [--stage 2] [--layers 12] [--saves 3]

Relaunches itself under torchrun. One run, one engine (GPT-2 of `--layers` × 768, fp32,
so its DeepSpeed checkpoint is ~16 bytes per parameter), alternating:
  blocking: `train.async_save: false`, every file written (and fsynced) in the step
            loop; the stall is the whole save;
  async:    gptrain's background writer; the stall is the step loop's share, as the
            checkpointer reports it (`checkpoint_stall_s`): queueing the files, waiting
            before the next optimizer step for the copy to host memory (which overlaps
            forward and backward), the per-step polls and the publish.
Between saves it trains `--steps-between` steps, timing each, with and without a write
in flight. The first round allocates the host copies the writer keeps for the next
saves: shown, not counted. Prints per-save stalls (max over ranks) and
  stall ratio = mean async stall / mean blocking save    (goal <= 0.2)
  step-time overhead while a write is in flight           (in-flight / idle step time)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _max_over_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _save(run, step: int) -> None:
    from training.checkpoint.store import TrainState

    state = TrainState(step=step)
    run.checkpointer.save(state, run.feed.state_dict(), run.guard.health_state(), True)


def _step(run, step: int) -> float:
    start = time.perf_counter()
    run.stepper.run(step)
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> None:
    from launcher.config import load_config, train_job
    from training.checkpoint.writer import background_writer, install
    from training.trainer import build_components

    overrides = [
        f"data.sources=[{{path: {args.data}}}]",
        f"run.dir={args.run_dir}",
        "train.max_steps=100000",
        "train.resume=never",
        "train.keep_last=1",
        "train.micro_batch_size=1",
        "train.grad_accum_steps=1",
        "train.async_save=true",
        "data.seq_len=64",
        f"deepspeed.zero_stage={args.stage}",
        "deepspeed.precision=fp32",
        f"launch.nproc_per_node={args.world}",
        "model.activation_checkpointing=false",
        "model.config.n_embd=768",
        "model.config.n_head=12",
        f"model.config.n_layer={args.layers}",
        "tracking.wandb.mode=disabled",
    ]
    cfg = load_config(ROOT / "configs" / "demo-cpu.yaml", overrides)
    run = build_components(train_job(cfg))
    ds, writer = run.engine.ds, run.engine.writer
    blocking_engine = background_writer(run.env.rank, background=False)
    blocking_engine.zipfile_serialization = writer.zipfile_serialization
    main = run.env.is_main
    step = 0
    for _ in range(2):  # warm-up
        _step(run, step)
        step += 1
    blocking, stalls, idle_steps, busy_steps = [], [], [], []
    for k in range(args.saves + 1):  # the first allocates the host copies: shown, not counted
        # blocking save (train.async_save false): the step loop waits for every file
        install(ds, blocking_engine)
        run.checkpointer.writer = None
        start = time.perf_counter()
        _save(run, step)
        blocking.append(_max_over_ranks(time.perf_counter() - start))
        for _ in range(args.steps_between):
            idle_steps.append(_max_over_ranks(_step(run, step)))
            step += 1
        # async save: the stall is every moment the step loop spends on it, as the
        # checkpointer counts it (its metric `checkpoint_stall_s`)
        install(ds, writer)
        run.checkpointer.writer = writer
        _save(run, step)
        while run.checkpointer.in_flight is not None:
            busy_steps.append(_max_over_ranks(_step(run, step)))
            step += 1
            run.checkpointer.poll(step)
        stalls.append(_max_over_ranks(run.checkpointer.last_stall_s))
        if main:
            print(
                f"save {k}{' (first: allocates the host copies, not counted)' if k == 0 else ''}"
                f": blocking {blocking[-1]:6.2f} s | async stall {stalls[-1]:6.2f} s",
                flush=True,
            )
        if k == 0:
            blocking, stalls, idle_steps, busy_steps = [], [], [], []
    if main:
        ratio = statistics.mean(stalls) / statistics.mean(blocking)
        idle, busy = statistics.median(idle_steps), statistics.median(busy_steps)
        print(f"blocking save        : {statistics.mean(blocking):6.2f} s (mean of {args.saves})")
        print(f"async stall          : {statistics.mean(stalls):6.2f} s (mean of {args.saves})")
        print(f"stall ratio          : {ratio:6.3f}  (goal <= 0.2)")
        print(f"step, nothing writing: {idle:6.3f} s (median of {len(idle_steps)})")
        print(f"step, write in flight: {busy:6.3f} s (median of {len(busy_steps)})")
        print(f"step-time overhead   : {busy / idle:6.3f}x while a write is in flight")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--steps-between", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        from sharding.prepare import prepare
        from tests.distributed.conftest import write_corpus

        corpus = write_corpus(Path(tmp) / "corpus.jsonl", documents=2000)
        data = Path(tmp) / "data"
        prepare(
            [str(corpus)],
            data,
            train_tokenizer_vocab=2000,
            val_fraction=0.0,
            workers=1,
            progress=False,
        )
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        env.setdefault("OMP_NUM_THREADS", "1")
        from tests.distributed.conftest import torchrun_command

        cmd = torchrun_command(
            args.ranks,
            __file__,
            "--worker",
            f"--data={data}",
            f"--run-dir={Path(tmp) / 'run'}",
            f"--world={args.ranks}",
            f"--stage={args.stage}",
            f"--layers={args.layers}",
            f"--saves={args.saves}",
            f"--steps-between={args.steps_between}",
        )
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)


if __name__ == "__main__":
    main()
