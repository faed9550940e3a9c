"""What `gptrain launch --backend local` runs: torchrun's launcher, quiet, ending with
the ranks' own exit code.

    python -m launcher.ranks --run-dir RUN_DIR --standalone --nproc-per-node 2 \
        -m launcher.cli train RUN_DIR/launch/config.yaml

Plain torchrun turns every rank's nonzero exit — also a stop after a checkpoint
(exit 76) or a requeue request (75) — into exit 1 and a traceback, and on SIGTERM
gives the ranks 30 s before killing them (a large checkpoint takes longer). Here a
SIGTERM or SIGINT is relayed to the ranks (they checkpoint and exit), the exit
code is 76 or 75 when every failed rank stopped that way, else 1, and a rank
killed by a signal is recorded in the run dir (`training.run.failures`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.errors import EXIT_REQUEUE, EXIT_STOPPED
from training.observe.logs import DEBUG_ENV  # set: torchrun's own log lines too

EXIT_USER_ERROR = 2  # = launcher.cli: a one-line error
SILENT_DEATHS = ("SIGKILL", "SIGSEGV", "SIGBUS")  # a rank killed so caused what followed


def exit_code(codes: Sequence[int]) -> int:
    """The launch's exit code from its failed ranks' codes: a stop when all stopped, a
    user error (2: each rank recorded its line, `training.run.failures`) when all failed so,
    else 1."""
    if codes and all(c in (EXIT_REQUEUE, EXIT_STOPPED) for c in codes):
        return EXIT_REQUEUE if EXIT_REQUEUE in codes else EXIT_STOPPED
    if codes and all(c == EXIT_USER_ERROR for c in codes):
        return EXIT_USER_ERROR
    return 1


def _relay(signum: int, frame: Any) -> None:
    """Ask every rank (a direct child) to checkpoint and stop; DataLoader workers and
    the like are left to their rank."""
    import psutil

    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):  # already gone
            child.send_signal(signal.SIGTERM)


def record_killed(run_dir: Path, failures: dict[int, Any], since: float) -> None:
    from training.run.failures import failures as recorded
    from training.run.failures import last_alive, write_failure

    have = {entry["rank"] for entry in recorded(run_dir, since)}
    for rank, failure in failures.items():
        if failure.exitcode < 0 and rank not in have:
            name = signal.Signals(-failure.exitcode).name
            hint = " (out of memory?)" if name == "SIGKILL" else ""
            # A death nobody asked for (OOM killer, a crash) is a cause: filed when the rank
            # was last alive, ahead of the peers' lost connections it caused. A SIGTERM or
            # SIGABRT (e.g. a collective watchdog) may be a consequence: filed when noticed.
            alive = last_alive(run_dir, rank) if name in SILENT_DEATHS else None
            at = alive if alive is not None and alive >= since else failure.timestamp or None
            write_failure(run_dir, rank, f"killed by {name}{hint}", at)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--run-dir":
        print("usage: python -m launcher.ranks --run-dir RUN_DIR TORCHRUN_ARGS...", file=sys.stderr)
        return 2
    run_dir, args = Path(args[1]), args[2:]
    # Stops are handled here, not by torchrun (which would kill the ranks 30 s later).
    args = ["--signals-to-handle=SIGHUP,SIGQUIT", *args]
    signal.signal(signal.SIGTERM, _relay)
    signal.signal(signal.SIGINT, _relay)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not os.environ.get(DEBUG_ENV):  # its notices and its own view of the ranks' exits
        for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.dist")]:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    start = time.time()
    try:
        run(parse_args(args))
    except ChildFailedError as exc:
        record_killed(run_dir, exc.failures, start)
        return exit_code([f.exitcode for f in exc.failures.values()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
