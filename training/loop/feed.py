"""This rank's train data: the micro-batches of each step, the step's global target
count, and the loader position a checkpoint keeps (any world size resumes from it)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from training.config import BatchLayout, TrainJob
from training.errors import TrainingError
from training.loop.comm import Collectives
from training.models.loss import target_count
from training.parallel.dist import DistEnv
from training.parallel.sequence import ParallelDims

if TYPE_CHECKING:
    import torch

    from sharding.loader import TokenLoader


class DataFeed:
    """The train split's loader on this rank and its iterator."""

    def __init__(
        self,
        loader: TokenLoader,
        layout: BatchLayout,
        seq_len: int,
        comm: Collectives,
        sp_size: int = 1,
    ) -> None:
        self.sp_size = sp_size  # ranks holding the same batch (sequence parallelism)
        self.loader = loader
        self.batches: Iterator[dict[str, torch.Tensor]] = iter(loader)
        self.layout, self.seq_len, self.comm = layout, seq_len, comm

    @classmethod
    def build(
        cls,
        job: TrainJob,
        env: DistEnv,
        layout: BatchLayout,
        comm: Collectives,
        state: dict[str, Any] | None,
    ) -> DataFeed:
        """At `state` (a checkpoint's loader position), or at the start."""
        from sharding.loader import build_loader

        dims = ParallelDims(env.world_size, job.deepspeed.sequence_parallel_size)
        loader = build_loader(
            job.data,
            split="train",
            rank=dims.dp_rank(env.rank),  # an SP group's ranks read the same samples
            world_size=dims.dp_size,
            micro_batch_size=layout.micro_batch_size,
            seed=job.run.seed,
            state=state,
        )
        return cls(loader, layout, job.data.seq_len, comm, dims.sp_size)

    @property
    def samples_per_epoch(self) -> int:
        return self.loader.samples_per_epoch

    def next_step(self) -> list[dict[str, Any]]:
        """The micro-batches of one optimizer step."""
        return [next(self.batches) for _ in range(self.layout.grad_accum_steps)]

    def global_tokens(self, step: int, micro: list[dict[str, Any]]) -> float:
        """Target tokens of the step's global batch: a host sum of the CPU labels over
        ranks for loss-masked data; packed text has every label a target (no collective)."""
        if self.loader.dataset.masked:
            local = float(sum(target_count(b["labels"]) for b in micro))
            (tokens,) = self.comm.all_reduce_sum([local])
            tokens /= self.sp_size  # each SP group counted its one batch sp times
        else:
            tokens = float(self.layout.global_batch_size * self.seq_len)
        if tokens == 0:
            raise TrainingError(
                f"step {step}: no completion token of the global batch is a loss target — "
                f"records longer than data.seq_len {self.seq_len} lose their prompt to "
                "packing; raise data.seq_len"
            )
        return tokens

    def state_dict(self) -> dict[str, Any]:
        """The loader position: {"epoch", "consumed", "seed"}."""
        return self.loader.state_dict()
