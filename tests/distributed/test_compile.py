"""`model.compile` on CPU ranks (inductor's C++ backend): the compiled engine trains on
eager's loss curve, with no graph break, under ZeRO-2 (whole model and per block) and
ZeRO-3 (per block: GPT-2 with LoRA, a Llama), activation checkpointing on; a compiled
run stopped by a signal resumes onto the same curve.

The same checks run in bf16 on a GPU (tests/gpu); here fp32 makes them tight: compiled
kernels reorder fp32 sums, which moves a loss by ~1e-6, where a wrong gradient moves it
by > 1e-2 within a few steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.conftest import check, compiled_graphs, losses, tiny_config, torchrun

pytestmark = pytest.mark.dist
FP32_LOSS_ABS_TOL = 1e-4
STEPS = 6


def _config(
    tmp_path: Path, prepared: Path, name: str, stage: int, compile_: object, **model: object
) -> Path:
    return tiny_config(
        tmp_path,
        prepared,
        name,
        model={
            "config": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64},
            "dropout": 0.0,
            "activation_checkpointing": True,
            "compile": compile_,
            **model,
        },
        train={"max_steps": STEPS, "log_every": 1, "eval_every": 100, "save_every": 100},
        deepspeed={"zero_stage": stage, "precision": "fp32"},
    )


LLAMA = {
    "config": {
        "type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 64,
    }
}


@pytest.mark.parametrize(
    ("stage", "mode", "compiled", "model"),
    [(2, True, "model", {}), (2, "blocks", "blocks", {}), (3, True, "blocks", LLAMA)],
)
def test_compiled_training_matches_eager(
    tmp_path: Path, prepared: Path, stage: int, mode: object, compiled: str, model: dict
) -> None:
    """Under ZeRO-3 the whole model compiles block by block (each a ZeRO-3 leaf): the
    ZeRO-3 hooks stay outside the graphs, so there is no graph break, checkpointing too
    (and a Llama's rotary embeddings, GQA and document masks of packed windows)."""
    check(torchrun(2, _config(tmp_path, prepared, "eager", stage, False, **model)))
    run = torchrun(2, _config(tmp_path, prepared, "compiled", stage, mode, **model))
    check(run)
    assert f"model.compile: torch.compile of the {compiled}" in run.stdout
    assert compiled_graphs(run.stdout) == 1, run.stdout[-3000:]  # every block: one graph
    eager, fast = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(fast) == list(range(1, STEPS + 1))
    assert eager[STEPS] < eager[1] - 0.3  # it trains at all
    for step in range(1, STEPS + 1):
        assert fast[step] == pytest.approx(eager[step], abs=FP32_LOSS_ABS_TOL), step


def test_compiled_lora_matches_eager_under_zero3(
    tmp_path: Path, prepared: Path, base: Path
) -> None:
    lora = {
        "name_or_path": str(base),
        "peft": {
            "method": "lora",
            "r": 8,
            "alpha": 16,
            "target_modules": ["c_attn", "c_proj", "c_fc"],
        },
    }
    check(torchrun(2, _config(tmp_path, prepared, "eager", 3, False, **lora)))
    run = torchrun(2, _config(tmp_path, prepared, "compiled", 3, True, **lora))
    check(run)
    assert compiled_graphs(run.stdout) == 1, run.stdout[-3000:]
    eager, fast = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(fast) == list(range(1, STEPS + 1)) and eager[STEPS] < eager[1]
    for step in range(1, STEPS + 1):
        assert fast[step] == pytest.approx(eager[step], abs=FP32_LOSS_ABS_TOL), step


@pytest.mark.parametrize("stage", [2, 3])
def test_compiled_run_resumes_after_a_signal(tmp_path: Path, prepared: Path, stage: int) -> None:
    check(torchrun(2, _config(tmp_path, prepared, "full", stage, True)))
    split = _config(tmp_path, prepared, "split", stage, True)
    stopped = torchrun(2, split, env={"GPTRAIN_FAULT_SIGNAL_AT_STEP": "0:3"})
    assert stopped.returncode != 0
    check(torchrun(2, split))
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(4, STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], abs=FP32_LOSS_ABS_TOL), step
