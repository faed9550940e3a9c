"""Run tasks in spawned processes that stop cleanly when the run is stopped.

SIGTERM (the parent stopping, or `gptrain cancel` signalling the process group)
unwinds a running task like Ctrl-C, so its `finally`/`except` cleanup runs (a
slice removes its temp dir and shuts down its tokenizer processes); a second one
meanwhile is ignored. Between tasks it ends the process quietly.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
STOP_TIMEOUT_S = 10.0  # running tasks get this long to clean up after SIGTERM

_state = "idle"  # of this pool process: idle | running | unwinding


def run_stoppable(
    fn: Callable[..., T],
    calls: list[tuple[Any, ...]],
    processes: int,
    on_result: Callable[[T], None],
) -> None:
    """`fn(*args)` for each of `calls` in `processes` spawned processes; each result goes to
    `on_result` in call order. Any exception meanwhile (a task's, Ctrl-C, SIGTERM) cancels
    the tasks not started and stops the running ones (SIGTERM, then SIGKILL) before it is
    raised; a process that dies raises BrokenProcessPool."""
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(processes, ctx, initializer=_init_process) as pool:
        try:
            for future in [pool.submit(_run, fn, *args) for args in calls]:
                on_result(future.result())
        except BaseException:
            _stop(pool)
            raise


def _init_process() -> None:
    # Parallelism comes from the pool's processes; Rust threads in each would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    global _state
    if _state == "idle":
        raise SystemExit(128 + signum)
    if _state == "running":
        _state = "unwinding"
        raise KeyboardInterrupt(f"signal {signum}")


def _run(fn: Callable[..., T], *args: Any) -> T:
    global _state
    _state = "running"
    try:
        return fn(*args)
    finally:
        _state = "idle"


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel the tasks not started and stop the running ones (SIGTERM, then SIGKILL)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
