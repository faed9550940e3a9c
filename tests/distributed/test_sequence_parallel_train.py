"""Sequence parallelism through the trainer (`deepspeed.sequence_parallel_size: 2`): the
same global batch of packed documents trains to the same loss at every step as one rank
without SP, a run saved with SP=2 resumes on one rank without it, and back."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.conftest import check, losses, metrics, tiny_config, torchrun
from tests.tiny import tiny_arch
from training.checkpoint.store import latest_checkpoint

pytestmark = pytest.mark.dist

STEPS = 10
CASES = [("gpt2", 2), ("llama", 3), ("qwen3", 2)]


def _config(
    tmp_path: Path, prepared: Path, name: str, family: str, stage: int, **model: Any
) -> Path:
    arch: dict[str, Any] = tiny_arch(family, **({"n_positions": 64} if family == "gpt2" else {}))
    return tiny_config(
        tmp_path,
        prepared,
        name,
        model={"config": arch, "activation_checkpointing": False, **model},
        data={"seq_len": 32},
        train={"max_steps": STEPS, "save_every": 5, "eval_every": 100, "grad_accum_steps": 2},
        deepspeed={"zero_stage": stage, "precision": "fp32"},
    )


@pytest.mark.parametrize(("family", "stage"), CASES)
def test_sp2_trains_as_one_rank_and_resumes_across_sp_sizes(
    tmp_path: Path, prepared: Path, family: str, stage: int
) -> None:
    one = _config(tmp_path, prepared, "one", family, stage)
    check(torchrun(1, one, "launch.nproc_per_node=1"))
    sp = _config(tmp_path, prepared, "sp", family, stage)
    result = torchrun(2, sp, "deepspeed.sequence_parallel_size=2")
    check(result)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "sp")
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert b[step] == pytest.approx(a[step], rel=1e-4), f"step {step}"
    assert b[STEPS] < b[1] - 0.5  # it learns

    # The SP=2 checkpoint of step 5 resumes on one rank without SP, and the one-rank
    # run's under SP=2 on 2 ranks: the same later losses.
    for source, name, ranks, sets in (
        ("sp", "resumed", 1, ("launch.nproc_per_node=1",)),
        ("one", "back", 2, ("deepspeed.sequence_parallel_size=2",)),
    ):
        step5 = tmp_path / source / "checkpoints" / "step_000005"
        config = _config(tmp_path, prepared, name, family, stage)
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        shutil.copytree(step5, tmp_path / name / "checkpoints" / step5.name)
        check(torchrun(ranks, config, *sets))
        c = losses(tmp_path / name)
        assert sorted(c) == list(range(6, STEPS + 1)), name
        for step in range(6, STEPS + 1):
            assert c[step] == pytest.approx(a[step], rel=1e-4), f"{name}: step {step}"
        assert latest_checkpoint(tmp_path / name / "checkpoints").name == f"step_{STEPS:06d}"


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_sp2_times_dp2_on_4_ranks_trains_as_dp2(
    tmp_path: Path, prepared: Path, family: str, stage: int
) -> None:
    dp = _config(tmp_path, prepared, "dp", family, stage)
    check(torchrun(2, dp, "train.save_every=100"))
    both = _config(tmp_path, prepared, "both", family, stage)
    sets = ("deepspeed.sequence_parallel_size=2", "launch.nproc_per_node=4")
    check(torchrun(4, both, *sets, "train.save_every=100"))
    a, b = losses(tmp_path / "dp"), losses(tmp_path / "both")
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert b[step] == pytest.approx(a[step], rel=1e-4), f"step {step}"
    record = [r for r in metrics(tmp_path / "both") if "loss" in r][-1]
    assert record["sequence_parallel_size"] == 2
    assert record["tokens_per_s_per_device"] == pytest.approx(record["tokens_per_s"] / 4)


def test_bad_layouts_are_refused_in_one_line(tmp_path: Path, prepared: Path) -> None:
    # before training: 2 heads over 4 SP ranks, a window of 30 over 4
    bad = _config(tmp_path, prepared, "bad", "llama", 2)
    sp4 = ("deepspeed.sequence_parallel_size=4", "launch.nproc_per_node=4")
    heads = torchrun(4, bad, *sp4, "model.config.num_attention_heads=2", "model.config.head_dim=16")
    assert heads.returncode != 0 and "must divide the model's 2 attention heads" in heads.stderr
    window = torchrun(4, bad, *sp4, "data.seq_len=30")
    assert window.returncode != 0 and "does not divide data.seq_len 30" in window.stderr


# The other ZeRO stage of each family of CASES, each with long-window memory savers (and
# per-block compile) on the SP side only: none of them changes a loss.
SAVER_CASES = [
    (
        "gpt2",
        3,
        {
            "activation_checkpointing": True,
            "activation_checkpointing_offload": True,
            "tiled_mlp": True,
            "tiled_mlp_shards": 4,
        },
    ),
    ("llama", 2, {"tiled_mlp": True, "tiled_mlp_shards": 4, "compile": "blocks"}),
    ("qwen3", 3, {"activation_checkpointing": True}),
]


@pytest.mark.parametrize(("family", "stage", "savers"), SAVER_CASES)
def test_sp2_with_memory_savers_trains_as_one_rank_without(
    tmp_path: Path, prepared: Path, family: str, stage: int, savers: dict[str, Any]
) -> None:
    # A bad step (NaN loss on rank 0 of the SP group only) is skipped by the guard on both
    # ranks, as on one rank: the health guard sees the SP group's verdict.
    nan = {"GPTRAIN_FAULT_NAN_AT_STEPS": "0:4"}
    one = _config(tmp_path, prepared, "one", family, stage)
    check(torchrun(1, one, "launch.nproc_per_node=1", "train.save_every=100", env=nan))
    sp = _config(tmp_path, prepared, "sp", family, stage, **savers)
    check(torchrun(2, sp, "deepspeed.sequence_parallel_size=2", "train.save_every=100", env=nan))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "sp")
    assert sorted(b) == sorted(a) and len(b) >= STEPS - 1
    for step in b:
        if step != 4:  # step 4's loss is NaN on both
            assert b[step] == pytest.approx(a[step], rel=1e-4), f"step {step}"
    for run in ("one", "sp"):
        last = [r for r in metrics(tmp_path / run) if "skipped_steps" in r][-1]
        assert last["skipped_steps"] == 1, (run, last)


def test_a_rank_hung_during_the_all_to_all_is_caught(tmp_path: Path, prepared: Path) -> None:
    config = _config(tmp_path, prepared, "hang", "llama", 2)
    result = torchrun(
        2,
        config,
        "deepspeed.sequence_parallel_size=2",
        "train.hang_timeout_s=5",
        "train.collective_timeout_s=120",
        env={"GPTRAIN_FAULT_SLEEP_IN_STEP": "1:3:300"},
    )
    assert result.returncode != 0
    rank0 = (tmp_path / "hang" / "logs" / "rank0.log").read_text()
    assert "hang: rank 0 made no progress" in rank0 and "at step 3" in rank0, rank0[-3000:]
    # rank 0 waits for rank 1 inside Ulysses' all-to-all of the first attention layer
    assert "ulysses_sp.py" in rank0, rank0[-3000:]
