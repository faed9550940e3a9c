"""A hung rank on the SLURM cluster: the watchdog fires on both ranks within
hang_timeout_s + a few seconds, their stacks land in their logs, the job requeues itself,
resumes from the last checkpoint and completes, each step logged once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.distributed.conftest import losses
from tests.slurm.test_slurm import FINAL, launch, slurm_config, submitit_logs, wait_for
from training.observe.events import read_events

HANG_TIMEOUT_S = 5
STEPS = 24
# The fault fires on the first run only: the requeued job (SLURM_RESTART_COUNT=1) would
# otherwise hang again at the same step, which it must redo (it resumes at step 5).
FIRST_RUN_ONLY = (
    'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then export GPTRAIN_FAULT_SLEEP_IN_STEP=1:8:600; fi'
)


def test_a_hung_rank_requeues_the_job_which_resumes_and_completes(
    tmp_path: Path, prepared: Path
) -> None:
    config = slurm_config(
        tmp_path,
        prepared,
        max_steps=STEPS,
        save_every=5,
        eval_every=1000,
        hang_timeout_s=HANG_TIMEOUT_S,
        collective_timeout_s=120,
    )
    tree = yaml.safe_load(config.read_text())
    tree["launch"]["slurm"]["setup"] = [FIRST_RUN_ONLY]
    config.write_text(yaml.safe_dump(tree))
    job_id = launch(config)
    run = tmp_path / "run"
    s = wait_for(run, lambda s: s["state"] in FINAL, 420, "job end")
    assert s["state"] == "COMPLETED" and s["requeues"] == 1, s
    assert s["job"] == job_id and s["step"] == STEPS

    for rank in (0, 1):
        log = (run / "logs" / f"rank{rank}.log").read_text()
        fired = re.search(rf"hang: rank {rank} made no progress for (\d+) s .* at step 8", log)
        assert fired, log[-3000:]
        assert int(fired.group(1)) <= HANG_TIMEOUT_S + 3  # the watchdog polls every 0.5 s
        assert f"stacks of rank {rank}" in log and "loop/step.py" in log
    assert "sleep_in_step" in (run / "logs" / "rank1.log").read_text()
    rank0 = (run / "logs" / "rank0.log").read_text()
    assert re.search(r"resumed from \S*step_000005 at step 5", rank0), rank0[-3000:]

    events = read_events(run)
    kinds = [e["kind"] for e in events]
    assert "hang" in kinds and kinds.count("requeue") == 1, kinds
    # rank 0 requeues; the hung rank 1 defers to it and is ended by Slurm, never asking
    assert [e["rank"] for e in events if e["kind"] == "requeue"] == [0], events
    assert kinds[-1] == "completed", kinds
    assert sorted(losses(run)) == list(range(1, STEPS + 1)), "each step once after step 5"
    record = json.loads((run / "job.json").read_text())
    assert (record["state"], record["requeues"], record["exit_code"]) == ("COMPLETED", 1, 0)
    assert not [p for p, text in submitit_logs(run).items() if "Traceback" in text]
    assert not list((run / "logs").glob("*.error.json")), "no rank failed: Slurm ended both"
