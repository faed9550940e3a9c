"""Why a run failed, kept in the run directory: `RUN_DIR/logs/rank{R}.error.json`.

A rank that fails after it owns the run directory writes its error line (and the
time) there and appends the traceback to its own log; the launcher fills in ranks
that died without a word (killed by a signal). `gptrain status` shows the first
failure in time — the cause; later ones are mostly peers losing their connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from sharding.errors import DataError
from training.errors import TrainingError


class RankFailed(TrainingError):
    """A rank's unexpected error, recorded in the run dir; one line for the user."""


def error_line(exc: BaseException, *, user_error: bool = False) -> str:
    """The exception's first line; prefixed with its type unless it is a user error (a
    TrainingError or DataError, or what the caller knows to be one: a config error)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if user_error or isinstance(exc, (TrainingError, DataError)):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _path(run_dir: Path, rank: int) -> Path:
    return run_dir / "logs" / f"rank{rank}.error.json"


def write_failure(run_dir: Path, rank: int, line: str, at: float | None = None) -> None:
    """Record `line` as rank `rank`'s failure (atomically)."""
    path = _path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"rank": rank, "error": line, "time": at or time.time()}))
    os.replace(tmp, path)


def last_alive(run_dir: Path, rank: int) -> float | None:
    """When rank `rank` last showed life (its log or heartbeat file last written): the
    time to file a silent death under. The launcher only notices a killed rank later,
    often after its peers have recorded the lost connection the death caused; filed at
    that moment, the cause would sort behind its consequences."""
    from training.observe.health import heartbeat_dir

    times = []
    for path in (run_dir / "logs" / f"rank{rank}.log", heartbeat_dir(run_dir) / f"rank{rank}.json"):
        with contextlib.suppress(OSError):
            times.append(path.stat().st_mtime)
    return max(times, default=None)


def record(run_dir: Path, rank: int, exc: BaseException, *, user_error: bool = False) -> RankFailed:
    """Write rank `rank`'s failure and traceback; returns the one-line error to raise."""
    line = error_line(exc, user_error=user_error)
    write_failure(run_dir, rank, line)
    log_file = run_dir / "logs" / f"rank{rank}.log"
    with open(log_file, "a") as f:
        f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return RankFailed(f"rank {rank}: {line} (traceback: gptrain logs {run_dir} --rank {rank})")


def failures(run_dir: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """Every rank's recorded failure at or after `since`, first in time first."""
    found = []
    for path in (run_dir / "logs").glob("rank*.error.json"):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if entry.get("time", 0) >= since:
            found.append(entry)
    return sorted(found, key=lambda e: (e["time"], e["rank"]))


def first_failure(run_dir: Path, since: float = 0.0) -> dict[str, Any] | None:
    found = failures(run_dir, since)
    return found[0] if found else None


def clear(run_dir: Path) -> None:
    """Forget the failures of an earlier attempt (a new launch starts clean)."""
    for path in (run_dir / "logs").glob("rank*.error.json"):
        path.unlink(missing_ok=True)
