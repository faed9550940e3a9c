"""`gptrain status` of a real 2-rank run (`gptrain launch --backend local`) with an injected
straggler: rank 1 sleeps 0.5 s in every step, and status names it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli
from tests.distributed.conftest import tiny_config


def test_status_names_the_straggling_rank(tmp_path: Path, prepared: Path) -> None:
    config = tiny_config(
        tmp_path, prepared, train={"max_steps": 8, "save_every": 100, "eval_every": 100}
    )
    straggler = {"GPTRAIN_FAULT_SLEEP_IN_STEP": "1:*:0.5"}  # rank 1, every step, 0.5 s
    result = run_cli(
        "launch",
        str(config),
        "--backend",
        "local",
        "--nproc-per-node",
        "2",
        env={"OMP_NUM_THREADS": "1", **straggler},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    s = json.loads(run_cli("status", str(run), "--json").stdout)
    assert s["state"] == "COMPLETED" and s["step"] == 8
    ranks = {r["rank"]: r for r in s["ranks"]}
    assert sorted(ranks) == [0, 1] and all(r["step"] == 8 for r in ranks.values())
    assert ranks[1]["straggler"] and not ranks[0]["straggler"], ranks
    assert ranks[1]["busy_s"] > 0.5 > ranks[0]["busy_s"], ranks
    assert not any(r["stalled"] for r in ranks.values())
    assert s["health"] == {"skipped_steps": 0, "loss_spikes": 0, "rollbacks": 0}
    text = run_cli("status", str(run)).stdout
    flagged = [line for line in text.splitlines() if "STRAGGLER" in line]
    assert len(flagged) == 1 and "rank 1: step 8" in flagged[0], text
