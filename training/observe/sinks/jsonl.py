"""`RUN_DIR/metrics.jsonl`: one JSON record per logged step, eval and checkpoint, with the
trainer's flat keys (`step`, `loss`, `eval_loss`, `checkpoint_s`, `params_total`, …): the
on-disk format `gptrain status` and `gptrain plot` read (training.observe.metrics)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sharding.atomic import atomic_write
from training.observe.sinks import RunInfo


class JsonlSink:
    """Append-only JSON lines; on resume, records after the resumed step are dropped so
    the file stays one curve with no step repeated; a fresh run starts a fresh file. The
    parameter counts are the first record of each attempt."""

    name = "jsonl"

    def __init__(self, info: RunInfo) -> None:
        self.path = info.run_dir.metrics
        if info.resume_step is not None and self.path.is_file():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= info.resume_step
            ]
            atomic_write(self.path, "".join(f"{line}\n" for line in kept))
        elif info.resume_step is None and self.path.is_file():
            self.path.unlink()  # a fresh run starts a fresh curve
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - held for the whole run
        if info.params:
            self.log(info.start_step, info.params)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")

    def alert(self, kind: str, message: str, level: str) -> None:
        """Nothing: events have their own file (training.observe.events)."""

    def finish(self) -> None:
        self._file.close()
