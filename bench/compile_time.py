"""What `model.compile` costs and buys: whole-model vs per-block torch.compile under
ZeRO-2 and ZeRO-3, against eager, on the same model, batch and ranks.

    python bench/compile_time.py                       # 20 tiny GPT-2 blocks, 2 CPU ranks
    python bench/compile_time.py --layers 20 --hidden 2048 --seq-len 1024 --micro-batch 8
                                                       # on a CUDA GPU: 1 rank, bf16

Each run is `gptrain train` under torchrun with a cold inductor cache. Printed per
run: the first step's time (tracing and compiling happen there), the mean of the
later steps, their ratio to eager's, and the graphs / graph breaks the trainer logs.
Under ZeRO-3 `model.compile: true` compiles block by block (training.models.build.compile_target),
each block also gathered whole by ZeRO-3 (eager gathers per submodule): its ratio holds
both. The data is a small corpus with a 400-token vocabulary, so the LM head is small
(a whole-model compile's fusion of the loss head is not in these figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from training.run.paths import RunDir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RUNS = [
    ("eager", 2, False),
    ("model", 2, True),
    ("blocks", 2, "blocks"),
    ("eager", 3, False),
    ("blocks", 3, True),
]


def _prepare(root: Path) -> Path:
    from sharding.prepare import prepare
    from tests.distributed.conftest import write_corpus

    out = root / "shards"
    corpus = write_corpus(root / "corpus.jsonl", documents=3000)
    prepare(
        [str(corpus)],
        out,
        train_tokenizer_vocab=400,
        val_fraction=0.01,
        workers=1,
        seed=0,
        progress=False,
    )
    return out


def _config(
    args: argparse.Namespace,
    root: Path,
    data: Path,
    name: str,
    stage: int,
    compile_: object,
    cuda: bool,
) -> Path:
    cfg = {
        "run": {"dir": str(root / name), "seed": 0},
        "model": {
            "config": {
                "n_layer": args.layers,
                "n_head": max(1, args.hidden // 64),
                "n_embd": args.hidden,
                "n_positions": args.seq_len,
            },
            "dropout": 0.0,
            "activation_checkpointing": True,
            "compile": compile_,
        },
        "data": {"sources": [{"path": str(data)}], "seq_len": args.seq_len},
        "train": {
            "micro_batch_size": args.micro_batch,
            "grad_accum_steps": 1,
            "max_steps": args.steps,
            "log_every": 1,
            "eval_every": 10**6,
            "save_every": 10**6,
            "lr_warmup_steps": 1,
        },
        "deepspeed": {"zero_stage": stage, "precision": "bf16" if cuda else "fp32"},
        "tracking": {"wandb": {"mode": "disabled"}},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config: Path, root: Path, ranks: int) -> dict:
    run_dir = Path(yaml.safe_load(config.read_text())["run"]["dir"])
    cold_cache = str(root / f"inductor-{run_dir.name}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": cold_cache}
    from tests.distributed.conftest import torchrun_command

    cmd = torchrun_command(
        ranks,
        "-m",
        "launcher.cli",
        "train",
        str(config),
    )
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{config.name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    steps = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    times = [r["step_time_s"] for r in steps if "step_time_s" in r]
    log = RunDir(run_dir).rank_log(0).read_text()
    graphs = next(
        (ln.split("model.compile: ")[1] for ln in log.splitlines() if "graph break" in ln), "-"
    )
    return {"first_s": times[0], "step_s": sum(times[1:]) / len(times[1:]), "graphs": graphs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps: at least 2 (the first compiles, the rest are timed)")
    import torch

    cuda = torch.cuda.is_available()
    ranks = 1 if cuda else 2
    os.environ["DS_ACCELERATOR"] = "cuda" if cuda else "cpu"
    print(
        f"{args.layers} GPT-2 blocks × {args.hidden}, seq {args.seq_len}, micro-batch "
        f"{args.micro_batch}, {ranks} {'GPU' if cuda else 'CPU'} rank(s), "
        "activation checkpointing"
    )
    print(f"{'compile':8} {'ZeRO':>4} {'first step s':>12} {'step s':>8} {'vs eager':>8}  graphs")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = _prepare(root)
        eager: dict[int, float] = {}
        for name, stage, mode in RUNS:
            config = _config(args, root, data, f"{name}-{stage}", stage, mode, cuda)
            result = _run(config, root, ranks)
            eager.setdefault(stage, result["step_s"])
            print(
                f"{name:8} {stage:>4} {result['first_s']:>12.1f} {result['step_s']:>8.3f} "
                f"{eager[stage] / result['step_s']:>7.2f}×  {result['graphs']}"
            )


if __name__ == "__main__":
    main()
