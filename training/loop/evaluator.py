"""The val loss: mean token loss over up to `train.eval_steps` micro-batches per rank of
the val split, the same samples at every eval (each counted once over the ranks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sharding.errors import DataError
from training.config import BatchLayout, TrainJob
from training.errors import TrainingError
from training.loop.comm import Collectives
from training.loop.engine import Engine
from training.models.loss import target_count
from training.parallel.dist import DistEnv
from training.parallel.sequence import ParallelDims

if TYPE_CHECKING:
    from sharding.loader import TokenLoader


class Evaluator:
    """Evaluates when due; the val loader is built (shards mapped and verified) once."""

    def __init__(
        self, job: TrainJob, env: DistEnv, layout: BatchLayout, comm: Collectives, has_val: bool
    ) -> None:
        self.job, self.env, self.layout, self.comm = job, env, layout, comm
        self.dims = ParallelDims(env.world_size, job.deepspeed.sequence_parallel_size)
        self.has_val = has_val  # the data has a val split with tokens
        self._loader: TokenLoader | None = None

    def due(self, step: int, total: int) -> bool:
        every = self.job.train.eval_every
        return self.has_val and (step % every == 0 or step == total)

    def evaluate(self, engine: Engine) -> float:
        """Mean token loss over the val samples (all ranks' tokens)."""
        import torch

        loader = self._val_loader()
        loader.load_state_dict({"consumed": 0})  # every eval sees the same val samples
        dims = self.dims
        per_step = dims.dp_size * self.layout.micro_batch_size
        steps = max(1, min(self.job.train.eval_steps, loader.samples_per_epoch // per_step))
        loss_sum, tokens = torch.zeros((), dtype=torch.float64), 0.0
        with engine.evaluating():
            for _, batch in zip(range(steps), loader, strict=False):
                loss_sum = loss_sum + engine.loss_parts(batch)["ce_sum"].double().cpu()
                tokens += float(target_count(batch["labels"]))
        loss_sum, tokens = self.comm.all_reduce_sum([float(loss_sum), tokens])
        tokens /= dims.sp_size  # an SP group's ranks hold the same batch (and sum its shards)
        return loss_sum / max(tokens, 1.0)

    def _val_loader(self) -> TokenLoader:
        from sharding.loader import build_loader

        if self._loader is None:
            try:
                self._loader = build_loader(
                    self.job.data,
                    split="val",
                    rank=self.dims.dp_rank(self.env.rank),
                    world_size=self.dims.dp_size,
                    micro_batch_size=self.layout.micro_batch_size,
                    seed=self.job.run.seed,
                )
            except DataError as exc:
                raise TrainingError(f"eval: {exc}") from None
        return self._loader
