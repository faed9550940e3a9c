"""Logging: every rank writes `logs/rank{R}.log`; only rank 0 prints."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_FORMAT = "%(asctime)s rank{rank} %(levelname)s %(message)s"


def setup_logging(log_dir: Path, rank: int) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("gptrain")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    formatter = logging.Formatter(_FORMAT.format(rank=rank), datefmt="%H:%M:%S")
    file_handler = logging.FileHandler(log_dir / f"rank{rank}.log")
    file_handler.setFormatter(formatter)
    logger.addHandler(file_handler)
    if rank == 0:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(stream)
    # DeepSpeed is chatty on every rank; keep its warnings, drop its info lines.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def hms(seconds: float) -> str:
    """`h:mm:ss` for durations and ETAs (negative clamps to 0)."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
