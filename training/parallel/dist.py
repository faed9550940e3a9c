"""Distributed setup from the torchrun environment only.

The trainer reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT,
so the same code runs under torchrun, a scheduler's task or as a single process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env(environ: Mapping[str, str]) -> DistEnv:
    """Rank layout from torchrun variables; a single process when none is set."""
    world_size = int(environ.get("WORLD_SIZE", "1"))
    rank = int(environ.get("RANK", "0"))
    local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (nccl on GPU, gloo on CPU);
    collectives give up after `timeout_s` (None: the library default)."""
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    env = dist_env(os.environ)
    if "MASTER_ADDR" not in os.environ:  # plain `gptrain train`: a world of one
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
        )
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        import importlib

        # The shared-memory allreduce op costs a ~45 s JIT build and gloo does not use it.
        # (importlib: the attribute `deepspeed.comm.torch` is the torch package itself.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    else:
        accelerator.set_device(env.local_rank)
    kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), **kwargs)
    return env
