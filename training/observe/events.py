"""Events of a run that people should hear about, where they watch: one JSON line each in
`RUN_DIR/events.jsonl` (for everyone) and a W&B alert (for those with W&B), so a run
tells you instead of waiting to be polled.

Kinds: `bad_step` (a step skipped for a non-finite or spiking loss), `rollback`, `hang`,
`requeue`, `failure`, `completed`. Alerts are rate-limited per kind; no event, alert or
failure to write one may stop training.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("gptrain")
EVENTS_FILE = "events.jsonl"
ALERT_INTERVAL_S = 300  # at most one W&B alert per kind in this window
LEVELS = {
    "bad_step": "WARN",
    "rollback": "WARN",
    "hang": "ERROR",
    "requeue": "WARN",
    "failure": "ERROR",
    "completed": "INFO",
}


class Events:
    """Appends events (any rank may) and sends W&B alerts through the `tracker`'s W&B run
    (rank 0's, when it has one; read at each event, so a W&B dropped mid-run is
    respected)."""

    def __init__(self, run_dir: Path, rank: int, tracker: Any = None) -> None:
        self.path = run_dir / EVENTS_FILE
        self.rank = rank
        self.tracker = tracker
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
        run = getattr(self.tracker, "wandb_run", None)
        if run is None or now - self._last_alert_s.get(kind, -1e18) < ALERT_INTERVAL_S:
            return
        self._last_alert_s[kind] = now
        try:
            import wandb

            run.alert(
                title=f"gptrain: {kind}", text=message, level=getattr(wandb.AlertLevel, level)
            )
        except Exception as exc:  # noqa: BLE001 - an alert must never stop training
            log.debug("W&B alert failed: %s", exc)


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
    path = run_dir / EVENTS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
