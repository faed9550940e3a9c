"""Events of a run that people should hear about, where they watch: one JSON line each in
`RUN_DIR/events.jsonl` (for everyone) and an alert to the run's trackers (a W&B alert, a
TensorBoard text, an MLflow tag; training.observe.sinks), so a run tells you instead of
waiting to be polled.

Kinds: `bad_step` (a step skipped for a non-finite or spiking loss), `expert_collapse`,
`rollback`, `hang`, `requeue`, `failure`, `checkpoint_dropped` (a background write given
up: out of time on a stop, or failed), `checkpoint_skipped` (no save on a stop: too
little time left), `completed`. Alerts are rate-limited per kind; no event, alert or
failure to write one may stop training.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

from training.run.paths import RunDir

log = logging.getLogger("gptrain")
ALERT_INTERVAL_S = 300  # at most one alert per kind in this window
LEVELS = {
    "bad_step": "WARN",
    "expert_collapse": "WARN",
    "rollback": "WARN",
    "hang": "ERROR",
    "requeue": "WARN",
    "failure": "ERROR",
    "checkpoint_dropped": "WARN",
    "checkpoint_skipped": "WARN",
    "completed": "INFO",
}


class Alerts(Protocol):
    """Where alerts go: training.observe.sinks.Metrics (the trackers of rank 0)."""

    def alert(self, kind: str, message: str, level: str) -> None: ...


class Events:
    """Appends events (any rank may) and sends alerts through `alerts` (the run's
    trackers: rank 0's sinks, none elsewhere; a tracker dropped mid-run is skipped)."""

    def __init__(self, run_dir: Path, rank: int, alerts: Alerts | None = None) -> None:
        self.path = RunDir(run_dir).events
        self.rank = rank
        self.alerts = alerts
        self._last_alert_s: dict[str, float] = {}

    def emit(self, kind: str, message: str, *, step: int | None = None) -> None:
        """Record one event; never raises."""
        record = {
            "time": time.time(),
            "kind": kind,
            "level": LEVELS.get(kind, "INFO"),
            "rank": self.rank,
            "step": step,
            "message": message,
        }
        try:
            append_line(self.path, json.dumps(record))
        except OSError as exc:
            log.debug("event not written: %s", exc)
        self._alert(kind, message, record["level"])

    def _alert(self, kind: str, message: str, level: str) -> None:
        now = time.monotonic()
        if self.alerts is None or now - self._last_alert_s.get(kind, -1e18) < ALERT_INTERVAL_S:
            return
        self._last_alert_s[kind] = now
        try:
            self.alerts.alert(kind, message, level)
        except Exception as exc:  # noqa: BLE001 - an alert must never stop training
            log.debug("alert failed: %s", exc)


def append_line(path: Path, line: str) -> None:
    """Append one line with a single O_APPEND write, so lines of several ranks (on one
    filesystem) never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """The run's events, oldest first (unreadable lines skipped)."""
    path = RunDir(run_dir).events
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
