"""Step time of gptrain's training step vs a bare DeepSpeed loop (same model, batch, ranks),
and the overhead of tracking every step (metrics.jsonl + W&B offline) vs not logging.

    python bench/step_overhead.py [--steps 20] [--ranks 2] [--stage 2] [--document-mask off]
    python bench/step_overhead.py --document-mask compare [--seq-len 1024]

Relaunches itself under torchrun. Both loops run in the same processes, bare loop
first, on the same tiny GPT-2, ZeRO stage, bf16 and micro-batch/accumulation.
Goals: ratio (gptrain / bare) ≤ 1.05; tracking at log_every=1 ≤ 2% of step time.
`--document-mask on|off` (data.document_mask; both loops pass per-document position_ids);
`--document-mask compare` instead times gptrain's step with the loader's per-document
position_ids and without them (plain causal attention), interleaved in one process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _corpus(path: Path) -> None:
    from tests.distributed.conftest import write_corpus

    write_corpus(path, documents=3000)


def _bare_loop(run, steps: int) -> float:
    """The textbook DeepSpeed loop on the same engine and loader: forward with labels
    (HF's mean loss), backward, step."""
    from sharding.loader import document_positions

    engine = run.engine.ds
    start = time.perf_counter()
    for _ in range(steps):
        for _ in range(run.layout.grad_accum_steps):
            batch = next(run.feed.batches)
            ids = batch["input_ids"].to(engine.device)
            eos = run.engine.document_eos  # data.document_mask: positions as gptrain's
            positions = None if eos is None else document_positions(ids, eos)
            out = engine(input_ids=ids, labels=ids, position_ids=positions)
            engine.backward(out.loss)
            engine.step()
    return (time.perf_counter() - start) / steps


def _ours(run, steps: int) -> float:
    start = time.perf_counter()
    for step in range(steps):
        run.stepper.run(step)
    return (time.perf_counter() - start) / steps


def _ours_logging_every_step(run, steps: int) -> tuple[float, float]:
    """A step plus the full per-step logging path: reductions, metrics.jsonl, W&B.

    Returns (seconds per step, seconds of it spent inside the logging call)."""
    from training.checkpoint.store import TrainState
    from training.trainer import log_window

    state = TrainState()
    logging_s = 0.0
    start = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        result = run.stepper.run(step)
        state.step += 1
        t1 = time.perf_counter()
        log_window(run, state, [result], t1 - t0)
        logging_s += time.perf_counter() - t1
    return (time.perf_counter() - start) / steps, logging_s / steps


def _mask_cost(run, steps: int, seq_len: int) -> None:
    """gptrain's step with document masking (position_ids from the engine) and without
    (the same batches, no position_ids), interleaved; prints tokens/s of each."""
    eos = run.engine.document_eos
    timings: dict[str, list[float]] = {"on": [], "off": []}
    for round_ in range(4):  # alternate which goes first, so drift favours neither
        for mode in ("on", "off")[:: 1 if round_ % 2 == 0 else -1]:
            run.engine.document_eos = eos if mode == "on" else None
            timings[mode].append(_ours(run, steps))
    run.engine.document_eos = eos
    if run.env.is_main:
        tokens = run.layout.global_batch_size * seq_len
        on, off = min(timings["on"]), min(timings["off"])
        print(f"document mask on  : {on * 1000:8.1f} ms/step, {tokens / on:,.0f} tokens/s")
        print(f"document mask off : {off * 1000:8.1f} ms/step, {tokens / off:,.0f} tokens/s")
        print(f"tokens/s on / off : {off / on:8.3f}  (best of 4 × {steps} each, interleaved)")


def _max_over_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def worker(args: argparse.Namespace) -> None:
    from launcher.config import load_config, train_job
    from training.trainer import build_components

    overrides = [
        f"data.sources=[{{path: {args.data}}}]",
        f"run.dir={args.run_dir}",
        "train.max_steps=1000",
        "train.resume=never",
        f"deepspeed.zero_stage={args.stage}",
        f"launch.nproc_per_node={args.nproc}",
        "model.activation_checkpointing=false",
        f"deepspeed.precision={args.precision}",
        f"tracking.wandb.mode={args.wandb}",
        "tracking.wandb.log_every=1",
        f"data.document_mask={args.document_mask != 'off'}",
        *(
            [
                f"data.seq_len={args.seq_len}",
                f"model.config.n_positions={max(args.seq_len, 256)}",
                "train.micro_batch_size=2",
            ]
            if args.seq_len
            else []
        ),
    ]
    cfg = load_config(ROOT / "configs" / "demo-cpu.yaml", overrides)
    run = build_components(train_job(cfg))
    if args.document_mask == "compare":
        _ours(run, 2)
        _mask_cost(run, args.steps, cfg.data.seq_len)
        return
    _bare_loop(run, 2)  # warm-up every path
    _ours(run, 2)
    _ours_logging_every_step(run, 2)
    bare_s, ours_s, logged_s, inside_s = [], [], [], []
    for _ in range(3):  # interleave to share any drift of the machine
        bare_s.append(_bare_loop(run, args.steps))
        ours_s.append(_ours(run, args.steps))
        step_s, log_s = _ours_logging_every_step(run, args.steps)
        logged_s.append(step_s)
        inside_s.append(log_s / step_s)
    # The slowest rank's share: the logging call holds a collective every rank waits in.
    direct = _max_over_ranks(sum(inside_s) / len(inside_s))
    if run.env.is_main:
        bare, ours, logged = min(bare_s), min(ours_s), min(logged_s)
        print(
            f"ranks {run.env.world_size}, ZeRO-{args.stage}, {args.precision}, global batch "
            f"{run.layout.global_batch_size} × seq {cfg.data.seq_len}"
        )
        print(f"bare DeepSpeed loop : {bare * 1000:8.1f} ms/step (best of 3 × {args.steps})")
        tokens = run.layout.global_batch_size * cfg.data.seq_len
        print(
            f"gptrain step        : {ours * 1000:8.1f} ms/step, {tokens / ours:,.0f} tokens/s "
            f"(document mask {args.document_mask})"
        )
        print(f"ratio               : {ours / bare:8.3f}  (goal ≤ 1.05)")
        print(f"+ logging each step : {logged * 1000:8.1f} ms/step (jsonl, W&B {args.wandb})")
        print(
            f"tracking overhead   : {direct:8.2%} of step time inside the logging call"
            f" (mean of 3, slowest rank; goal ≤ 2%)"
        )
        print(
            f"  difference of the two loops' step times: {logged / ours - 1:+.1%} (noisy on a"
            " shared CPU: both loops differ only by that call)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ranks", dest="nproc", type=int, default=2)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--wandb", default="offline", choices=["offline", "disabled"])
    parser.add_argument("--document-mask", default="on", choices=["on", "off", "compare"])
    parser.add_argument("--seq-len", type=int, help="data.seq_len (micro-batch 2); default 128")
    parser.add_argument("--data")
    parser.add_argument("--run-dir")
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        from sharding.prepare import prepare

        corpus = Path(tmp) / "corpus.jsonl"
        _corpus(corpus)
        prepare(
            [str(corpus)],
            Path(tmp) / "data",
            train_tokenizer_vocab=2000,
            val_fraction=0.0,
            workers=1,
            progress=False,
        )
        from tests.distributed.conftest import torchrun_command

        cmd = torchrun_command(
            args.nproc,
            __file__,
            "--steps",
            str(args.steps),
            "--stage",
            str(args.stage),
            "--ranks",
            str(args.nproc),
            "--precision",
            args.precision,
            "--wandb",
            args.wandb,
            "--document-mask",
            args.document_mask,
            *(["--seq-len", str(args.seq_len)] if args.seq_len else []),
            "--data",
            str(Path(tmp) / "data"),
            "--run-dir",
            str(Path(tmp) / "run"),
        )
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    main()
