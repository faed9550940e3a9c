"""Weights & Biases (`tracking.wandb`): one W&B run per run dir.

Its id is kept in `RUN_DIR/wandb_run_id` and reused with `resume="allow"`, so a requeued
or resumed job continues the same W&B run instead of starting a new one. Online without
credentials logs offline (`wandb sync` later). The API key is read by wandb from the
environment; nothing here writes it.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

from sharding.atomic import atomic_write
from training.config import WandbConfig
from training.observe.sinks import RunInfo, numeric_metrics
from training.run.paths import RunDir

log = logging.getLogger("gptrain")


def wandb_run_id(run_dir: RunDir) -> str:
    """The run's W&B id: created once, then reused by every resume and requeue."""
    path = run_dir.wandb_id_file
    if path.is_file():
        return path.read_text().strip()
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


class WandbSink:
    """A W&B run: the resolved config and parameter counts as its config; train windows
    every `log_every` steps, eval and checkpoint records always; events as W&B alerts."""

    name = "wandb"

    def __init__(self, cfg: WandbConfig, info: RunInfo) -> None:
        import wandb

        self.cfg = cfg
        mode = cfg.mode
        root = info.run_dir.root
        if mode == "online" and not has_wandb_credentials(os.environ):
            log.warning(
                "tracking.wandb.mode: online, but no W&B credentials (WANDB_API_KEY or "
                "~/.netrc); logging offline to %s/wandb (wandb sync it later)",
                root,
            )
            mode = "offline"
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            name=cfg.name or info.name,
            tags=cfg.tags,
            config=dict(info.config),
            id=wandb_run_id(info.run_dir),
            resume="allow",
            dir=str(root),
            mode=mode,
        )
        # allow_val_change: a resumed run's config holds the first attempt's counts
        self.run.config.update(dict(info.params), allow_val_change=True)
        log.info("W&B run %s (%s)", self.run.id, mode)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if "loss" in metrics and step % self.cfg.log_every:
            return  # a train window between log_every steps; eval and checkpoints always go
        # W&B keeps the flat keys it always had ("loss", "eval_loss"): a run dir from before
        # continues the same W&B run, and its curves must not split across two names.
        values = numeric_metrics(metrics, namespaced=False)
        if values:
            self.run.log(values, step=step)

    def alert(self, kind: str, message: str, level: str) -> None:
        import wandb

        self.run.alert(
            title=f"gptrain: {kind}", text=message, level=getattr(wandb.AlertLevel, level)
        )

    def finish(self) -> None:
        self.run.finish()
