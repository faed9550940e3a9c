"""Run-dir ownership, fresh/overwrite, checkpoint verification, failure records (pure)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.ranks import exit_code, record_killed
from sharding.sources import input_format
from tests.conftest import run_cli
from tests.unit.test_training_pure import sample_meta
from training.checkpoint import store as ckpt
from training.errors import TrainingError
from training.observe.sinks.wandb_sink import has_wandb_credentials
from training.run import failures, rundir
from training.run.paths import RunDir


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_one_owner_at_a_time_and_stale_locks_are_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    rundir.acquire(run, rundir.JobContext("a"))
    rundir.acquire(run, rundir.JobContext("a"))  # the same run (another rank, a requeue): fine
    with pytest.raises(TrainingError, match=r"run.dir .*run: in use by another run \(host "):
        rundir.acquire(run, rundir.JobContext("b"))
    with pytest.raises(TrainingError, match="gptrain cancel"):
        rundir.check_free(run, "b")
    rundir.release(run, "b")  # not b's: kept
    assert rundir.holder(run)["token"] == "a"
    rundir.release(run, "a")
    assert rundir.holder(run) is None
    # A lock whose process is dead on this host is stale.
    lock = {"token": "old", "host": socket.gethostname(), "pid": _dead_pid(), "started": 0}
    RunDir(run).lock.write_text(json.dumps(lock))
    rundir.check_free(run, "b")
    rundir.acquire(run, rundir.JobContext("b"))
    assert rundir.holder(run)["token"] == "b"


def test_owner_token_is_shared_by_the_ranks_of_one_run() -> None:
    environ = {rundir.OWNER_ENV: "launch:h:1", "TORCHELASTIC_RUN_ID": "x"}
    assert rundir.owner_token(environ) == "launch:h:1"
    assert rundir.owner_token({"TORCHELASTIC_RUN_ID": "x"}).endswith(":x")
    context = rundir.JobContext.from_env({rundir.OWNER_ENV: "t"})
    assert (context.token, context.launcher_holds_lock) == ("t", True)
    assert not rundir.JobContext.from_env({}).launcher_holds_lock


def test_never_refuses_a_used_dir_and_overwrite_archives_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    rundir.check_fresh(run, "never")  # nothing there
    (run / "tokenizer").mkdir(parents=True)
    (run / "config.yaml").write_text("x")
    rundir.check_fresh(run, "never")  # no checkpoints, no metrics: not a run yet
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "checkpoints" / "step_000010").mkdir(parents=True)
    rundir.acquire(run, rundir.JobContext("me"))
    with pytest.raises(TrainingError, match=r"train.resume: never, .* train.resume=overwrite"):
        rundir.check_fresh(run, "never")
    rundir.check_fresh(run, "auto")
    moved = rundir.archive(run)
    assert moved is not None and moved.parent == run / "archive"
    assert sorted(p.name for p in moved.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "tokenizer",
    ]
    assert sorted(p.name for p in run.iterdir()) == ["archive", "run.lock"]
    rundir.check_fresh(run, "never")


def _save(root: Path, step: int) -> Path:
    import torch

    def write_shards(tmp: Path) -> None:
        (tmp / ckpt.DS_TAG).mkdir()
        torch.save({"w": torch.zeros(100)}, tmp / ckpt.DS_TAG / "mp_rank_00_model_states.pt")

    tmp = ckpt.begin_save(root, step, rank=0, barrier=lambda: None)
    write_shards(tmp)
    return ckpt.publish_checkpoint(tmp, sample_meta(step), keep_last=5)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    first, second = _save(root, 10), _save(root, 20)
    assert ckpt.verify(second) is None
    model = second / ckpt.DS_TAG / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:200])  # truncated
    assert "mp_rank_00_model_states.pt has 200 of" in ckpt.verify(second)
    assert ckpt.find_resume(root, "auto") == first
    assert [p for p, _ in ckpt.damaged(root, first)] == [second]
    with pytest.raises(TrainingError, match=r"step 20 is damaged .*--step \(have: 10, 20\)"):
        raise ckpt.damaged_error(second, ckpt.verify(second))
    with pytest.raises(TrainingError, match="is damaged"):
        ckpt.find_resume(root, str(second))
    assert ckpt.quarantine(second).name == "step_000020.damaged"
    assert ckpt.list_checkpoints(root) == [first]
    # Without a size list (an older checkpoint), the zip directory check still catches it.
    old = _save(root, 30)
    meta = json.loads((old / "meta.json").read_text())
    del meta["files"]
    (old / "meta.json").write_text(json.dumps(meta))
    model = old / ckpt.DS_TAG / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:-30])
    assert "not readable" in ckpt.verify(old)
    (first / ckpt.DS_TAG / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(TrainingError, match="no checkpoint under .* is intact"):
        ckpt.find_resume(root, "auto")


def test_failures_keep_the_first_error_in_time(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError as exc:
        error = failures.record(run, 1, exc)
    assert str(error).startswith("rank 1: ValueError: boom (traceback: gptrain logs")
    assert "Traceback" in (run / "logs" / "rank1.log").read_text()
    failures.write_failure(run, 0, "RuntimeError: connection closed by peer")
    first = failures.first_failure(run)
    assert first["rank"] == 1 and first["error"] == "ValueError: boom"
    assert failures.first_failure(run, since=first["time"] + 3600) is None


def test_a_killed_rank_is_filed_when_last_alive_ahead_of_its_peers_lost_connection(
    tmp_path: Path,
) -> None:
    """torchrun notices a killed rank only after its peers recorded the broken connection
    the death caused; the death is filed at the rank's last sign of life, so it is first."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    start = time.time() - 60
    log = run / "logs" / "rank1.log"
    log.write_text("step 2: saving a checkpoint\n")
    os.utime(log, (start + 10, start + 10))
    failures.write_failure(run, 0, "RuntimeError: Connection reset by peer", start + 20)
    killed = ProcessFailure(local_rank=1, pid=1, exitcode=-9, error_file="")  # noticed now
    record_killed(
        run, {0: ProcessFailure(local_rank=0, pid=2, exitcode=1, error_file=""), 1: killed}, start
    )
    found = failures.failures(run, start)
    assert [(e["rank"], e["error"]) for e in found] == [
        (1, "killed by SIGKILL (out of memory?)"),
        (0, "RuntimeError: Connection reset by peer"),
    ]
    assert found[0]["time"] == start + 10
    # no sign of life in this attempt: filed when torchrun noticed it
    (run / "logs" / "rank1.error.json").unlink()
    record_killed(run, {1: killed}, start + 30)
    assert failures.first_failure(run, start + 30)["time"] == killed.timestamp


def test_launch_exit_code_is_a_stop_only_when_every_rank_stopped() -> None:
    assert exit_code([76, 76]) == 76
    assert exit_code([75, 76]) == 75
    assert exit_code([76, 1]) == 1
    assert exit_code([-9]) == 1


def test_wandb_credentials_come_from_the_key_or_netrc(tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    assert not has_wandb_credentials({"NETRC": str(netrc)})
    assert has_wandb_credentials({"WANDB_API_KEY": "k"})
    netrc.write_text("machine api.wandb.ai\n  login user\n  password k\n")
    netrc.chmod(0o600)
    assert has_wandb_credentials({"NETRC": str(netrc)})


def test_any_compressed_text_file_is_text() -> None:
    assert input_format("changelog.Debian.gz") == "text"
    assert input_format("notes.zst") == "text"
    assert input_format("a.jsonl.gz") == "json"
    assert input_format("src.tar.gz") is None
    assert input_format("x.docx") is None


def test_config_show_says_model_config_is_unused_with_a_pretrained_model() -> None:
    shown = run_cli("config", "show", "configs/gpt2-sft.yaml")
    assert shown.returncode == 0, shown.stderr
    assert "# model.config: unused — model.name_or_path is set (models/gpt2)" in shown.stdout
    assert "unused" not in run_cli("config", "show", "configs/demo-cpu.yaml").stdout


def test_run_dir_keeps_only_tokenizer_files(tmp_path: Path) -> None:
    from training.trainer import copy_tokenizer

    src = tmp_path / "gpt2"
    src.mkdir()
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "merges.txt",
        "vocab.json",
        "model.safetensors",
        "pytorch_model.bin",
        "config.json",
    ):
        (src / name).write_text(name)
    copy_tokenizer(src, tmp_path / "run" / "tokenizer")
    kept = sorted(p.name for p in (tmp_path / "run" / "tokenizer").iterdir())
    assert kept == [
        "config.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
