"""Fixtures for 2-rank CPU tests: a prepared corpus, a saved tiny pretrained GPT-2 and a
tiny-GPT config writer, and helpers reading a run's output."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "hen", "elk"]
VERBS = ["jumps over", "sleeps near", "looks at", "runs past", "sits on"]
THINGS = ["the red fence", "a quiet river", "the old barn", "a green hill", "the tall tree"]


def write_corpus(path: Path, documents: int = 600, seed: int = 0) -> Path:
    """A small corpus with learnable structure, so a tiny model's loss clearly drops."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(documents):
            sentences = [
                f"The {rng.choice(ANIMALS)} {rng.choice(VERBS)} {rng.choice(THINGS)}."
                for _ in range(rng.randint(2, 6))
            ]
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sharding.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    corpus = write_corpus(root / "corpus.jsonl")
    out = root / "shards"
    prepare(
        [str(corpus)],
        out,
        train_tokenizer_vocab=400,
        val_fraction=0.05,
        workers=1,
        seed=0,
        progress=False,
    )
    return out


def tiny_config(tmp_path: Path, data_dir: Path, name: str = "run", **sections: Any) -> Path:
    """Write a tiny-GPT config (fast on 2 CPU cores); `sections` update the defaults."""
    cfg: dict[str, Any] = {
        "run": {"dir": str(tmp_path / name), "seed": 7},
        "model": {
            "config": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64},
            "dropout": 0.0,
            "activation_checkpointing": True,
        },
        "data": {"sources": [{"path": str(data_dir)}], "seq_len": 32},
        "train": {
            "micro_batch_size": 4,
            "grad_accum_steps": 2,
            "max_steps": 30,
            "learning_rate": 3e-3,
            "min_lr": 3e-4,
            "lr_warmup_steps": 5,
            "grad_clip": 1.0,
            "log_every": 1,
            "eval_every": 10,
            "eval_steps": 2,
            "save_every": 10,
            "keep_last": 3,
        },
        "deepspeed": {"zero_stage": 2, "precision": "bf16"},
        "launch": {"nproc_per_node": 2},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node NPROC ARGS...`: one
    node's ranks, as every test and bench launches them."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *args,
    ]


def torchrun(
    nproc: int,
    config: Path,
    *overrides: str,
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m launcher.cli train CONFIG --set ...`."""
    cmd = torchrun_command(
        nproc, "-m", "launcher.cli", "train", str(config), *(f"--set={o}" for o in overrides)
    )
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=full_env
    )


@contextlib.contextmanager
def launched(
    config: Path, *sets: str, env: dict[str, str] | None = None, at_step: int = 2
) -> Iterator[subprocess.Popen]:
    """`gptrain launch CONFIG` in the background, yielded once it has logged `at_step`
    (its run dir is the config's); killed on the way out if still running."""
    run_dir = Path(yaml.safe_load(config.read_text())["run"]["dir"])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "launch",
            str(config),
            *(f"--set={s}" for s in sets),
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not any("loss" in r and r["step"] >= at_step for r in metrics(run_dir)):
            assert time.monotonic() < deadline and proc.poll() is None, "never trained"
            time.sleep(0.3)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    from training.observe.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def check(result: subprocess.CompletedProcess, code: int = 0) -> None:
    assert result.returncode == code, (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
        f"--- stderr\n{result.stderr[-4000:]}"
    )


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """The run failed with exit 2 and ONE `error:` line holding every fragment, no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory, prepared: Path) -> Path:
    """A tiny random GPT-2 saved as a local HF model dir with the shards' tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sharding.manifest import load_manifest

    manifest = load_manifest(prepared)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=manifest.vocab_size,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=manifest.eos_id,
        eos_token_id=manifest.eos_id,
    )
    out = tmp_path_factory.mktemp("base") / "gpt2-tiny"
    GPT2LMHeadModel(config).save_pretrained(out)
    for file in manifest.tokenizer_dir.iterdir():
        shutil.copy(file, out / file.name)
    return out


def compiled_graphs(stdout: str) -> int | None:
    """The graph count the trainer logs after its first compiled step; None if it logged
    graph breaks (or nothing)."""
    found = re.search(r"model\.compile: (\d+) graph\(s\), 0 graph break\(s\)", stdout)
    return int(found.group(1)) if found else None
