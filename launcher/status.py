"""`gptrain status | logs | cancel` for runs started by `gptrain launch`."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from launcher.jobs import JobRecord, load_job, pid_alive
from training.logs import hms
from training.metrics import read_metrics

ACTIVE = ("RUNNING", "PENDING", "REQUEUED")  # states of a job that is not over
PREPARE_ROOT = Path("data")  # where `gptrain status JOB_ID` also looks for prepare jobs


class StatusError(Exception):
    """A run directory that cannot be inspected; one line for the user."""


def _job(run_dir: Path) -> JobRecord:
    record = load_job(run_dir)
    if record is None:
        raise StatusError(f"{run_dir}: no job.json; was it started with gptrain launch?")
    if record.state == "RUNNING" and record.backend == "local" and not pid_alive(record.pid):
        record.state = "FAILED"  # the launcher itself died (e.g. killed); say so
    if record.backend == "slurm" and record.job_ids:
        from launcher.slurm import sacct_state

        record.state = sacct_state(record.job_ids[-1]) or record.state
    return record


def summary(run_dir: Path) -> dict[str, Any]:
    """State, progress, loss, throughput and ETA of a run, from job.json + metrics.jsonl."""
    record = _job(run_dir)
    if record.kind == "prepare":
        from launcher.prepare_job import prepare_summary

        return prepare_summary(run_dir, record)
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    last = steps[-1] if steps else {}
    end = record.end_time or time.time()
    total = last.get("total_steps")
    remaining = (total - last["step"]) if total and last else None
    return {
        "run": str(run_dir),
        "state": record.state,
        "backend": record.backend,
        "job": ",".join(record.job_ids) or (f"pid {record.pid}" if record.pid else "-"),
        "step": last.get("step", 0),
        "total_steps": total,
        "tokens": last.get("tokens", 0),
        "loss": last.get("loss"),
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "tokens_per_s": last.get("tokens_per_s"),
        "elapsed_s": end - record.submit_time,
        "eta_s": remaining * last["step_time_s"] if remaining is not None else None,
        "requeues": record.requeues,
        "error": _failure(run_dir, record),
    }


def _failure(run_dir: Path, record: JobRecord) -> str | None:
    """The first error a rank recorded in this launch (see training.failures)."""
    if record.state in ("COMPLETED", "STOPPED", "CANCELLED"):
        return None
    from training.failures import first_failure

    first = first_failure(run_dir, since=record.submit_time)
    if first is None:
        return None
    return f"rank {first['rank']}: {first['error']} (gptrain logs {run_dir} --rank {first['rank']})"


def format_summary(s: dict[str, Any]) -> str:
    if s.get("kind") == "prepare":
        from launcher.prepare_job import format_prepare_summary

        return format_prepare_summary(s)

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    step = f"{s['step']}" + (f" / {s['total_steps']}" if s["total_steps"] else "")
    eta = "-" if s["eta_s"] is None or s["state"] != "RUNNING" else hms(s["eta_s"])
    rows = [
        ("run", s["run"]),
        ("state", f"{s['state']} ({s['backend']}, {s['job']})"),
        ("step", step),
        ("tokens", f"{s['tokens']:,}"),
        ("loss", f"{num(s['loss'], '.4f')} (eval {num(s['eval_loss'], '.4f')})"),
        ("tokens/s", num(s["tokens_per_s"], ",.0f")),
        ("elapsed", hms(s["elapsed_s"])),
        ("eta", eta),
        ("requeues", str(s["requeues"])),
    ]
    if s.get("error"):
        rows.append(("error", s["error"]))
    return "\n".join(f"{key:<10} {value}" for key, value in rows)


def list_runs(root: Path = Path("runs"), limit: int = 20) -> list[dict[str, Any]]:
    """Recent runs under `root` (newest first) that have a job.json."""
    found = [p.parent for p in root.glob("**/job.json") if len(p.relative_to(root).parts) <= 4]
    found.sort(key=lambda d: (d / "job.json").stat().st_mtime, reverse=True)
    return [summary(d) for d in found[:limit]]


def resolve_target(target: str, root: Path = Path("runs")) -> Path:
    """A run directory, or the run under `root` (or prepare output under data/) whose
    job.json holds SLURM job id `target` (an array element `ID_K` counts as `ID`)."""
    path = Path(target)
    job_id = target.split("_")[0]
    if path.is_dir() or not job_id.isdigit():
        return path
    for job_file in [*root.glob("**/job.json"), *PREPARE_ROOT.glob("**/job.json")]:
        record = load_job(job_file.parent)
        if record is not None and job_id in record.job_ids:
            return job_file.parent
    raise StatusError(f"job {target}: no run under {root}/ or {PREPARE_ROOT}/ has this job id")


def follow_log(path: Path, run_dir: Path, out: Any = sys.stdout, poll_s: float = 0.5) -> None:
    """Print `path` and keep printing new lines while the run is RUNNING."""
    while not path.exists():
        if _job(run_dir).state not in ACTIVE:
            raise StatusError(f"{path}: no such log")
        time.sleep(poll_s)
    with open(path) as f:
        while True:
            line = f.readline()
            if line:
                out.write(line)
                continue
            out.flush()
            if _job(run_dir).state not in ACTIVE:
                out.write(f.read())
                return
            time.sleep(poll_s)


def failed_rank(run_dir: Path) -> int:
    """The rank whose error this launch recorded first, else 0."""
    from training.failures import first_failure

    record = load_job(run_dir)
    first = first_failure(run_dir, since=record.submit_time if record else 0.0)
    return first["rank"] if first else 0


def show_log(run_dir: Path, rank: int, follow: bool) -> None:
    path = run_dir / "logs" / f"rank{rank}.log"
    if follow:
        follow_log(path, run_dir)
        return
    if not path.is_file():
        have = sorted(p.name for p in (run_dir / "logs").glob("rank*.log"))
        raise StatusError(f"{path}: no such log (have: {', '.join(have) or 'none'})")
    sys.stdout.write(path.read_text())


def cancel(run_dir: Path) -> JobRecord:
    """Stop a run: SIGTERM to the local torchrun group (ranks save first), or to a local
    prepare (its group when it leads one, else the process alone: it stops its slices)."""
    record = _job(run_dir)
    if record.state not in ACTIVE:
        raise StatusError(f"{run_dir}: job is {record.state}, nothing to cancel")
    if record.backend == "local" and record.pid is not None:
        _terminate_local(record)  # raises unless delivered or the process is gone
        # The process may have written its own final state meanwhile: keep it.
        current = load_job(run_dir)
        if current is not None and current.state not in ACTIVE:
            return current
        record = current or record
    elif record.backend == "slurm":
        from launcher.slurm import scancel

        for job_id in record.job_ids:
            scancel(job_id)
    record.state = "CANCELLED"
    record.end_time = time.time()
    record.save()
    return record


def _terminate_local(record: JobRecord) -> None:
    """SIGTERM to a local run's process group when its pid leads one, else to the pid alone
    (killpg of a pid that leads no group would fail and leave the process running)."""
    assert record.pid is not None
    pid = record.pid
    try:
        leader = record.group_leader
        if leader is None:  # a record of `gptrain launch` (own session) or an older one
            leader = os.getpgid(pid) == pid
        if leader:
            os.killpg(pid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # already gone: nothing left to stop
    except PermissionError:
        raise StatusError(
            f"{record.run_dir}: cannot signal pid {pid} (another user's process?)"
        ) from None
