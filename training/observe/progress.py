"""Rank 0's progress bar (steps, loss, tokens/s, ETA) on a terminal.

Off a terminal (a scheduler's log files, pipes) there is no bar: the trainer's periodic log
lines carry the same figures.
"""

from __future__ import annotations

import logging
import sys
from typing import Any


class ProgressBar:
    """A rich progress bar; log lines print above it while it is shown."""

    def __init__(
        self, total_steps: int, start_step: int, *, enabled: bool, console: Any = None
    ) -> None:
        self.progress: Any = None
        if not enabled or (console is None and not sys.stdout.isatty()):
            return
        from rich.console import Console
        from rich.logging import RichHandler
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console or Console(),
        )
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=start_step, info=""
        )
        logger = logging.getLogger("gptrain")
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                logger.removeHandler(handler)  # rank 0's stdout lines go through rich instead
        logger.addHandler(RichHandler(console=self.progress.console, show_path=False))
        self.progress.start()

    def update(self, step: int, loss: float | None = None, tokens_per_s: float | None = None):
        if self.progress is None:
            return
        info = "" if loss is None else f"loss {loss:.4f} | {tokens_per_s or 0:,.0f} tok/s"
        self.progress.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
