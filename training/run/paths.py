"""The run directory's layout, in one place: every path in `RUN_DIR`, the job record
(`job.json`) and the job states it holds.

    RUN_DIR/
      run.lock              who owns the run (training.run.rundir)
      job.json              what was launched and its state (JobState)
      config.yaml           the resolved config of the latest attempt
      launch/config.yaml    the config file a launcher handed to the ranks
      tokenizer/            the run's tokenizer (usable without the data dir)
      checkpoints/          step_000123/ …, `latest`, `best`
      logs/                 rank{R}.log, rank{R}.error.json, the launcher's logs
      heartbeat/            rank{R}.json: each rank's last sign of life
      events.jsonl          events people should hear about
      metrics.jsonl         one record per logged step, eval and checkpoint
      tensorboard/          TensorBoard event files (tracking.tensorboard)
      wandb/, wandb_run_id  the W&B run, continued by every resume
      mlflow_run_id         the MLflow run, continued by every resume
      mlruns/               the MLflow file store, when no tracking URI is given
      archive/<time>/       earlier runs moved aside by `train.resume: overwrite`
      eval/samples.jsonl    `gptrain evaluate --generate`'s completions
      plot.png              `gptrain plot`'s curves
      slurm/<job>/          the SLURM backend's own scripts and task logs (its layout)

An existing run dir keeps working: this module names what was already there.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharding.atomic import atomic_write


class JobState(str, enum.Enum):
    """A job's state as the job record keeps it: a scheduler's accounting words, plus
    STOPPED (a run that saved and ended on a stop signal). A `str` so that JSON and
    comparisons with plain strings keep working."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    REQUEUED = "REQUEUED"
    SUSPENDED = "SUSPENDED"
    COMPLETED = "COMPLETED"
    STOPPED = "STOPPED"
    PREEMPTED = "PREEMPTED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"

    def __str__(self) -> str:
        return self.value

    @property
    def active(self) -> bool:
        """The job is not over (it may still write to the run dir)."""
        return self in (JobState.PENDING, JobState.RUNNING, JobState.REQUEUED)

    @classmethod
    def parse(cls, word: str) -> JobState | None:
        """The state named `word` (e.g. a scheduler's "CANCELLED"), None for another word."""
        try:
            return cls(word)
        except ValueError:
            return None


@dataclass(frozen=True)
class RunDir:
    """Every path of one run directory. A value: building it touches no file."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def find(cls, under: Path, max_depth: int = 4) -> list[RunDir]:
        """The run dirs (and prepare outputs) below `under` that hold a job record,
        at most `max_depth` levels down."""
        return [
            cls(p.parent)
            for p in under.glob(f"**/{cls('.').job_file.name}")
            if len(p.relative_to(under).parts) <= max_depth
        ]

    # --- files of the run --------------------------------------------------------------
    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    @property
    def job_file(self) -> Path:
        return self.root / "job.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def launch_config(self) -> Path:
        return self.root / "launch" / "config.yaml"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def eval_samples(self) -> Path:
        """`gptrain evaluate --generate`'s completions (default place)."""
        return self.root / "eval" / "samples.jsonl"

    @property
    def plot(self) -> Path:
        """`gptrain plot`'s PNG (default place)."""
        return self.root / "plot.png"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb_id_file(self) -> Path:
        return self.root / "wandb_run_id"

    @property
    def mlflow_id_file(self) -> Path:
        return self.root / "mlflow_run_id"

    @property
    def mlruns(self) -> Path:
        return self.root / "mlruns"

    # --- checkpoints ---------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        """Step dirs, `latest` and `best`: their layout is training.checkpoint.store's."""
        return self.root / "checkpoints"

    # --- per rank --------------------------------------------------------------------------
    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    def rank_error(self, rank: int) -> Path:
        """Rank `rank`'s recorded failure (training.run.failures)."""
        return self.logs / f"rank{rank}.error.json"

    def rank_logs(self) -> list[Path]:
        return sorted(self.logs.glob("rank*.log"))

    def rank_errors(self) -> list[Path]:
        return sorted(self.logs.glob("rank*.error.json"))

    @property
    def heartbeats(self) -> Path:
        return self.root / "heartbeat"

    def heartbeat(self, rank: int) -> Path:
        return self.heartbeats / f"rank{rank}.json"

    # --- the job record ---------------------------------------------------------------------
    def read_job(self) -> dict[str, Any] | None:
        """`job.json` as a dict; None when there is none."""
        try:
            return json.loads(self.job_file.read_text())
        except FileNotFoundError:
            return None

    def write_job(self, record: Mapping[str, Any]) -> None:
        """The one routine that writes `job.json` (atomically: `gptrain cancel` and the run
        may save at the same time, and a reader never sees half a record)."""
        atomic_write(self.job_file, json.dumps(dict(record), indent=2))
