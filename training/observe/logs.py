"""Logging: every rank writes its own log (`RunDir.rank_log`); only rank 0 prints."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from training.run.paths import RunDir

_FORMAT = "%(asctime)s rank{rank} %(levelname)s %(message)s"


def setup_logging(run_dir: Path, rank: int) -> None:
    """Log to `run_dir`'s log of `rank` (and to stdout on rank 0)."""
    log_file = RunDir(run_dir).rank_log(rank)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("gptrain")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    formatter = logging.Formatter(_FORMAT.format(rank=rank), datefmt="%H:%M:%S")
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(formatter)
    logger.addHandler(file_handler)
    if rank == 0:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(stream)
    # DeepSpeed is chatty on every rank; keep its warnings, drop its info lines.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


DEBUG_ENV = "GPTRAIN_DEBUG"  # set (e.g. =1) to see library warnings and notices


class _DeepSpeedNotices(logging.Filter):
    """Drops DeepSpeed's info lines and its accelerator notice ("Setting accelerator to
    CPU ...", printed by every process that imports it); its real warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and record.filename != "real_accelerator.py"


def quiet_libraries() -> None:
    """Default output is ours: library warnings (Python `warnings`) and DeepSpeed's
    notices appear only with GPTRAIN_DEBUG set. Cheap: imports nothing heavy, so it runs
    first, before DeepSpeed creates its logger."""
    import os
    import warnings

    if os.environ.get(DEBUG_ENV):
        return
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("DeepSpeed").addFilter(_DeepSpeedNotices())


@contextlib.contextmanager
def library_prints() -> Iterator[None]:
    """Swallow what a library prints to stdout/stderr (DeepSpeed's zero_to_fp32 steps, its
    progress bars) unless GPTRAIN_DEBUG is set: default output is ours."""
    import os

    if os.environ.get(DEBUG_ENV):
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def hms(seconds: float) -> str:
    """`h:mm:ss` for durations and ETAs (negative clamps to 0)."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
