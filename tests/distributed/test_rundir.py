"""A run directory is never corrupted (2 CPU ranks): no silent overwrite, one run at a
time, a damaged checkpoint falls back, stops exit as stops, failures are recorded."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.distributed.conftest import (
    check,
    launched,
    metrics,
    one_line_error,
    tiny_config,
    torchrun,
)
from training.checkpoint.store import latest_checkpoint, list_checkpoints, read_meta

pytestmark = pytest.mark.dist
ENV = {"OMP_NUM_THREADS": "1"}


def _hashes(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def _launch(config: Path, *sets: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli("launch", str(config), *(f"--set={s}" for s in sets), cwd=cwd, env=ENV)


def test_never_into_a_used_run_is_refused_and_overwrite_archives_it(
    tmp_path: Path, prepared: Path
) -> None:
    small = {"max_steps": 4, "save_every": 2, "eval_every": 2}
    config = tiny_config(tmp_path, prepared, train=small)
    run = tmp_path / "run"
    check(_launch(config, cwd=tmp_path))
    before = _hashes(run)
    assert "checkpoints/step_000004/meta.json" in before
    # The sequence: another model into the same run dir ...
    bigger = "model.config={n_layer: 3, n_head: 2, n_embd: 64, n_positions: 64}"
    one_line_error(_launch(config, bigger, cwd=tmp_path), "different model", "overwrite")
    # ... then the advice of old, resume=never: refused before anything is written.
    refused = _launch(config, bigger, "train.resume=never", cwd=tmp_path)
    one_line_error(refused, "train.resume: never", "another run.dir", "train.resume=overwrite")
    assert "Traceback" not in refused.stdout + refused.stderr
    after = _hashes(run)
    assert after == before  # job.json and launch/config.yaml too
    # overwrite: the old run is moved whole to archive/<time>/, the new one starts clean.
    check(_launch(config, bigger, "train.resume=overwrite", cwd=tmp_path))
    (archived,) = (run / "archive").iterdir()
    assert _hashes(archived) == after
    steps = list_checkpoints(run / "checkpoints")
    assert [read_meta(p).model["n_layer"] for p in steps] == [3, 3]
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4]
    assert not (run / "run.lock").exists()


def test_a_second_launch_into_a_live_run_is_refused(tmp_path: Path, prepared: Path) -> None:
    config = tiny_config(tmp_path, prepared, train={"max_steps": 8, "save_every": 4})
    run = tmp_path / "run"
    # rank 0 dwells 60 s in step 4: the first run is surely alive while the others try
    with launched(config, env={"GPTRAIN_FAULT_SLEEP_IN_STEP": "0:4:60"}) as first:
        job = json.loads((run / "job.json").read_text())
        second = _launch(config, cwd=tmp_path)
        one_line_error(second, f"run.dir {run}: in use by another run", "gptrain cancel")
        by_hand = torchrun(2, config, env=ENV)  # ranks started without the launcher
        assert by_hand.returncode != 0 and "in use by another run" in by_hand.stderr
        now = json.loads((run / "job.json").read_text())
        assert (now["pid"], now["submit_time"]) == (job["pid"], job["submit_time"])  # the 1st's
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert latest_checkpoint(run / "checkpoints").name == "step_000008"
    assert json.loads((run / "job.json").read_text())["state"] == "COMPLETED"
    assert not (run / "run.lock").exists()


def test_truncated_latest_checkpoint_resumes_from_the_previous(
    tmp_path: Path, prepared: Path
) -> None:
    config = tiny_config(tmp_path, prepared, train={"max_steps": 4, "save_every": 2})
    run = tmp_path / "run"
    check(torchrun(2, config, env=ENV))
    model = next((run / "checkpoints" / "step_000004" / "ds").glob("*model_states.pt"))
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    out = tmp_path / "export"
    for args in (
        ["export", str(run), "--out", str(out)],
        ["generate", str(run), "--prompt", "The cat"],
    ):
        one_line_error(run_cli(*args), "step_000004", "step 4 is damaged", "--step", "have: 2, 4")
    check(run_cli("export", str(run), "--out", str(out), "--step", "2"))
    resumed = torchrun(2, config, "train.max_steps=6", env=ENV)
    check(resumed)
    warnings = [ln for ln in resumed.stdout.splitlines() if "is damaged" in ln]
    assert len(warnings) == 1 and "step_000004" in warnings[0] and "step_000002" in warnings[0]
    assert "Traceback" not in resumed.stdout + resumed.stderr
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [
        "step_000002",
        "step_000004",
        "step_000006",
    ]
    assert (run / "checkpoints" / "step_000004.damaged").is_dir()
    steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3-4 retrained; the damaged ones' lines cut


def test_sigint_stops_with_the_stop_exit_code(tmp_path: Path, prepared: Path) -> None:
    config = tiny_config(tmp_path, prepared, train={"max_steps": 100000, "save_every": 100000})
    run = tmp_path / "run"
    with launched(config) as launcher:
        launcher.send_signal(signal.SIGINT)
        out, err = launcher.communicate(timeout=180)
    assert launcher.returncode == 76, err[-3000:]
    assert "Traceback" not in out + err and "SignalException" not in out + err
    assert "STOPPED" in run_cli("status", str(run)).stdout
    saved = latest_checkpoint(run / "checkpoints")
    assert saved is not None and read_meta(saved).step >= 2


def test_a_failing_rank_is_named_in_status_and_logs(tmp_path: Path, prepared: Path) -> None:
    config = tiny_config(tmp_path, prepared, train={"max_steps": 6, "save_every": 2})
    run = tmp_path / "run"
    failed = run_cli(
        "launch", str(config), cwd=tmp_path, env={**ENV, "GPTRAIN_FAULT_KILL_IN_SAVE": "1:2"}
    )
    one_line_error(failed, "training failed (rank 1: killed by SIGKILL", "--rank 1")
    status = run_cli("status", str(run)).stdout
    assert "FAILED" in status and "error      rank 1: killed by SIGKILL" in status
    logs = run_cli("logs", str(run))  # the failing rank's log by default
    assert logs.returncode == 0 and " rank1 " in logs.stdout
