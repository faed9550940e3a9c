"""`gptrain plan` against what training really allocates: planned/measured per rank.

    python bench/plan_accuracy.py [--precision bf16|fp32] [--stages 0 1 2 3]   # ~4 min on 2 cores

Relaunches itself under torchrun (2 ranks, CPU unless CUDA is there) once per ZeRO
stage; each launch builds the real trainer (`training.trainer.build_components`) for a few
small models (two GPT-2 shapes, one Llama shape saved as a pretrained dir) with
seq_len 128, micro-batch 4, accumulation 2, and compares with `launcher.plan`'s
figures for the same config. Goals: model states within ±20%, activations ±35%.

Measured, per rank (the larger of the two ranks):
- model states: after a backward in the middle of an accumulation window (gradients
  held, optimizer state allocated), every live tensor storage, each counted once:
  parameters (incl. ZeRO-3 partitions), gradients (`.grad` and the ZeRO optimizer's
  gradient partitions), optimizer (fp32 master copies and Adam moments). Reduce
  buckets and other tensors are left out: the plan counts them as buffers.
- activations: the peak memory of one micro-batch's forward + backward above the
  memory before it (gradients already allocated by the previous micro-batch), with
  activation checkpointing off, then on. On CPU this is the RSS high-water mark
  (reset through /proc/self/clear_refs) with glibc forced to mmap every allocation
  over 64 KiB, so freed tensors leave RSS at once; on CUDA it is
  `torch.cuda.max_memory_allocated` over `memory_allocated`. That peak also holds the
  plan's temporary buffers (ZeRO-2/3 gradients in flight, ZeRO-3 gathered parameters,
  the reduce bucket), so it is compared with planned activations + buffers; the bench
  shrinks the reduce and prefetch buckets (deepspeed.extra) so activations dominate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 2000
MODELS = {  # name: model section overrides
    "gpt2 4x256": ["model.config={n_layer: 4, n_head: 4, n_embd: 256, n_positions: 256}"],
    "gpt2 2x512": ["model.config={n_layer: 2, n_head: 8, n_embd: 512, n_positions: 256}"],
    "llama 2x256": ["model.name_or_path={llama}"],
}
SMALL_BUCKETS = (
    "deepspeed.extra={zero_optimization: {reduce_bucket_size: 200000, "
    "stage3_prefetch_bucket_size: 200000}}"
)


def _save_llama(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(path)


# --- measuring (inside each rank) ----------------------------------------------------------


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class Memory:
    """Current and peak bytes since `reset()`: CUDA allocator stats, else RSS."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()

    def reset(self) -> int:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return _status_bytes("VmRSS")

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_bytes("VmHWM")


def model_state_bytes(runner) -> dict[str, int]:
    """Live storages of parameters, gradients and optimizer state, each counted once."""
    import torch

    seen: set[int] = set()
    sizes = {"params": 0, "grads": 0, "optimizer": 0}

    def add(t, kind: str) -> None:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            sizes[kind] += t.untyped_storage().nbytes()

    def walk(obj, kind: str, depth: int = 0) -> None:
        if isinstance(obj, torch.Tensor):
            add(obj, kind)
        elif isinstance(obj, (list, tuple)) and depth < 3:
            for x in obj:
                walk(x, kind, depth + 1)
        elif isinstance(obj, dict) and depth < 3:
            for x in obj.values():
                walk(x, kind, depth + 1)

    engine = runner.engine.ds
    zero = engine.optimizer
    for p in engine.module.parameters():
        add(getattr(p, "ds_tensor", None), "params")
        add(p, "params")
    basic = getattr(zero, "optimizer", zero)
    for master, state in basic.state.items():
        add(master, "optimizer")
        walk(state, "optimizer")
    for p in engine.module.parameters():
        add(p.grad, "grads")
    for name, value in vars(zero).items():
        if "grad" in name.lower() and "bucket" not in name.lower():
            walk(value, "grads")
    return sizes


def accumulation_window(runner, memory: Memory) -> tuple[int, dict[str, int]]:
    """One optimizer step of two micro-batches: the model states while gradients are
    held after the first, and the activation peak of the second's forward + backward."""
    engine = runner.engine.ds
    first, second = next(runner.feed.batches), next(runner.feed.batches)
    engine.backward(runner.engine.token_loss_sum(first))
    engine.step()  # not a boundary: gradients are held
    states = model_state_bytes(runner)
    base = memory.reset()
    engine.backward(runner.engine.token_loss_sum(second))
    peak = memory.peak() - base
    engine.step()  # the boundary: optimizer step
    return peak, states


def measure(cfg, name: str, memory: Memory) -> dict:
    from launcher.config import train_job
    from launcher.plan import build_report
    from training.trainer import build_components

    runner = build_components(train_job(cfg))
    # from_pretrained returns the model in eval mode, where HF skips checkpointing; the
    # trainer switches to train mode only after its first evaluation
    runner.engine.ds.train()
    runner.stepper.run(0)  # optimizer state exists from the first step on
    accumulation_window(runner, memory)  # warm-up
    act_off, states = accumulation_window(runner, memory)
    runner.engine.ds.module.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    accumulation_window(runner, memory)  # warm the checkpointed path
    act_on, _ = accumulation_window(runner, memory)
    activations = {False: act_off, True: act_on}
    plan = build_report(cfg, name).plan
    runner.metrics.finish()  # not close(): it leaves the process group, needed for the next model
    del runner
    gc.collect()
    return {
        "model": name,
        "states": sum(states.values()),
        "states_detail": states,
        "plan_states": plan.model_state_bytes,
        "act_off": activations[False],
        "act_on": activations[True],
        "plan_act_off": plan.activations_no_ckpt_bytes + plan.buffers_bytes,
        "plan_act_on": plan.activations_ckpt_bytes + plan.buffers_bytes,
    }


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from launcher.config import load_config

    memory = Memory()
    rows = []
    for name, model_overrides in MODELS.items():
        overrides = [
            f"data.sources=[{{path: {args.data}}}]",
            f"run.dir={args.run_dir}/{len(rows)}",
            "train.resume=never",
            "train.max_steps=1000",
            f"deepspeed.zero_stage={args.stage}",
            f"deepspeed.precision={args.precision}",
            "launch.nproc_per_node=2",
            "data.seq_len=128",
            "train.micro_batch_size=4",
            "train.grad_accum_steps=2",
            "model.activation_checkpointing=false",
            "tracking.wandb.mode=disabled",
            SMALL_BUCKETS,
            *(o.replace("{llama}", args.llama) for o in model_overrides),
        ]
        cfg = load_config(ROOT / "configs" / "demo-cpu.yaml", overrides)
        start_s = time.perf_counter()
        row = measure(cfg, name, memory)
        print(f"{name}: {time.perf_counter() - start_s:.1f} s", file=sys.stderr)
        mine = torch.tensor([row["states"], row["act_off"], row["act_on"]], dtype=torch.float64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        row["states"], row["act_off"], row["act_on"] = (int(x) for x in mine.tolist())
        rows.append(row)
    if int(os.environ["RANK"]) == 0:
        Path(args.out).write_text(json.dumps(rows))


# --- driver --------------------------------------------------------------------------------


def _cell(planned: int, measured: int) -> str:
    """`planned/measured MiB  ratio`, 24 characters."""
    mib = 2**20
    pair = f"{planned / mib:.1f}/{measured / mib:.1f}"
    return f"{pair:>15} {planned / measured:>6.2f}  "


def _table(results: dict[int, list[dict]], precision: str, device: str) -> None:
    print(
        f"planned / measured per rank (MiB, ratio): 2 ranks, {precision}, {device}, "
        "seq_len 128, micro-batch 4"
    )
    print(
        f"{'model':<13}{'ZeRO':>4}  {'model states':>22}  {'act+buf ckpt off':>22}  "
        f"{'act+buf ckpt on':>22}"
    )
    worst = {"states": 0.0, "act": 0.0}
    for stage, rows in results.items():
        for r in rows:
            worst["states"] = max(worst["states"], abs(r["plan_states"] / r["states"] - 1))
            for key in ("act_off", "act_on"):
                worst["act"] = max(worst["act"], abs(r[f"plan_{key}"] / r[key] - 1))
            print(
                f"{r['model']:<13}{stage:>4}  {_cell(r['plan_states'], r['states'])}"
                f"{_cell(r['plan_act_off'], r['act_off'])}"
                f"{_cell(r['plan_act_on'], r['act_on'])}"
            )
    print(
        f"largest deviation: model states {worst['states']:.0%} (goal ≤ 20%), "
        f"activations + buffers {worst['act']:.0%} (goal ≤ 35%)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        help="default: fp32 on CPU (bf16 is ~5x slower without AVX512-BF16), bf16 on CUDA",
    )
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    for hidden in ("--data", "--run-dir", "--llama", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    import torch

    if args.precision is None:
        args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        from sharding.prepare import prepare
        from tests.distributed.conftest import write_corpus

        write_corpus(tmp / "corpus.jsonl", documents=3000)
        prepare(
            [str(tmp / "corpus.jsonl")],
            tmp / "data",
            train_tokenizer_vocab=VOCAB,
            val_fraction=0.0,
            workers=1,
            progress=False,
        )
        _save_llama(tmp / "llama")
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MALLOC_MMAP_THRESHOLD_": "65536",
            "PYTHONWARNINGS": "ignore",
        }
        results = {}
        for stage in args.stages:
            out = tmp / f"stage{stage}.json"
            from tests.distributed.conftest import torchrun_command

            cmd = torchrun_command(
                2,
                __file__,
                "--stage",
                str(stage),
                "--precision",
                args.precision,
                "--data",
                str(tmp / "data"),
                "--run-dir",
                str(tmp / f"run{stage}"),
                "--llama",
                str(tmp / "llama"),
                "--out",
                str(out),
            )
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            results[stage] = json.loads(out.read_text())
        device = "CUDA memory stats" if torch.cuda.is_available() else "CPU (RSS, tensor sizes)"
        _table(results, args.precision, device)


if __name__ == "__main__":
    main()
