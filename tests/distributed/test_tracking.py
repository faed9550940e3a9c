"""Tracking on 2 CPU ranks: one offline W&B run per job that survives a stop + resume,
metrics.jsonl fields, no API key in any file, and `gptrain plot`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.distributed.conftest import check, metrics, tiny_config, torchrun
from tests.distributed.wandb_files import history

pytestmark = pytest.mark.dist
API_KEY = "gptrain-test-secret-0123456789abcdef0123456789abcdef"


def test_one_wandb_run_across_resume_and_no_key_in_files(tmp_path: Path, prepared: Path) -> None:
    config = tiny_config(
        tmp_path,
        prepared,
        train={"max_steps": 12, "save_every": 100, "eval_every": 6},
        tracking={"wandb": {"mode": "offline", "project": "gptrain-test", "log_every": 1}},
    )
    env = {"WANDB_API_KEY": API_KEY}
    stopped = torchrun(2, config, env={**env, "GPTRAIN_FAULT_SIGNAL_AT_STEP": "1:6"})
    assert stopped.returncode != 0
    run = tmp_path / "run"
    run_id = (run / "wandb_run_id").read_text().strip()
    first_dirs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(first_dirs) == 1 and first_dirs[0].name.endswith(f"-{run_id}")
    check(torchrun(2, config, env=env))
    dirs = sorted((run / "wandb").glob("offline-run-*"))
    assert (run / "wandb_run_id").read_text().strip() == run_id
    assert all(d.name.endswith(f"-{run_id}") for d in dirs), "resume continues the same run"
    rows = [row for d in dirs for row in history(d / f"run-{run_id}.wandb")]
    train_steps = [row["_step"] for row in rows if "loss" in row]
    assert train_steps == list(range(1, 13)), "the curve continues at the right step"
    first = next(row for row in rows if "loss" in row)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "memory_gb"):
        assert key in first
    assert any("eval_loss" in row for row in rows)
    for path in run.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert API_KEY.encode() not in path.read_bytes(), f"API key written to {path}"


def test_metrics_fields_and_plot(tmp_path: Path, prepared: Path) -> None:
    config = tiny_config(tmp_path, prepared, train={"max_steps": 8, "eval_every": 4})
    check(torchrun(2, config))
    run = tmp_path / "run"
    steps = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))  # log_every 1: one line per step
    for record in steps:
        for key in (
            "loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "tokens_per_s_per_device",
            "samples_per_s",
            "step_time_s",
            "step_time_max_s",
            "data_wait_s",
            "memory_gb",
            "total_steps",
        ):
            assert key in record, key
        assert record["mfu"] is None  # CPU: no known peak, so no made-up number
        assert record["tokens"] == record["step"] * 16 * 32  # real tokens, no padding
        assert record["step_time_max_s"] >= record["step_time_s"] * 0.5
    assert any("checkpoint_s" in r for r in metrics(run))
    out = tmp_path / "plot.png"
    other = tmp_path / "other"  # a second run to compare: the same curves, other values
    other.mkdir()
    with open(other / "metrics.jsonl", "w") as f:
        for record in metrics(run):
            scaled = {
                k: v * 1.5 if k in ("loss", "lr", "tokens_per_s") else v for k, v in record.items()
            }
            f.write(json.dumps(scaled) + "\n")
    result = run_cli("plot", str(run), "--out", str(out), "--compare", str(other))
    assert result.returncode == 0, result.stderr
    from PIL import Image

    image = Image.open(out).convert("RGB")
    assert image.size[0] >= 800
    # the curves are drawn: pixels of matplotlib's first two line colours (run, compared run)
    for colour in ((31, 119, 180), (255, 127, 14)):
        near = [
            all(abs(a - b) < 30 for a, b in zip(pixel, colour, strict=True))
            for pixel in image.getdata()
        ]
        assert sum(near) > 500, (colour, sum(near))
    bad = run_cli("plot", str(tmp_path))
    assert bad.returncode == 2 and "no metrics.jsonl records" in bad.stderr
