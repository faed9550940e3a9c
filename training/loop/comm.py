"""Small host-side collectives: token counts, the stop agreement, a log window's stats.

They go over gloo on CPU tensors: an NCCL collective read back with `.item()` would
wait for the GPU to drain, and these run every step.
"""

from __future__ import annotations

import datetime
from typing import Any


class Collectives:
    """Sums, gathers and agreements of host numbers over every rank."""

    def __init__(self, group: Any, world_size: int) -> None:
        self.group = group  # None: the default group is gloo already
        self.world_size = world_size

    @classmethod
    def start(cls, timeout_s: float, world_size: int) -> Collectives:
        """On the default group when it is gloo, else on a new gloo group."""
        import torch.distributed as dist

        if dist.get_backend() == "gloo":
            return cls(None, world_size)
        timeout = datetime.timedelta(seconds=timeout_s)
        return cls(dist.new_group(backend="gloo", timeout=timeout), world_size)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum host numbers over ranks."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def all_gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values`, by rank."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        rows = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(rows, t, group=self.group)
        return [row.tolist() for row in rows]

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any (e.g. a signal reached one rank)."""
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def everyone(self, flag: bool) -> bool:
        """True on every rank if it is true on every rank (e.g. all writes are done)."""
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] == self.world_size

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()
