"""On a CUDA GPU: the trainer runs bf16 ZeRO-2 with nccl and the loss drops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.distributed.conftest import check, losses, tiny_config, torchrun

pytestmark = pytest.mark.gpu


def test_gpu_bf16_zero2_trains(tmp_path: Path, prepared: Path) -> None:
    config = tiny_config(
        tmp_path, prepared, launch={"nproc_per_node": 1},
        deepspeed={"zero_stage": 2, "precision": "bf16"},
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["DS_ACCELERATOR"] = "cuda"
    check(torchrun(1, config, env=env))
    curve = losses(tmp_path / "run")
    assert curve[30] < curve[1] - 1.5
