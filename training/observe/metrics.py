"""`RUN_DIR/metrics.jsonl`: one JSON record per logged step, eval and checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonlSink:
    """Append-only JSON lines; on resume, records after the resumed step are dropped so
    the file stays one curve with no step repeated."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.is_file():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            tmp.replace(path)
        elif resume_step is None and path.is_file():
            path.unlink()  # a fresh run starts a fresh curve
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - held for the whole run

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (empty when missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
