"""Per-rank memory of one long-window training step: sequence parallelism (DeepSpeed-
Ulysses, `deepspeed.sequence_parallel_size`) SP=2 on 2 ranks vs SP=1 on 1 rank.

    python bench/long_context.py [--seq-len 8192] [--steps 2] [--savers]
    python bench/long_context.py --max-window-budget-gb 2 [--max-search-window 16384]

`--savers` turns on the long-window memory savers in every configuration: tiled MLPs
(`model.tiled_mlp`, one slice per 1024 tokens) and activation checkpointing of every
block; compare its figures with a run without.

Both configurations train the same fresh 2-layer llama (hidden 128, 4 heads, 2 kv heads,
head_dim 32), fp32, ZeRO-2, no activation checkpointing, document masking on, micro-batch
1 and no accumulation: the same global batch of one window (SP=2 on 2 ranks is one data-
parallel replica whose two ranks hold half of the window each). Each configuration runs
in its own fresh torchrun. Goal: per-rank peak SP=2 / SP=1 <= 0.6.

How the step's memory is measured. CPU: the step's peak increase over the rank's
resident memory just before it. One warm-up step at the same window first (it allocates
the optimizer's state and DeepSpeed's buffers, and pages in every kernel), then before
each measured step the kernel's high-water mark of the process (VmHWM) is reset to its
current resident size (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), so
VmHWM after the step - VmRSS before it is exactly the step's peak, whatever the process
did earlier (`ru_maxrss` cannot be reset: it would still hold the warm-up's peak). Large
tensors come from mmap and go back to the OS when freed, so resident memory follows live
tensors. Where clear_refs is refused, the fallback measures the first step, without a
warm-up, as `ru_maxrss` after it - VmRSS before it (valid when that step sets the
process's high-water mark; flagged "cold"). CUDA: torch.cuda.max_memory_allocated after
reset_peak_memory_stats, minus memory_allocated before the step. Each figure is the max
over ranks (all_reduce MAX) and over the `--steps` measured steps; step time is the
median over them of the slowest rank.

What is compared is each configuration as gptrain builds it: SP=1 is the model's own
sdpa attention (transformers builds one [B,1,L,L] document mask per forward, which
sdpa keeps as an L × L float for backward in every layer); SP=2 is Ulysses around
`training.parallel.sequence.document_attention`, which on CPU runs causal sdpa per
document without any mask (O(L) memory) on heads/2 of the heads. The ratio therefore
mixes two effects: the sequence split (activations ÷ 2) and the mask-free core; for
this small model the second dominates.

`--max-window-budget-gb G` also searches, for SP=1 and SP=2, the longest window (doubling
from 1024, up to `--max-search-window`, default 16384) whose per-rank step peak stays
under G GiB: one fresh torchrun per point (the main measurement's is reused), about 4.5
minutes more on 2 slow CPU cores at the default cap; past 16K a CPU step takes minutes
and its O(L^2) masks tens of GiB, so the search stops there unless raised.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024**3
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
CONFIGS = ((1, 1), (2, 2))  # (sequence_parallel_size, ranks)


# --- memory probes ------------------------------------------------------------------------


def _rss_bytes() -> int:
    """Resident memory of this process now (/proc/self/statm: pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


def _hwm_bytes() -> int:
    """The kernel's high-water mark of this process's resident memory (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def _reset_hwm() -> bool:
    """Reset VmHWM to the current resident size; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _measured_step(run, step: int, method: str) -> tuple[float, float, float]:
    """(peak increase over the memory before the step, that peak in all, seconds) of
    optimizer step `step`, bytes; `method`: "cuda", "hwm" or "cold" (module docstring)."""
    import gc

    import torch

    gc.collect()
    if method == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        if method == "hwm":
            _reset_hwm()
        before = _rss_bytes()
    start = time.perf_counter()
    run.stepper.run(step)
    if method == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if method == "cuda":
        peak = torch.cuda.max_memory_allocated()
    elif method == "hwm":
        peak = _hwm_bytes()
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak - before, peak, seconds


def _max_over_ranks(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if torch.cuda.is_available():
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


# --- one configuration (one torchrun) --------------------------------------------------------


def _overrides(args: argparse.Namespace) -> list[str]:
    model = (
        "{type: llama, num_hidden_layers: 2, hidden_size: 128, num_attention_heads: 4, "
        "num_key_value_heads: 2, head_dim: 32, intermediate_size: 256, "
        f"max_position_embeddings: {args.seq_len}}}"
    )
    return [
        f"data.sources=[{{path: {args.data}}}]",
        f"run.dir={args.run_dir}",
        f"model.config={model}",
        f"model.activation_checkpointing={str(args.savers).lower()}",
        f"model.tiled_mlp={str(args.savers).lower()}",
        f"model.tiled_mlp_shards={max(1, args.seq_len // args.sp // 1024)}",
        f"data.seq_len={args.seq_len}",
        "data.document_mask=true",
        "train.max_steps=1000",
        "train.resume=never",
        "train.micro_batch_size=1",
        "train.grad_accum_steps=1",
        "train.async_save=false",
        "deepspeed.zero_stage=2",
        "deepspeed.precision=fp32",
        f"deepspeed.sequence_parallel_size={args.sp}",
        f"launch.nproc_per_node={args.world}",
        "tracking.wandb.mode=disabled",
    ]


def worker(args: argparse.Namespace) -> None:
    import torch

    from launcher.config import load_config, train_job
    from training.trainer import build_components

    cfg = load_config(ROOT / "configs" / "demo-cpu.yaml", _overrides(args))
    run = build_components(train_job(cfg))
    method = "cuda" if torch.cuda.is_available() else "hwm" if _reset_hwm() else "cold"
    step = 0
    if method != "cold":
        run.stepper.run(step)  # warm-up: optimizer state, buffers, kernels paged in
        step += 1
    increases, peaks, times = [], [], []
    for _ in range(args.steps if method != "cold" else 1):
        increase, peak, seconds = _max_over_ranks(list(_measured_step(run, step, method)))
        increases.append(increase)
        peaks.append(peak)
        times.append(seconds)
        step += 1
    if run.env.is_main:
        result = {
            "sp": args.sp,
            "ranks": run.env.world_size,
            "dp": run.env.world_size // args.sp,
            "global_batch": run.layout.global_batch_size,
            "seq_len": cfg.data.seq_len,
            "method": method,
            "step_peak_gib": max(increases) / GIB,
            "process_peak_gib": max(peaks) / GIB,
            "step_s": statistics.median(times),
        }
        Path(args.result).write_text(json.dumps(result))


# --- the driver ------------------------------------------------------------------------------


def _measure(args: argparse.Namespace, tmp: Path, data: Path, sp: int, ranks: int, seq_len: int):
    """Run one configuration in a fresh torchrun (once: the search reuses the main
    measurement); its result dict (rank 0's)."""
    result = tmp / f"result-sp{sp}-{seq_len}.json"
    if result.exists():
        return json.loads(result.read_text())
    from tests.distributed.conftest import torchrun_command

    cmd = torchrun_command(
        ranks,
        __file__,
        "--worker",
        f"--data={data}",
        f"--run-dir={tmp / f'run-sp{sp}-{seq_len}'}",
        f"--result={result}",
        f"--world={ranks}",
        f"--sp={sp}",
        f"--seq-len={seq_len}",
        f"--steps={args.steps}",
        *(["--savers"] if args.savers else []),
    )
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return json.loads(result.read_text())


def _prepare(tmp: Path, longest_window: int) -> Path:
    """A corpus of a few windows of `longest_window` tokens, tokenized (2000-token vocab)."""
    from sharding.prepare import prepare
    from tests.distributed.conftest import write_corpus

    # ~35 tokens a document: room for 8 windows of the longest length
    corpus = write_corpus(tmp / "corpus.jsonl", documents=max(3000, longest_window // 4))
    data = tmp / "data"
    prepare(
        [str(corpus)],
        data,
        train_tokenizer_vocab=2000,
        val_fraction=0.0,
        workers=1,
        progress=False,
    )
    return data


def _line(r: dict) -> str:
    cold = "" if r["method"] != "cold" else "  (cold first step: ru_maxrss)"
    return (
        f"SP={r['sp']} on {r['ranks']} rank{'s' if r['ranks'] > 1 else ''} (dp {r['dp']}): "
        f"step peak {r['step_peak_gib']:6.3f} GiB/rank, process peak "
        f"{r['process_peak_gib']:6.3f} GiB, step {r['step_s']:7.2f} s{cold}"
    )


def _search(args, tmp: Path, data: Path, sp: int, ranks: int) -> int | None:
    """Longest window (doubling from 1024, up to --max-search-window) whose step peak
    stays under the budget; None when even 1024 does not."""
    best, seq_len = None, 1024
    while seq_len <= args.max_search_window:
        r = _measure(args, tmp, data, sp, ranks, seq_len)
        print(f"  window {seq_len:6d}: {_line(r)}", flush=True)
        if r["step_peak_gib"] >= args.max_window_budget_gb:
            break
        best, seq_len = seq_len, seq_len * 2
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=8192, help="data.seq_len (the window)")
    p.add_argument("--steps", type=int, default=2, help="measured steps after the warm-up")
    p.add_argument("--max-window-budget-gb", type=float, help="also search the longest window")
    p.add_argument("--max-search-window", type=int, default=16384)
    p.add_argument(
        "--savers", action="store_true", help="tiled MLPs and activation checkpointing on"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sp", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    # before the test helpers are imported: they default DeepSpeed to the CPU accelerator
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    searching = args.max_window_budget_gb is not None
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        data = _prepare(tmp, max(args.seq_len, args.max_search_window if searching else 0))
        results = {sp: _measure(args, tmp, data, sp, ranks, args.seq_len) for sp, ranks in CONFIGS}
        one, two = results[1], results[2]
        print(
            f"\nwindow {args.seq_len}, global batch {one['global_batch']} window, fp32, ZeRO-2, "
            f"llama 2 × 128 (4 heads, 2 kv), peak = max over ranks and {args.steps} steps, "
            f"memory savers {'on (tiled MLPs, activation checkpointing)' if args.savers else 'off'}"
        )
        print(_line(one))
        print(_line(two))
        ratio = two["step_peak_gib"] / one["step_peak_gib"]
        print(f"step peak ratio SP=2 / SP=1: {ratio:6.3f}  (goal <= 0.6)")
        print(f"step time ratio SP=2 / SP=1: {two['step_s'] / one['step_s']:6.3f}")
        if searching:
            for sp, ranks in CONFIGS:
                print(f"longest window under {args.max_window_budget_gb:g} GiB/rank, SP={sp}:")
                best = _search(args, tmp, data, sp, ranks)
                print(f"  -> {best if best else 'none (1024 is over budget)'}", flush=True)


if __name__ == "__main__":
    main()
