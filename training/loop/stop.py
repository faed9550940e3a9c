"""Stop signals: what a rank does when asked to stop (save, then exit with the stop or
requeue code), decided by every rank together at a step boundary."""

from __future__ import annotations

import signal
import time
from typing import Any


class StopFlag:
    """Set by SIGTERM/SIGUSR1/SIGUSR2 or a first Ctrl-C; ranks agree on it at step
    boundaries, save and exit. SIGUSR2 (a scheduler's time-limit/preemption notice) also
    asks for a requeue. A second Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

    def __init__(self, budget_s: float | None = None) -> None:
        self.signum: int | None = None
        self.requeue = False
        self.budget_s = budget_s  # from a stop signal until the job is killed; None: no limit
        self.received_s: float | None = None  # time.monotonic() of the first stop signal
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.receive(signum)

    def receive(self, signum: int) -> None:
        """Stop signal `signum` arrived (from the handler, or one that came earlier)."""
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self.requeue = self.requeue or signum == signal.SIGUSR2
        if self.received_s is None:
            self.received_s = time.monotonic()

    @property
    def deadline_s(self) -> float | None:
        """When (time.monotonic) the scheduler kills the job after the first stop
        signal; None when there is no known limit (or no signal yet)."""
        if self.budget_s is None or self.received_s is None:
            return None
        return self.received_s + self.budget_s

    def settle(self) -> None:
        """The rank is exiting after a stop: further stop signals change nothing, and must
        not kill it while the interpreter shuts down (Python restores the default
        handlers then, and torchrun SIGTERMs the ranks left once one has exited)."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
