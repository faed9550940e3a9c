"""`gptrain status | logs | cancel` for runs started by `gptrain launch`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from launcher.backends import backend, current_job
from launcher.config import ConfigError, load_config
from launcher.errors import StatusError
from launcher.jobs import JobRecord, load_job
from launcher.prepare_job import format_prepare_summary, prepare_summary
from training.config import TrainConfig
from training.observe.health import UNARMED_PHASES, read_heartbeats, stragglers
from training.observe.logs import hms
from training.observe.metrics import read_metrics
from training.run.paths import JobState, RunDir

PREPARE_ROOT = Path("data")  # where `gptrain status JOB_ID` also looks for prepare jobs
HEALTH_KEYS = ("skipped_steps", "loss_spikes", "rollbacks")  # counts every metrics record has
RANK_LINES_MAX = 8  # more ranks than this: one summary line, then only the flagged ranks


def _job(run_dir: Path) -> JobRecord:
    record = current_job(run_dir)
    if record is None:
        raise StatusError(f"{run_dir}: no job.json; was it started with gptrain launch?")
    return record


def summary(run_dir: Path) -> dict[str, Any]:
    """State, progress, loss, throughput and ETA of a run, from job.json + metrics.jsonl."""
    record = _job(run_dir)
    if record.kind == "prepare":
        return prepare_summary(run_dir, record)
    records = read_metrics(RunDir(run_dir).metrics)
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
        "health": {k: last[k] for k in HEALTH_KEYS if k in last} or None,
        "ranks": rank_health(run_dir, record),
        "checkpoint": checkpoint_summary(run_dir, record, records),
        "error": _failure(run_dir, record),
    }


def checkpoint_summary(
    run_dir: Path, record: JobRecord, records: list[dict[str, Any]]
) -> dict[str, Any]:
    """The last complete checkpoint (step, age, size, and the step loop's stall and write
    time of the last save, from metrics) and the step of a write in flight (its temp
    dir, while the job runs; None otherwise)."""
    from training.checkpoint import store as ckpt

    root = RunDir(run_dir).checkpoints
    latest = ckpt.latest_checkpoint(root)
    saves = [r for r in records if "checkpoint_s" in r]
    last = saves[-1] if saves else {}
    writing = [
        ckpt.step_of(p.with_name(p.name.removeprefix(ckpt.TMP_PREFIX)))
        for p in ckpt.temp_dirs(root)
    ]
    return {
        "step": ckpt.step_of(latest) if latest else None,
        "age_s": time.time() - (latest / "meta.json").stat().st_mtime if latest else None,
        "gb": last.get("checkpoint_gb"),
        "save_s": last.get("checkpoint_s"),
        "stall_s": last.get("checkpoint_stall_s"),
        "writing_step": writing[-1] if writing and record.state == JobState.RUNNING else None,
    }


def format_checkpoint(c: dict[str, Any]) -> str:
    """One line, e.g. `step 8 (2 s ago; 1.20 GB; last save 9.1 s, the loop waited 0.3 s);
    writing step 12`."""
    if c["step"] is None:
        text = "none yet"
    else:
        details = [f"{_age(c['age_s'])} ago"]
        if c.get("gb") is not None:
            details.append(f"{c['gb']:.2f} GB")
        if c.get("save_s") is not None:
            waited = c.get("stall_s")
            details.append(
                f"last save {c['save_s']:.1f} s"
                + (f", the loop waited {waited:.1f} s" if waited is not None else "")
            )
        text = f"step {c['step']} ({'; '.join(details)})"
    if c.get("writing_step") is not None:
        text += f"; writing step {c['writing_step']}"
    return text


def rank_health(run_dir: Path, record: JobRecord) -> list[dict[str, Any]]:
    """Each rank's last heartbeat (`training.observe.health`): step, phase, age; `stalled` when it
    is older than train.hang_timeout_s in a watched phase while the job runs; `straggler`:
    its busy time ÷ the other ranks' median, when over `health.STRAGGLER_FACTOR`."""
    world = record.nodes * record.nproc_per_node  # heartbeats of a larger earlier world: not ours
    beats = [b for b in read_heartbeats(run_dir) if b.get("rank", 0) < world and "time" in b]
    slow = dict(stragglers(beats))
    timeout_s, now = hang_timeout_s(run_dir), time.time()
    out = []
    for beat in beats:
        age_s = max(0.0, now - beat["time"])
        stalled = (
            record.state == JobState.RUNNING
            and beat.get("phase") not in UNARMED_PHASES
            and age_s > timeout_s
        )
        out.append(
            {
                "rank": beat["rank"],
                "step": beat.get("step"),
                "phase": beat.get("phase"),
                "heartbeat_age_s": age_s,
                "busy_s": beat.get("busy_s"),
                "stalled": stalled,
                "straggler": slow.get(beat["rank"]),
            }
        )
    return out


def hang_timeout_s(run_dir: Path) -> float:
    """train.hang_timeout_s of the launched config (the default when it cannot be read)."""
    for path in (RunDir(run_dir).launch_config, RunDir(run_dir).config):
        try:
            return load_config(path).train.hang_timeout_s
        except ConfigError:  # missing, or not this gptrain's config
            continue
    return TrainConfig.hang_timeout_s


def _failure(run_dir: Path, record: JobRecord) -> str | None:
    """The first error a rank recorded in this launch (see training.run.failures)."""
    if record.state in (JobState.COMPLETED, JobState.STOPPED, JobState.CANCELLED):
        return None
    from training.run.failures import first_failure

    first = first_failure(run_dir, since=record.submit_time)
    if first is None:
        return None
    return f"rank {first['rank']}: {first['error']} (gptrain logs {run_dir} --rank {first['rank']})"


def format_summary(s: dict[str, Any]) -> str:
    if s.get("kind") == "prepare":
        return format_prepare_summary(s)

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    step = f"{s['step']}" + (f" / {s['total_steps']}" if s["total_steps"] else "")
    eta = "-" if s["eta_s"] is None or s["state"] != JobState.RUNNING else hms(s["eta_s"])
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
    if s.get("checkpoint"):
        rows.append(("checkpoint", format_checkpoint(s["checkpoint"])))
    if s.get("health"):
        rows.append(
            ("health", ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s["health"].items()))
        )
    rows += [("ranks" if i == 0 else "", line) for i, line in enumerate(rank_lines(s["ranks"]))]
    if s.get("error"):
        rows.append(("error", s["error"]))
    return "\n".join(f"{key:<10} {value}".rstrip() for key, value in rows)


def rank_lines(ranks: list[dict[str, Any]]) -> list[str]:
    """One line per rank (or a summary and the flagged ranks, for many ranks)."""
    if len(ranks) <= RANK_LINES_MAX:
        return [_rank_line(r) for r in ranks]
    steps = _span([r["step"] for r in ranks if r["step"] is not None], str)
    ages = _span([r["heartbeat_age_s"] for r in ranks], _age)
    flagged = [_rank_line(r) for r in ranks if r["stalled"] or r["straggler"]]
    head = f"{len(ranks)} ranks at step {steps}, heartbeats {ages} old"
    return [f"{head}; {len(flagged) or 'none'} flagged", *flagged]


def _span(values: list[Any], fmt: Any) -> str:
    low, high = (fmt(min(values)), fmt(max(values))) if values else ("-", "-")
    return low if low == high else f"{low} to {high}"


def _rank_line(r: dict[str, Any]) -> str:
    age = _age(r["heartbeat_age_s"])
    line = f"rank {r['rank']}: step {r['step']} ({r['phase']}), heartbeat {age} ago"
    if r["stalled"]:
        line += " — STALLED (no heartbeat for over train.hang_timeout_s)"
    if r["straggler"]:
        line += f" — STRAGGLER (busy {r['straggler']:.1f}× the other ranks' median)"
    return line


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 100 else hms(seconds)


def list_runs(root: Path = Path("runs"), limit: int = 20) -> list[dict[str, Any]]:
    """Recent runs under `root` (newest first) that have a job.json."""
    found = RunDir.find(root)
    found.sort(key=lambda d: d.job_file.stat().st_mtime, reverse=True)
    return [summary(d.root) for d in found[:limit]]


def resolve_target(target: str, root: Path = Path("runs")) -> Path:
    """A run directory, or the run under `root` (or prepare output under data/) whose
    job.json holds SLURM job id `target` (an array element `ID_K` counts as `ID`)."""
    path = Path(target)
    job_id = target.split("_")[0]
    if path.is_dir() or not job_id.isdigit():
        return path
    for run in [*RunDir.find(root, max_depth=99), *RunDir.find(PREPARE_ROOT, max_depth=99)]:
        record = load_job(run.root)
        if record is not None and job_id in record.job_ids:
            return run.root
    raise StatusError(f"job {target}: no run under {root}/ or {PREPARE_ROOT}/ has this job id")


def follow_log(path: Path, run_dir: Path, out: Any = sys.stdout, poll_s: float = 0.5) -> None:
    """Print `path` and keep printing new lines while the run is RUNNING."""
    while not path.exists():
        if not _job(run_dir).state.active:
            raise StatusError(f"{path}: no such log")
        time.sleep(poll_s)
    with open(path) as f:
        while True:
            line = f.readline()
            if line:
                out.write(line)
                continue
            out.flush()
            if not _job(run_dir).state.active:
                out.write(f.read())
                return
            time.sleep(poll_s)


def failed_rank(run_dir: Path) -> int:
    """The rank whose error this launch recorded first, else 0."""
    from training.run.failures import first_failure

    record = load_job(run_dir)
    first = first_failure(run_dir, since=record.submit_time if record else 0.0)
    return first["rank"] if first else 0


def show_log(run_dir: Path, rank: int, follow: bool) -> None:
    path = RunDir(run_dir).rank_log(rank)
    if follow:
        follow_log(path, run_dir)
        return
    if not path.is_file():
        have = [p.name for p in RunDir(run_dir).rank_logs()]
        record = load_job(run_dir)
        more = backend(record.backend).log_files(record) if record is not None else []
        hint = f"; the scheduler's logs: {', '.join(map(str, more))}" if more else ""
        raise StatusError(f"{path}: no such log (have: {', '.join(have) or 'none'}){hint}")
    sys.stdout.write(path.read_text())


def cancel(run_dir: Path) -> JobRecord:
    """Stop a job through its backend (a training job saves a checkpoint first)."""
    record = _job(run_dir)
    if not record.state.active:
        raise StatusError(f"{run_dir}: job is {record.state}, nothing to cancel")
    return backend(record.backend).cancel(record)
