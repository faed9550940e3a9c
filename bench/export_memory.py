"""Peak RAM of `gptrain export` against the model itself in fp32, per ZeRO stage.

    python bench/export_memory.py                    # GPT-2 shape, 8 layers × 768 (63M params)
    python bench/export_memory.py --layers 12 --stages 3

For each stage: train one step on 1 rank (torchrun) to get a real DeepSpeed
checkpoint, then sample the RSS of `gptrain export RUN --out DIR`. The baseline,
measured the same way in the same run, is a process that builds the same HF
model in fp32 and saves it with `save_pretrained`: the memory any export needs.
The ratio says what export costs beyond that (reading the checkpoint's fp32
master weights lazily, tensor by tensor).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from prepare import peak_rss  # noqa: E402  (bench/prepare.py)


def model_config(layers: int, width: int) -> dict:
    return {"n_layer": layers, "n_head": width // 64, "n_embd": width, "n_positions": 128}


def train_one_step(root: Path, data: Path, stage: int, layers: int, width: int) -> Path:
    """A run dir with the checkpoint of one ZeRO-`stage` step on 1 rank."""
    run = root / f"run_zero{stage}"
    config = {
        "run": {"dir": str(run), "seed": 0},
        "model": {"config": model_config(layers, width), "activation_checkpointing": False},
        "data": {"sources": [{"path": str(data)}], "seq_len": 64},
        "train": {
            "micro_batch_size": 1,
            "grad_accum_steps": 1,
            "max_steps": 1,
            "save_every": 1,
            "eval_every": 1000,
            "log_every": 1,
        },
        "deepspeed": {"zero_stage": stage, "precision": "bf16"},
        "launch": {"nproc_per_node": 1},
    }
    path = root / f"zero{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    from tests.distributed.conftest import torchrun_command

    cmd = torchrun_command(
        1,
        "-m",
        "launcher.cli",
        "train",
        str(path),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"training failed:\n{result.stderr[-3000:]}")
    return run


def main() -> None:
    """Print peak RSS of export and of the fp32 baseline, per stage, and their ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    args = p.parse_args()
    from safetensors.torch import load_file

    from sharding.demo_corpus import write_corpus
    from sharding.manifest import load_manifest
    from sharding.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "demo.jsonl"
        write_corpus(corpus)
        data = root / "data"
        prepare([str(corpus)], data, train_tokenizer_vocab=8192, workers=1, progress=False)
        vocab = load_manifest(data).vocab_size
        shape = model_config(args.layers, args.width)
        baseline_code = (
            "import torch; from transformers import GPT2Config, GPT2LMHeadModel;"
            f" m = GPT2LMHeadModel(GPT2Config(vocab_size={vocab}, **{shape!r}));"
            f" m.save_pretrained({str(root / 'baseline')!r})"
        )
        _, base_mb, _ = peak_rss([sys.executable, "-c", baseline_code])
        weights = load_file(str(root / "baseline" / "model.safetensors"))
        params = sum(t.numel() for t in weights.values())
        del weights
        print(
            f"GPT-2 {args.layers} layers × {args.width}, vocab {vocab}: {params / 1e6:.1f}M"
            f" params ({params * 4 / 2**20:.0f} MB in fp32)"
        )
        print(f"baseline (build fp32 model + save_pretrained): peak RSS {base_mb:7.0f} MB")
        for stage in args.stages:
            run = train_one_step(root, data, stage, args.layers, args.width)
            cmd = [
                sys.executable,
                "-m",
                "launcher.cli",
                "export",
                str(run),
                "--out",
                str(root / f"export_zero{stage}"),
            ]
            _, export_mb, _ = peak_rss(cmd)
            print(
                f"export of a ZeRO-{stage} checkpoint:                peak RSS {export_mb:7.0f} MB,"
                f" ratio {export_mb / base_mb:.2f}"
            )


if __name__ == "__main__":
    main()
