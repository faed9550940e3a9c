"""MFU of a ~1B-parameter GPT on one GPU: bf16, ZeRO-2, gptrain's training step.

    python bench/mfu.py [--steps 20] [--micro-batch 8] [--layers 20] [--hidden 2048]

Needs a CUDA GPU (skips with a message elsewhere). Data is random token ids in
a prepared dataset (content does not change FLOPs). MFU counts 6·N + 12·L·H·T
FLOPs per token (training/flops.py) against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    import torch

    from launcher.config import load_config, train_job
    from training.flops import peak_tflops
    from training.trainer import build_runner

    overrides = [
        f"data.sources=[{{path: {args.data}}}]", f"run.dir={args.run_dir}", "data.seq_len=1024",
        f"model.config={{n_layer: {args.layers}, n_head: {args.hidden // 128}, "
        f"n_embd: {args.hidden}, n_positions: 1024}}",
        f"model.activation_checkpointing={str(args.checkpointing).lower()}",
        f"train.micro_batch_size={args.micro_batch}", "train.grad_accum_steps=1",
        "train.global_batch_size=null", "train.max_steps=100000", "train.resume=never",
        "deepspeed.zero_stage=2", "deepspeed.precision=bf16", "launch.nproc_per_node=1",
    ]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "demo-cpu.yaml", overrides)
    runner = build_runner(train_job(cfg))
    n_params = sum(p.numel() for p in runner.engine.module.parameters())
    for step in range(3):
        runner.train_step(step)
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = 0
    for step in range(args.steps):
        tokens += runner.train_step(step)["tokens"]
    torch.cuda.synchronize()
    elapsed_s = time.perf_counter() - start
    tokens_per_s = tokens / elapsed_s
    flops = runner.flops_per_token
    device = torch.cuda.get_device_name()
    peak = peak_tflops(device)
    print(f"device         : {device}")
    print(f"model          : {n_params / 1e9:.2f}B params, {args.layers} layers × {args.hidden}")
    print(f"batch          : {args.micro_batch} × 1024 tokens, ZeRO-2, bf16, "
          f"activation checkpointing {args.checkpointing}")  # fmt: skip
    print(f"tokens/s       : {tokens_per_s:,.0f}")
    print(f"model TFLOP/s  : {tokens_per_s * flops / 1e12:.1f}")
    print(f"peak memory    : {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if peak is None:
        print("MFU            : unknown (device not in training/flops.py)")
    else:
        print(f"MFU            : {tokens_per_s * flops / (peak * 1e12):.1%} of {peak:.0f} TFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--data")
    parser.add_argument("--run-dir")
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    import torch

    if not torch.cuda.is_available():
        print("bench/mfu.py: no CUDA GPU here; skipped")
        return
    from sharding.shards import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        tok_dir.mkdir()
        (tok_dir / "tokenizer.json").write_text("{}")
        ids = np.random.default_rng(0).integers(0, 50257, size=2**24, dtype=np.uint16)
        data = write_dataset(Path(tmp) / "data", {"train": ids}, tokenizer_dir=tok_dir,
                             vocab_size=50257, eos_id=50256)  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=1", __file__, "--steps", str(args.steps),
               "--micro-batch", str(args.micro_batch), "--layers", str(args.layers),
               "--hidden", str(args.hidden), "--data", str(data),
               "--run-dir", str(Path(tmp) / "run"),
               *(["--checkpointing"] if args.checkpointing else [])]  # fmt: skip
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
