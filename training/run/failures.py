"""Why a run failed, kept in the run directory (`RunDir.rank_error`: one file per rank).

A rank that fails after it owns the run directory writes its error line (and the
time) there and appends the traceback to its own log; the launcher fills in ranks
that died without a word (killed by a signal). `gptrain status` shows the first
failure in time — the cause; later ones are mostly peers losing their connection.
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from pathlib import Path
from typing import Any

from sharding.atomic import atomic_write
from sharding.errors import DataError
from training.errors import TrainingError, first_line
from training.run.paths import RunDir


class RankFailed(TrainingError):
    """A rank's unexpected error, recorded in the run dir; one line for the user."""


def error_line(exc: BaseException, *, user_error: bool = False) -> str:
    """The exception's first line; prefixed with its type unless it is a user error (a
    TrainingError or DataError, or what the caller knows to be one: a config error)."""
    first = first_line(exc)
    if user_error or isinstance(exc, (TrainingError, DataError)) or first == type(exc).__name__:
        return first
    return f"{type(exc).__name__}: {first}"


def write_failure(run_dir: Path, rank: int, line: str, at: float | None = None) -> None:
    """Record `line` as rank `rank`'s failure (atomically)."""
    record = {"rank": rank, "error": line, "time": at or time.time()}
    atomic_write(RunDir(run_dir).rank_error(rank), json.dumps(record), fsync=False)


def last_alive(run_dir: Path, rank: int) -> float | None:
    """When rank `rank` last showed life (its log or heartbeat file last written): the
    time to file a silent death under. The launcher only notices a killed rank later,
    often after its peers have recorded the lost connection the death caused; filed at
    that moment, the cause would sort behind its consequences."""
    times = []
    for path in (RunDir(run_dir).rank_log(rank), RunDir(run_dir).heartbeat(rank)):
        with contextlib.suppress(OSError):
            times.append(path.stat().st_mtime)
    return max(times, default=None)


def record(run_dir: Path, rank: int, exc: BaseException, *, user_error: bool = False) -> RankFailed:
    """Write rank `rank`'s failure and traceback; returns the one-line error to raise."""
    line = error_line(exc, user_error=user_error)
    write_failure(run_dir, rank, line)
    with open(RunDir(run_dir).rank_log(rank), "a") as f:
        f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return RankFailed(f"rank {rank}: {line} (traceback: gptrain logs {run_dir} --rank {rank})")


def failures(run_dir: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """Every rank's recorded failure at or after `since`, first in time first."""
    found = []
    for path in RunDir(run_dir).rank_errors():
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
    for path in RunDir(run_dir).rank_errors():
        path.unlink(missing_ok=True)
