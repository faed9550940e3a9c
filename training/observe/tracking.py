"""Metrics of a run: `RUN_DIR/metrics.jsonl` always, Weights & Biases when enabled.

Only global rank 0 tracks (other ranks' values are reduced to it first). The W&B
run id is kept in `RUN_DIR/wandb_run_id` and reused with `resume="allow"`, so a
requeued or resumed job continues the same W&B run instead of starting a new one.
The API key is read by wandb from the environment; nothing here writes it.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from training.config import TrackingConfig
from training.observe.metrics import JsonlSink

log = logging.getLogger("gptrain")
WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(run_dir: Path) -> str:
    """The run's W&B id: created once, then reused by every resume and requeue."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    from sharding.atomic import atomic_write

    run_id = uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
    atomic_write(path, run_id)
    return run_id


def has_wandb_credentials(environ: Mapping[str, str]) -> bool:
    """Whether wandb can log in without asking: WANDB_API_KEY, or a netrc entry for the
    W&B host (what `wandb login` writes)."""
    if environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    path = environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Tracker:
    """What the trainer logs to. A no-op on ranks other than 0."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: Path,
        *,
        rank: int,
        resume_step: int | None,
        config: dict[str, Any],
        name: str,
    ) -> None:
        self.cfg = cfg
        self.active = rank == 0
        self.jsonl = JsonlSink(run_dir / "metrics.jsonl", resume_step) if self.active else None
        self.wandb_run: Any = None
        if self.active and cfg.wandb.mode != "disabled":
            self._start_wandb(run_dir, config, name)

    def _start_wandb(self, run_dir: Path, config: dict[str, Any], name: str) -> None:
        """W&B never stops training: online without credentials runs offline (one
        warning; `wandb sync` later), and a failing init runs without W&B."""
        w = self.cfg.wandb
        mode = w.mode
        if mode == "online" and not has_wandb_credentials(os.environ):
            log.warning(
                "tracking.wandb.mode: online, but no W&B credentials (WANDB_API_KEY or "
                "~/.netrc); logging offline to %s/wandb (wandb sync it later)",
                run_dir,
            )
            mode = "offline"
        try:
            import wandb

            self.wandb_run = wandb.init(
                project=w.project,
                entity=w.entity,
                group=w.group,
                name=w.name or name,
                tags=w.tags,
                config=config,
                id=wandb_run_id(run_dir),
                resume="allow",
                dir=str(run_dir),
                mode=mode,
            )
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("W&B init failed (%s); training without W&B", reason)
            return
        log.info("W&B run %s (%s)", self.wandb_run.id, mode)

    def log(self, record: dict[str, Any]) -> None:
        """One record (train window, eval or checkpoint) at `record["step"]`."""
        if not self.active:
            return
        self.jsonl.log(record)  # type: ignore[union-attr]
        if self.wandb_run is None:
            return
        step = record["step"]
        if "loss" in record and step % self.cfg.wandb.log_every:
            return  # eval and checkpoint records always go through
        values = {k: v for k, v in record.items() if k != "step" and v is not None}
        self._wandb_call("log", values, step=step)

    def log_params(self, counts: dict[str, int], step: int) -> None:
        """Trainable and total parameter counts: printed, a metrics.jsonl record, and
        values of the W&B run config."""
        if not self.active:
            return
        trainable, total = counts["params_trainable"], counts["params_total"]
        log.info(
            "parameters: %s trainable of %s (%.2f%%)",
            f"{trainable:,}",
            f"{total:,}",
            100.0 * trainable / max(total, 1),
        )
        self.jsonl.log({"step": step, **counts})  # type: ignore[union-attr]
        if self.wandb_run is not None:
            try:
                self.wandb_run.config.update(counts, allow_val_change=True)
            except Exception as exc:  # noqa: BLE001 - W&B must never stop training
                log.warning("W&B config update failed (%s)", exc)

    def _wandb_call(self, method: str, *args: Any, **kwargs: Any) -> None:
        """W&B must never stop training: a signal sent to the whole SLURM step (preemption,
        time limit) also kills wandb's service process. Drop W&B for the rest of this
        process instead; the requeued job continues the same W&B run."""
        try:
            getattr(self.wandb_run, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any W&B failure is non-fatal here
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("W&B %s failed (%s); continuing without W&B here", method, reason)
            self.wandb_run = None

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb_run is not None:
            self._wandb_call("finish")
