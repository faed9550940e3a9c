"""Reading `RUN_DIR/metrics.jsonl`: one JSON record per logged step, eval and checkpoint
(written by training.observe.sinks.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (empty when missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
