"""Where a run's metrics go: one interface (`MetricSink`), one sink per file, and the
fan-out the trainer logs to (`Metrics`).

    jsonl.py             RUN_DIR/metrics.jsonl, always (its flat keys are the on-disk format)
    wandb_sink.py        Weights & Biases (tracking.wandb.mode: online | offline)
    tensorboard_sink.py  TensorBoard event files (tracking.tensorboard.enabled)
    mlflow_sink.py       an MLflow run (tracking.mlflow.enabled or .tracking_uri)

Only global rank 0 tracks (other ranks' values are reduced to it first). Each sink is told
about the run once (`RunInfo`, at construction) and then gets `log(step, metrics)` with
the trainer's flat keys ("loss", "eval_loss", "checkpoint_s", …); TensorBoard and MLflow
name them with `metric_name` ("train/loss", "eval/loss", …), while the JSONL file and W&B
keep the flat keys (W&B always had them: a resumed run keeps one curve). A resumed or
requeued run continues the same W&B run, TensorBoard dir and MLflow run.

No tracker may stop training: a sink that raises, when built or at any later call, is
dropped for the rest of the process with one warning, and the others go on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from training.config import TrackingConfig
from training.errors import first_line
from training.run.paths import RunDir

log = logging.getLogger("gptrain")

# The trainer's flat keys that are not named by a prefix rule (see `metric_name`).
RENAMED = {"checkpoint_s": "checkpoint/save_s"}
PREFIXES = {"eval_": "eval/", "params_": "params/", "checkpoint_": "checkpoint/"}


def metric_name(key: str) -> str:
    """The name a tracker shows for the trainer's flat key `key`: `eval_loss` →
    `eval/loss`, `checkpoint_s` → `checkpoint/save_s`, `params_total` → `params/total`,
    any other key → `train/<key>` (so `loss` → `train/loss`)."""
    if key in RENAMED:
        return RENAMED[key]
    for prefix, namespace in PREFIXES.items():
        if key.startswith(prefix):
            return namespace + key[len(prefix) :]
    return f"train/{key}"


def numeric_metrics(metrics: Mapping[str, Any], *, namespaced: bool = True) -> dict[str, float]:
    """`metrics` under their tracker names (`metric_name`; the flat keys when not
    `namespaced`), numbers only: None (e.g. `mfu` on CPU) and other non-numbers are left
    out; NaN and inf are kept."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[metric_name(key) if namespaced else key] = float(value)
    return out


@dataclass(frozen=True)
class RunInfo:
    """What every sink is told about the run, once, when it is built."""

    run_dir: RunDir
    name: str  # the run's display name (run.name, else the run dir's basename)
    config: Mapping[str, Any]  # the resolved config tree
    resume_step: int | None  # the checkpoint step this attempt resumes from; None: fresh
    params: Mapping[str, int] = field(default_factory=dict)  # params_trainable, params_total

    @property
    def start_step(self) -> int:
        """The step this attempt starts at (0 for a fresh run)."""
        return self.resume_step or 0


class MetricSink(Protocol):
    """One tracker. Any method may raise: `Metrics` drops a sink that does."""

    name: str  # as in the config: tracking.<name>

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One record at `step`: a train window, an eval or a checkpoint (flat keys;
        values may be None)."""

    def alert(self, kind: str, message: str, level: str) -> None:
        """An event people should hear about (training.observe.events; rate-limited
        there). `level`: INFO | WARN | ERROR."""

    def finish(self) -> None:
        """The process is done with the run (completed, stopped or failed): flush, close."""


SinkFactory = Callable[[TrackingConfig, RunInfo], MetricSink]


def enabled_sinks(cfg: TrackingConfig) -> list[tuple[str, SinkFactory]]:
    """The sinks `cfg` turns on, in logging order, as (name, factory). Each sink's module
    (and its library) is imported only when it is on."""
    out: list[tuple[str, SinkFactory]] = [("jsonl", _jsonl)]
    if cfg.wandb.mode != "disabled":
        out.append(("wandb", _wandb))
    if cfg.tensorboard.enabled:
        out.append(("tensorboard", _tensorboard))
    if cfg.mlflow.on:
        out.append(("mlflow", _mlflow))
    return out


def _jsonl(cfg: TrackingConfig, info: RunInfo) -> MetricSink:
    from training.observe.sinks.jsonl import JsonlSink

    return JsonlSink(info)


def _wandb(cfg: TrackingConfig, info: RunInfo) -> MetricSink:
    from training.observe.sinks.wandb_sink import WandbSink

    return WandbSink(cfg.wandb, info)


def _tensorboard(cfg: TrackingConfig, info: RunInfo) -> MetricSink:
    from training.observe.sinks.tensorboard_sink import TensorBoardSink

    return TensorBoardSink(cfg.tensorboard, info)


def _mlflow(cfg: TrackingConfig, info: RunInfo) -> MetricSink:
    from training.observe.sinks.mlflow_sink import MlflowSink

    return MlflowSink(cfg.mlflow, info)


class Metrics:
    """What the trainer logs to: every enabled sink on rank 0, nothing elsewhere.

    Built on every rank (so callers need not ask which rank they are on); on rank 0 it
    prints the parameter counts and builds the sinks, each of which records them."""

    def __init__(self, cfg: TrackingConfig, info: RunInfo, *, rank: int) -> None:
        self.sinks: list[MetricSink] = []
        self._lock = threading.Lock()  # the hang watchdog's thread may alert meanwhile
        if rank != 0:
            return
        if info.params:
            trainable, total = info.params["params_trainable"], info.params["params_total"]
            log.info(
                "parameters: %s trainable of %s (%.2f%%)",
                f"{trainable:,}",
                f"{total:,}",
                100.0 * trainable / max(total, 1),
            )
        for name, factory in enabled_sinks(cfg):
            try:
                self.sinks.append(factory(cfg, info))
            except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
                _warn(name, exc)

    @property
    def names(self) -> list[str]:
        """The sinks still logging."""
        return [sink.name for sink in self.sinks]

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One record at `step` (flat keys, without "step"), to every sink."""
        self._each(lambda sink: sink.log(step, metrics))

    def alert(self, kind: str, message: str, level: str) -> None:
        """An event's alert, to every sink (the caller rate-limits)."""
        self._each(lambda sink: sink.alert(kind, message, level))

    def finish(self) -> None:
        """Close every sink; the fan-out is empty afterwards."""
        self._each(lambda sink: sink.finish())
        with self._lock:
            self.sinks = []

    def _each(self, call: Callable[[MetricSink], None]) -> None:
        """`call` on each sink; one that raises is dropped with one warning.

        A signal a scheduler sends to the whole job step (preemption, time limit) also kills
        wandb's service process, so its next call raises: dropping the sink for the
        rest of this process is the answer (the requeued job continues the same run)."""
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
                self._drop(sink, exc)

    def _drop(self, sink: MetricSink, exc: BaseException) -> None:
        with self._lock:
            if sink not in self.sinks:
                return  # another thread dropped it already: one warning per sink
            self.sinks = [s for s in self.sinks if s is not sink]
        _warn(sink.name, exc)  # not finished: a broken tracker may hang there (W&B's service)


def _warn(name: str, exc: BaseException) -> None:
    log.warning("tracking.%s: %s; continuing without it", name, first_line(exc))
