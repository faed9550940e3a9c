"""`gptrain prepare --tasks N [--backend local|slurm]`: prepare in resumable slices.

    gptrain prepare corpus/ --out data/c --train-tokenizer 32000 --tasks 8
    gptrain prepare corpus/ --out data/c --train-tokenizer 32000 --backend slurm --tasks 64 \\
        --set launch.slurm.partition=cpu --set launch.slurm.cpus_per_task=8
    gptrain status data/c          # slices done/total, tokens, tokens/s

The backend runs it (`launcher.backends`): local runs `sharding.slices.prepare_sliced`
here; slurm makes the plan and the tokenizer here (once), then submits one array job
(one element per slice still to do: `PrepareSliceTask`) and a merge job after it
(`PrepareMergeTask`) that fails naming the slices that did not finish. Re-running the
same command submits only those. Both write the job record of OUT (kind "prepare").
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from launcher.backends import backend, current_job
from launcher.config import LaunchConfig, apply_overrides, build_section, read_yaml
from launcher.errors import LaunchError
from launcher.jobs import JobRecord, PrepareJob, load_job
from sharding.errors import DataError
from sharding.options import PrepareOptions
from sharding.slices import progress_of, run_slice
from training.run.failures import error_line
from training.run.paths import JobState
from training.run.rundir import pid_alive

LOG_DIR = ".prepare-slurm"  # submitit's scripts and logs, and failed slices' errors
_STOPPING_S = 120.0  # a cancelled local prepare stops its slices within this (then: pid reuse)


class PrepareSliceTask:
    """One array element: tokenize slice `k` with `workers` processes (the task's CPUs)."""

    def __init__(self, out_dir: str, env: dict[str, str], workers: int) -> None:
        self.out_dir, self.env, self.workers = out_dir, env, workers

    def __call__(self, k: int) -> dict[str, Any]:
        os.environ.update(self.env)
        try:
            return run_slice(self.out_dir, k, workers=self.workers)
        except Exception as exc:  # the merge job reports it
            error = Path(self.out_dir) / LOG_DIR / f"slice_{k:04d}.error"
            error.write_text(error_line(exc) + "\n")
            raise


class PrepareMergeTask:
    """The job after the array: verify and merge the slices; the outcome goes to job.json."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def __call__(self) -> dict[str, Any]:
        from sharding.slices import merge

        out = Path(self.out_dir)
        record = load_job(out)
        started = record.submit_time if record is not None else None
        try:
            result = merge(out, started=started)
        except DataError as exc:
            errors = sorted((out / LOG_DIR).glob("slice_*.error"))
            first = f" (first failure: {errors[0].read_text().strip()})" if errors else ""
            finish_prepare(out, JobState.FAILED, {"error": f"{exc}{first}"})
            raise DataError(f"{exc}{first}") from None
        finish_prepare(out, JobState.COMPLETED, result)
        return result


def finish_prepare(out: Path, state: JobState, result: dict[str, Any]) -> None:
    """Record a prepare's end and its result (the merged summary, or the error)."""
    record = load_job(out)
    if record is not None:
        record.result = result
        record.end(state)


def launch_settings(config: str | None, overrides: list[str]) -> LaunchConfig:
    """The `launch` section of CONFIG (when given) and `--set launch.…` overrides; a training
    config's other sections are not read, so any config of the project will do."""
    tree = {"launch": (read_yaml(config) if config else {}).get("launch") or {}}
    apply_overrides(tree, overrides, only="launch")
    return build_section(LaunchConfig, tree["launch"], "launch", config or "--set")


def run_prepare(
    inputs: list[str],
    out_dir: str,
    *,
    backend_name: str | None,
    tasks: int | None,
    launch: LaunchConfig,
    workers: int | None,
    command: list[str],
    options: PrepareOptions,
) -> int:
    """Sliced prepare on `backend` (default `launch.backend`); returns the exit code."""
    runner = backend(backend_name or launch.backend)
    if tasks is None:
        tasks = runner.default_tasks(launch)
    if tasks < 1:
        raise LaunchError(f"--tasks {tasks}: must be >= 1")
    _refuse_if_running(Path(out_dir))
    return runner.prepare(
        PrepareJob(inputs, Path(out_dir), tasks, launch, workers, command, options)
    )


def _refuse_if_running(out: Path) -> None:
    """Two prepares writing the same slices would clean up each other's temp dirs."""
    record = current_job(out)
    if record is None:
        return
    if (
        record.pid is not None  # a process here, not a scheduler's job
        and record.state == JobState.CANCELLED
        and record.result is None
        and time.time() - (record.end_time or 0) < _STOPPING_S
        and record.pid != os.getpid()
        and pid_alive(record.pid)
    ):
        # `gptrain cancel` signalled it; it writes `result` once it has stopped its slices.
        raise LaunchError(
            f"{out}: the cancelled prepare (pid {record.pid}) is still stopping; "
            "try again in a few seconds"
        )
    s = prepare_summary(out, record)
    if record.state.active:
        raise LaunchError(
            f"{out}: a prepare is still {s['state']} ({s['backend']}, {s['job']}); "
            f"wait for it or stop it with gptrain cancel {out}"
        )


def prepare_summary(out_dir: Path, record: JobRecord) -> dict[str, Any]:
    """`gptrain status` of a prepare: state, slices done/total, tokens, tokens/s, error."""
    state = record.state  # brought up to date by its backend (current_job)
    progress = progress_of(out_dir)
    result = record.result or {}
    if progress is None and "tokens" in result:  # merged: .slices/ is gone
        total = result.get("slices") or record.nproc_per_node
        progress = {
            "slices_done": total,
            "slices_total": total,
            "tokens": result["tokens"],
            "tokens_per_s": result.get("tokens_per_s"),
        }
    progress = progress or {
        "slices_done": 0,
        "slices_total": None,
        "tokens": 0,
        "tokens_per_s": None,
    }
    end = record.end_time or time.time()
    return {
        "run": str(out_dir),
        "kind": "prepare",
        "state": state,
        "backend": record.backend,
        "job": ",".join(record.job_ids) or (f"pid {record.pid}" if record.pid else "-"),
        "slices_done": progress["slices_done"],
        "slices_total": progress["slices_total"],
        "tokens": progress["tokens"],
        "tokens_per_s": progress["tokens_per_s"],
        "elapsed_s": end - record.submit_time,
        "error": result.get("error"),
        # the keys of a training run's summary, for `gptrain status` listings
        "step": progress["slices_done"],
        "total_steps": progress["slices_total"],
        "loss": None,
        "requeues": record.requeues,
    }


def format_prepare_summary(s: dict[str, Any]) -> str:
    """The human-readable `gptrain status` of a prepare."""
    from training.observe.logs import hms

    total = "?" if s["slices_total"] is None else s["slices_total"]
    rows = [
        ("prepare", s["run"]),
        ("state", f"{s['state']} ({s['backend']}, {s['job']})"),
        ("slices", f"{s['slices_done']} / {total} done"),
        ("tokens", f"{s['tokens']:,}"),
        ("tokens/s", "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:,.0f}"),
        ("elapsed", hms(s["elapsed_s"])),
    ]
    if s["error"]:
        rows.append(("error", s["error"]))
    return "\n".join(f"{key:<10} {value}" for key, value in rows)
