"""Fault injection for tests, in one place: environment variables a test sets to make a
real failure happen at a chosen rank and step. Unset, each hook is a dict lookup.

| variable | value | effect |
|---|---|---|
| `GPTRAIN_FAULT_SIGNAL_AT_STEP` | `RANK:STEP` | that rank sends itself SIGUSR1 after STEP |
| `GPTRAIN_FAULT_KILL_IN_SAVE` | `RANK:STEP` | SIGKILL mid-save of checkpoint STEP |
| `GPTRAIN_FAULT_NAN_AT_STEPS` | `RANK:A-B,C,...` | that rank's loss is NaN at those steps |
| `GPTRAIN_FAULT_SLEEP_IN_STEP` | `RANK:STEP:SECONDS` | that rank sleeps in step STEP (`*`: each) |

Steps count from 1 (the step being computed, as logged).
"""

from __future__ import annotations

import os
import time

SIGNAL_AT_STEP = "GPTRAIN_FAULT_SIGNAL_AT_STEP"
KILL_IN_SAVE = "GPTRAIN_FAULT_KILL_IN_SAVE"
NAN_AT_STEPS = "GPTRAIN_FAULT_NAN_AT_STEPS"
SLEEP_IN_STEP = "GPTRAIN_FAULT_SLEEP_IN_STEP"


def signal_at(variable: str, rank: int, step: int, signum: int) -> None:
    """VARIABLE=RANK:STEP delivers a real signal to this process at that rank and step."""
    if os.environ.get(variable) == f"{rank}:{step}":
        os.kill(os.getpid(), signum)


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
