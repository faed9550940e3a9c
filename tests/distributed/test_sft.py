"""Supervised fine-tuning on prompt→completion data, 2 CPU ranks: the same trainer, loss on
completions only, token counts without the masked prompts, and generation-quality eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.distributed.conftest import check, metrics, tiny_config, torchrun

pytestmark = pytest.mark.dist

CAPITALS = {
    "Zorbia": "Velmar",
    "Kettle": "Tosk",
    "Amaran": "Brin",
    "Dusk": "Orrow",
    "Ferro": "Pell",
    "Glim": "Quade",
    "Holt": "Ssiv",
    "Ivar": "Umber",
}


def qa_pair(land: str) -> dict[str, str]:
    return {
        "prompt": f"Q: What is the capital of {land}?\nA:",
        "completion": f" The capital of {land} is {CAPITALS[land]}.",
    }


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A table of made-up capitals as prompt→completion records, and the eval prompts."""
    from sharding.prepare import prepare

    root = tmp_path_factory.mktemp("qa")
    records = [qa_pair(land) for _ in range(60) for land in CAPITALS]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "eval.jsonl").write_text("".join(json.dumps(qa_pair(x)) + "\n" for x in CAPITALS))
    prepare(
        [str(root / "train.jsonl")],
        root / "data",
        train_tokenizer_vocab=320,
        val_fraction=0.0,
        workers=1,
        progress=False,
        format="prompt-completion",
    )
    return root / "data", root / "eval.jsonl"


def qa_config(tmp_path: Path, data: Path, name: str, **train: object) -> Path:
    return tiny_config(
        tmp_path,
        data,
        name,
        data={"sources": [{"path": str(data)}], "seq_len": 64},
        train={
            "max_steps": 160,
            "learning_rate": 3e-3,
            "eval_every": 1000,
            "save_every": 160,
            **train,
        },
        deepspeed={"zero_stage": 2, "precision": "fp32"},
    )


def generation_scores(model: Path, prompts: Path, samples: Path) -> dict:
    out = run_cli(
        "evaluate",
        str(model),
        "--generate",
        "--prompts",
        str(prompts),
        "--samples",
        str(samples),
        "--max-new-tokens",
        "16",
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def untrained_model(data: Path, out: Path) -> Path:
    """The tiny architecture of `tiny_config`, randomly initialised, as an HF model dir."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sharding.manifest import load_manifest

    m = load_manifest(data)
    config = GPT2Config(
        vocab_size=m.vocab_size,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=m.eos_id,
        eos_token_id=m.eos_id,
    )
    GPT2LMHeadModel(config).save_pretrained(out)
    for file in m.tokenizer_dir.iterdir():
        shutil.copy(file, out / file.name)
    return out


def test_fine_tuning_learns_the_qa_table(qa_data: tuple[Path, Path], tmp_path: Path) -> None:
    data, prompts = qa_data
    run = tmp_path / "sft"
    check(torchrun(2, qa_config(tmp_path, data, "sft")))
    before = generation_scores(
        untrained_model(data, tmp_path / "fresh"), prompts, tmp_path / "before.jsonl"
    )
    after = generation_scores(run, prompts, tmp_path / "after.jsonl")
    assert before["exact_match"] == 0.0 and before["bleu"] < 10
    assert after["exact_match"] >= 0.75 and after["bleu"] > 60 and after["rouge_l"] > 0.8
    samples = [json.loads(line) for line in (tmp_path / "after.jsonl").read_text().splitlines()]
    assert len(samples) == len(CAPITALS) and set(samples[0]) == {"prompt", "reference", "generated"}
    # The loss only ever saw completions: the model answers, it does not echo questions.
    assert all(not s["generated"].lstrip().startswith("Q:") for s in samples)


def test_logged_tokens_count_only_completion_targets(
    qa_data: tuple[Path, Path], tmp_path: Path
) -> None:
    """tokens and tokens/s count loss targets, not the masked prompt tokens of a batch."""
    from sharding.config import DataConfig, SourceConfig
    from sharding.loader import IGNORE_INDEX, build_loader

    data, _ = qa_data
    run = tmp_path / "count"
    check(torchrun(2, qa_config(tmp_path, data, "count", max_steps=6, save_every=6)))
    rows = [r for r in metrics(run) if "loss" in r]
    logged = np.diff([0] + [r["tokens"] for r in rows])
    cfg = DataConfig(sources=[SourceConfig(str(data))], seq_len=64)
    expected = np.zeros(6, dtype=np.int64)
    for rank in (0, 1):
        loader = build_loader(
            cfg, split="train", rank=rank, world_size=2, micro_batch_size=4, seed=7
        )
        batches = iter(loader)
        for step in range(6):
            for _ in range(2):  # grad_accum_steps
                expected[step] += int((next(batches)["labels"] != IGNORE_INDEX).sum())
    assert logged.tolist() == expected.tolist()
    assert 0 < expected.sum() < 6 * 16 * 64 * 0.7  # prompts and cut-off records are left out
    for row, tokens in zip(rows, logged, strict=True):
        assert row["tokens_per_s"] == pytest.approx(tokens / row["step_time_s"], rel=1e-6)


def test_sft_without_room_for_prompts_fails_clearly(
    qa_data: tuple[Path, Path], tmp_path: Path
) -> None:
    data, _ = qa_data
    config = tiny_config(
        tmp_path, data, "short", data={"sources": [{"path": str(data)}], "seq_len": 4}
    )
    result = torchrun(2, config, "train.max_steps=3")
    assert result.returncode != 0
    assert "raise data.seq_len" in result.stdout + result.stderr
