"""Fault injection for tests, in one place: environment variables a test sets to make a
real failure happen at a chosen rank and step (or prepare slice). Unset, each hook is a
dict lookup. It lives in the lowest package so that every layer reads its hooks here.

The variables, their values and effects are listed in the README's development
section (a unit test keeps the two in step). Steps count from 1 (the step being
computed, as logged).
"""

from __future__ import annotations

import os
import signal
import time

SIGNAL_AT_STEP = "GPTRAIN_FAULT_SIGNAL_AT_STEP"
KILL_IN_SAVE = "GPTRAIN_FAULT_KILL_IN_SAVE"
NAN_AT_STEPS = "GPTRAIN_FAULT_NAN_AT_STEPS"
SLEEP_IN_STEP = "GPTRAIN_FAULT_SLEEP_IN_STEP"
SLOW_WRITE = "GPTRAIN_FAULT_SLOW_WRITE"
SLOW_COPY = "GPTRAIN_FAULT_SLOW_COPY"
PREPARE_SLICE = "GPTRAIN_FAULT_PREPARE_SLICE"
PREPARE_SLOW_S = "GPTRAIN_FAULT_PREPARE_SLOW_S"


def kill_slice(k: int) -> bool:
    """Whether prepare slice `k` is to exit hard mid-write (a killed array task)."""
    return os.environ.get(PREPARE_SLICE) == str(k)


def prepare_slow_s() -> float:
    """Seconds each prepare slice sleeps at every progress report (a slow prepare)."""
    return float(os.environ.get(PREPARE_SLOW_S) or 0)


def signal_at(variable: str, rank: int, step: int, signum: int) -> None:
    """VARIABLE=RANK:STEP delivers a real signal to this process at that rank and step:
    `signum`, or the one a third field names (RANK:STEP:TERM → SIGTERM, …:KILL → SIGKILL)."""
    who, _, rest = (os.environ.get(variable) or "").partition(":")
    at, _, name = rest.partition(":")
    if who == str(rank) and at == str(step):
        os.kill(os.getpid(), getattr(signal, f"SIG{name}") if name else signum)


def nan_loss(rank: int, step: int) -> bool:
    """Whether this rank's loss is to be NaN at `step` (GPTRAIN_FAULT_NAN_AT_STEPS)."""
    value = os.environ.get(NAN_AT_STEPS)
    if not value:
        return False
    who, _, ranges = value.partition(":")
    if int(who) != rank:
        return False
    for part in ranges.split(","):
        first, _, last = part.partition("-")
        if int(first) <= step <= int(last or first):
            return True
    return False


def sleep_in_step(rank: int, step: int) -> None:
    """GPTRAIN_FAULT_SLEEP_IN_STEP=RANK:STEP:SECONDS: a straggler or a hung rank."""
    value = os.environ.get(SLEEP_IN_STEP)
    if not value:
        return
    who, at, seconds = value.split(":")
    if int(who) == rank and (at == "*" or int(at) == step):
        time.sleep(float(seconds))


def slow_write(rank: int, variable: str = SLOW_WRITE) -> None:
    """GPTRAIN_FAULT_SLOW_WRITE=RANK:SECONDS: each checkpoint file this rank writes in the
    background waits that long first (RANK `*`: every rank), so a test can act while a
    write is in flight. `variable` SLOW_COPY: the same before each file's copy to host
    memory (the snapshot the optimizer step must wait for)."""
    value = os.environ.get(variable)
    if not value:
        return
    who, seconds = value.split(":")
    if who in ("*", str(rank)):
        time.sleep(float(seconds))
