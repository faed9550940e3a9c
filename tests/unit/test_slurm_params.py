"""The SLURM backend without a cluster (fake `sbatch`, `srun`, `scontrol`): one mapping —
the dry-run's sbatch script is the script submitit sends, and job.json records the flags
of the script that was sent; the hang hook requeues once, or records why it did not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.backends import slurm
from launcher.backends.slurm import HangRequeue, sbatch_flags, sbatch_script, submit
from launcher.config import Config, load_config
from launcher.jobs import JobRecord, load_job
from launcher.launch import dry_run_text
from tests.conftest import ROOT
from training.observe.events import read_events
from training.run.failures import first_failure

XL = ROOT / "configs" / "gpt2-xl-zero3-multinode.yaml"
JOB_ID = "4242"
SCONTROL = """#!/bin/sh
cd {dir}
echo "$@" >> scontrol.calls
if [ "$1" = show ]; then
  [ -e requeued ] && echo "JobId=7 JobState=PENDING" || echo "JobId=7 JobState=RUNNING"
  exit 0
fi
[ -e refuse ] && {{ echo "Access/permission denied" >&2; exit 1; }}
[ -e requeued ] && {{ echo "Job is pending execution" >&2; exit 1; }}
touch requeued
"""


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`sbatch` that keeps the script it is given and answers a job id; `srun` for submitit's
    check that it runs on a cluster. Returns where the sent script lands."""
    bin_dir, sent = tmp_path / "bin", tmp_path / "sent.sh"
    bin_dir.mkdir()
    answer = f"Submitted batch job {JOB_ID}"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {sent}\necho "{answer}"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    # scontrol requeue succeeds once (a second try finds the job pending), unless `refuse`
    (bin_dir / "scontrol").write_text(SCONTROL.format(dir=tmp_path))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path('/usr/bin')}:{Path('/bin')}")
    return sent


def config(tmp_path: Path) -> Config:
    return load_config(
        XL,
        [
            f"run.dir={tmp_path}/runs/xl",
            "launch.slurm.account=proj",
            "launch.slurm.qos=high",
            "launch.slurm.mem_gb=480",
            "launch.slurm.constraint=h100",
            "launch.slurm.sbatch_extra={comment: nightly, mail-type: END}",
            "launch.slurm.setup=[module load cuda]",
        ],
    )


def test_preview_is_the_script_submitit_sends(tmp_path: Path, fake_slurm: Path) -> None:
    cfg = config(tmp_path)
    preview = sbatch_script(cfg)
    record = submit(cfg)
    sent = fake_slurm.read_text()
    assert preview == sent
    assert preview.rstrip() in dry_run_text(cfg)  # what --dry-run shows
    flags = sbatch_flags(sent)
    for flag in (
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--constraint=h100",
        "--mem=480GB",
        "--time=1440",
        "--signal=USR2@90",
        "--exclusive",
        "--comment=nightly",
        "--mail-type=END",
        "--job-name=xl",
    ):
        assert flag in flags, (flag, flags)
    assert not any(f.startswith("--requeue") for f in flags)  # submitit does not send it
    assert "module load cuda" in sent.split("# command")[0]  # setup runs before srun
    assert record.job_ids == [JOB_ID] and record.command == ["sbatch", *flags]
    on_disk = json.loads((tmp_path / "runs" / "xl" / "job.json").read_text())
    assert on_disk["command"] == record.command


def test_preview_needs_no_cluster_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    cfg = config(tmp_path)
    script = sbatch_script(cfg)
    assert script.startswith("#!/bin/bash") and "#SBATCH --nodes=4" in script
    assert f"--output={tmp_path}/runs/xl/slurm/%j/%j_0_log.out" in script
    assert not (tmp_path / "runs").exists()


def test_hang_hook_rank0_requeues_and_the_others_defer_to_it(
    tmp_path: Path, fake_slurm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank of a hung job fires; slurmctld gets one request (rank 0's requeue): the
    others wait REQUEUE_DEFER_S, read it in job.json and wait for Slurm to end them."""
    waits: list[int] = []
    monkeypatch.setattr(slurm, "await_requeue", lambda: waits.append(1))
    monkeypatch.setattr(slurm, "REQUEUE_DEFER_S", 0.0)
    run = tmp_path / "run"
    JobRecord(
        backend="slurm",
        run_dir=str(run),
        command=[],
        nodes=2,
        nproc_per_node=1,
        job_ids=["7"],
        state="RUNNING",
    ).save()
    for rank in (0, 1, 2):
        HangRequeue(run, "7", rank, restarts=0, max_requeues=2)("hang: rank made no progress")
    calls = (tmp_path / "scontrol.calls").read_text().splitlines()
    assert calls == ["requeue 7"]
    assert len(waits) == 3  # no rank leaves before Slurm ends them together
    record = load_job(run)
    assert record is not None and (record.state, record.requeues) == ("REQUEUED", 1)
    assert [(e["kind"], e["rank"]) for e in read_events(run)] == [("requeue", 0)]
    assert first_failure(run) is None


def test_hang_hook_requeues_from_another_rank_when_rank0_does_not(
    tmp_path: Path, fake_slurm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[int] = []
    monkeypatch.setattr(slurm, "await_requeue", lambda: waits.append(1))
    monkeypatch.setattr(slurm, "REQUEUE_DEFER_S", 0.0)
    monkeypatch.setattr(slurm, "REQUEUE_SETTLE_S", 0.0)
    run = tmp_path / "run"
    JobRecord(
        backend="slurm",
        run_dir=str(run),
        command=[],
        nodes=2,
        nproc_per_node=1,
        job_ids=["7"],
        state="RUNNING",
    ).save()
    for rank in (1, 2):  # rank 0 never fires: rank 1 asks, rank 2 reads that it did
        HangRequeue(run, "7", rank, restarts=0, max_requeues=2)("hang: rank made no progress")
    calls = (tmp_path / "scontrol.calls").read_text().splitlines()
    assert calls == ["requeue 7"]
    assert len(waits) == 2
    record = load_job(run)
    assert record is not None and (record.state, record.requeues) == ("REQUEUED", 1)
    assert [(e["kind"], e["rank"]) for e in read_events(run)] == [("requeue", 1)]
    assert first_failure(run) is None


def test_hang_hook_past_max_requeues_records_the_failure(tmp_path: Path, fake_slurm: Path) -> None:
    run = tmp_path / "run"
    JobRecord(
        backend="slurm",
        run_dir=str(run),
        command=[],
        nodes=2,
        nproc_per_node=1,
        job_ids=["7"],
        state="RUNNING",
        requeues=2,
    ).save()
    HangRequeue(run, "7", 1, restarts=2, max_requeues=2)("hang: rank 1 made no progress")
    assert not (tmp_path / "scontrol.calls").exists()
    failure = first_failure(run)
    assert failure is not None and failure["rank"] == 1
    assert failure["error"] == (
        "hang: rank 1 made no progress; not requeued: 2 requeues (launch.max_requeues)"
    )


def test_hang_hook_whose_requeue_is_refused_records_the_failure(
    tmp_path: Path, fake_slurm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slurm, "REQUEUE_SETTLE_S", 0.0)
    (tmp_path / "refuse").touch()
    run = tmp_path / "run"
    HangRequeue(run, "7", 0, restarts=0, max_requeues=2)("hang: rank 0 made no progress")
    calls = (tmp_path / "scontrol.calls").read_text().splitlines()
    assert calls == ["requeue 7", "show job -o 7"] * slurm.REQUEUE_TRIES  # it kept RUNNING
    failure = first_failure(run)  # then the watchdog exits the process (75): the job fails
    assert failure is not None and failure["error"] == (
        "hang: rank 0 made no progress; scontrol requeue 7 failed: Access/permission denied"
    )
