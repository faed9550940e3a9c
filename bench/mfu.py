"""MFU of a ~1B-parameter GPT on one GPU: gptrain's training step against a plain
compiled PyTorch loop on the same shape and batch, in one run, and their ratio.

    python bench/mfu.py                                  # 1.11B GPT-2 shape, micro-batch 8 and 16
    python bench/mfu.py --family llama                   # configs/llama-1b.yaml's shape (1.08B)
    python bench/mfu.py --family qwen3                   # the same shape as Qwen3 (q/k norms)
    python bench/mfu.py --micro-batch 16 --zero-stage 3
    python bench/mfu.py --checkpointing 1.0              # activation checkpointing, every block
    python bench/mfu.py --compile false                  # gptrain eager (reference compiled)
    python bench/mfu.py --micro-batch 16 --profile out/  # + torch.profiler of 3 more steps
    python bench/mfu.py --zero-stage 3 --no-reference    # gptrain only

Needs a CUDA GPU (skips with a message elsewhere). Data is random token ids in a
prepared dataset (content does not change FLOPs; no EOS, so document masking changes
nothing). Both sides build the model with `training.models.build.fresh_hf_config` from the same
`model.config` and count FLOPs with the trainer's `model_flops_per_token` (6·N + 12·L·H·T,
training/models/flops.py) against the device's dense bf16 peak. The reference loop is
the fastest plain recipe we know: fp32 weights under bf16 autocast, sdpa attention,
torch fused AdamW, gradient clipping, `torch.compile` of the whole model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEQ_LEN = 1024
VOCAB = 50257
WARMUP_STEPS = 5  # compilation and allocator warm-up happen here


def model_config(args: argparse.Namespace) -> dict:
    """`model.config` of the measured shape: GPT-2 of --layers × --hidden, or for any other
    `--family` (a transformers model_type: llama, qwen3, ...) the ~1B shape of
    configs/llama-1b.yaml as that type (--layers / --hidden override its sizes)."""
    if args.family == "gpt2":
        layers, hidden = args.layers or 20, args.hidden or 2048
        return {
            "n_layer": layers,
            "n_head": hidden // 128,
            "n_embd": hidden,
            "n_positions": SEQ_LEN,
        }
    from launcher.config import load_config

    arch = {**load_config(ROOT / "configs" / "llama-1b.yaml").model.config, "type": args.family}
    if args.layers:
        arch["num_hidden_layers"] = args.layers
    if args.hidden:
        arch["hidden_size"] = args.hidden
        arch.pop("intermediate_size", None)  # derived from the hidden size
    return arch


def gptrain_worker(args: argparse.Namespace) -> dict:
    """gptrain's step (DeepSpeed engine, loss head, compile as configured)."""
    import torch

    from launcher.config import load_config, train_job
    from training.trainer import build_components

    ckpt = args.checkpointing is not None
    overrides = [
        f"data.sources=[{{path: {args.data}}}]",
        f"run.dir={args.run_dir}",
        f"data.seq_len={SEQ_LEN}",
        f"model.config={json.dumps(model_config(args))}",
        f"model.activation_checkpointing={str(ckpt).lower()}",
        f"model.activation_checkpointing_fraction={args.checkpointing or 1.0}",
        f"model.compile={args.compile}",
        f"train.micro_batch_size={args.micro_batch}",
        "train.grad_accum_steps=1",
        "train.global_batch_size=null",
        "train.max_steps=100000",
        "train.resume=never",
        f"deepspeed.zero_stage={args.zero_stage}",
        "deepspeed.precision=bf16",
        "launch.nproc_per_node=1",
        "tracking.wandb.mode=disabled",
    ]
    cfg = load_config(ROOT / "configs" / "demo-cpu.yaml", overrides)
    run = build_components(train_job(cfg))
    for step in range(WARMUP_STEPS):
        run.stepper.run(step)
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = sum(run.stepper.run(step).tokens for step in range(args.steps))
    torch.cuda.synchronize()
    result = _result(tokens / (time.perf_counter() - start), run.engine.n_params, run.pre.hf_config)
    if args.profile:
        _profile(lambda i: run.stepper.run(args.steps + i), Path(args.profile))
    return result


def _profile(step: Callable[[int], object], out: Path, steps: int = 3) -> None:
    """torch.profiler over `steps` more steps (after the timed ones): the top kernels and
    ops by GPU time as a table, and the Chrome trace, gzipped, beside it."""
    import gzip
    import shutil

    import torch
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    (out / "profile_top_ops.txt").write_text(table)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    with trace.open("rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    print(table, flush=True)


def reference_worker(args: argparse.Namespace) -> dict:
    """The plain PyTorch loop: the same HF model, batch and FLOPs formula."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.config import load_config
    from training.models.build import fresh_hf_config

    torch.manual_seed(0)
    overrides = ["train.micro_batch_size=1", f"model.config={json.dumps(model_config(args))}"]
    model_section = load_config(None, overrides).model
    config = fresh_hf_config(model_section, vocab_size=VOCAB, eos_id=VOCAB - 1)
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(config).cuda().train()
    if args.checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    compiled = torch.compile(model)
    ids = torch.randint(0, VOCAB, (args.micro_batch, SEQ_LEN), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    tokens = args.steps * args.micro_batch * SEQ_LEN
    return _result(tokens / (time.perf_counter() - start), n_params, config)


def _result(tokens_per_s: float, n_params: int, hf_config: object) -> dict:
    import torch

    from training.models.flops import model_flops_per_token, peak_tflops

    flops = model_flops_per_token(hf_config, n_params, SEQ_LEN)
    peak = peak_tflops(torch.cuda.get_device_name())
    return {
        "device": torch.cuda.get_device_name(),
        "n_params": n_params,
        "tokens_per_s": tokens_per_s,
        "tflops": tokens_per_s * flops / 1e12,
        "mfu": tokens_per_s * flops / (peak * 1e12) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def _run(role: str, args: argparse.Namespace, data: Path, run_dir: Path) -> dict | None:
    """One measurement in its own process (a fresh GPU, compile cache and allocator)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=1",
        __file__,
        "--role",
        role,
        "--steps",
        str(args.steps),
        "--micro-batch",
        str(args.micro_batch),
        "--family",
        args.family,
        "--zero-stage",
        str(args.zero_stage),
        "--compile",
        args.compile,
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
    ]
    if args.checkpointing:
        cmd += ["--checkpointing", str(args.checkpointing)]
    if args.profile and role == "gptrain":
        cmd += ["--profile", str(Path(args.profile) / f"micro{args.micro_batch}")]
    for flag, value in (("--layers", args.layers), ("--hidden", args.hidden)):
        cmd += [flag, str(value)] if value else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"{role}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def _line(name: str, r: dict | None) -> str:
    if r is None:
        return f"{name:<28} failed"
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    return (
        f"{name:<28} {r['tokens_per_s']:>10,.0f} tok/s  {r['tflops']:6.1f} TFLOP/s  "
        f"MFU {mfu:>6}  peak {r['peak_memory_gib']:5.1f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--family", default="gpt2", help="gpt2, or any model_type: llama, qwen3")
    parser.add_argument("--layers", type=int, default=None, help="default: gpt2 20, llama 16")
    parser.add_argument("--hidden", type=int, default=None, help="default: 2048")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--compile", default="auto", help="model.compile: auto|true|false|blocks")
    parser.add_argument(
        "--checkpointing",
        type=float,
        default=None,
        help="activation checkpointing of this fraction of blocks (1.0: all)",
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="measure gptrain only (no plain loop)"
    )
    parser.add_argument("--profile", help="folder for a torch.profiler table and trace")
    parser.add_argument("--role", choices=["gptrain", "reference"])
    parser.add_argument("--data")
    parser.add_argument("--run-dir")
    args = parser.parse_args()
    if args.role:  # inside torchrun
        (args.micro_batch,) = args.micro_batch
        worker = gptrain_worker if args.role == "gptrain" else reference_worker
        result = worker(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
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
        ids = np.random.default_rng(0).integers(0, VOCAB - 1, size=2**24, dtype=np.uint16)
        data = write_dataset(
            Path(tmp) / "data",
            {"train": ids},
            tokenizer_dir=tok_dir,
            vocab_size=VOCAB,
            eos_id=VOCAB - 1,
        )
        ckpt = f"{args.checkpointing:g} of blocks" if args.checkpointing else "off"
        print(
            f"shape: {args.family} {json.dumps(model_config(args))}, seq {SEQ_LEN}, bf16, 1 GPU; "
            f"gptrain ZeRO-{args.zero_stage}, compile {args.compile}, checkpointing {ckpt}"
        )
        for micro in args.micro_batch:
            one = argparse.Namespace(**{**vars(args), "micro_batch": micro})
            print(f"micro-batch {micro}:", flush=True)
            ours = _run("gptrain", one, data, Path(tmp) / f"run{micro}")
            print("  " + _line("gptrain", ours), flush=True)  # kept if the reference is cut
            if args.no_reference:
                continue
            ref = _run("reference", one, data, Path(tmp) / f"ref{micro}")
            print("  " + _line("plain PyTorch + compile", ref), flush=True)
            if ours and ref:
                ratio = ours["tokens_per_s"] / ref["tokens_per_s"]
                print(f"  ratio gptrain / reference: {ratio:.2f}")


if __name__ == "__main__":
    main()
