"""One optimizer step (`Stepper.run` → `StepResult`) and the metrics record of a window of
steps (`window_record`).

Loss is the mean over every real target token of the *global* batch (all micro-batches
of all ranks), not a mean of per-micro-batch means, so it is the same however the batch
is split into ranks × accumulation steps. A step never waits for the device: the loss
stays a device tensor until a log line is due (`window_record`, the one CPU-GPU sync
point), and the global target count is a host sum of the CPU labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sharding import faults
from training.config import BatchLayout, TrainConfig
from training.loop.comm import Collectives
from training.loop.engine import Engine
from training.loop.feed import DataFeed
from training.loop.guard import RunGuard


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did, on this rank."""

    local_loss_sum: Any  # this rank's summed token loss, a device tensor (read when logged)
    tokens: int  # target tokens of the global batch
    samples: int  # samples of the global batch
    lr: float
    grad_norm: Any  # float or device tensor, read when logged
    data_wait_s: float
    skipped: bool  # dropped by the health guard (non-finite or spiking loss)
    # MoE only (device tensors, read when logged): the router's load-balancing loss summed
    # over this rank's micro-batches, and the busiest expert's share of tokens (max).
    aux_loss_sum: Any = None
    expert_load_max: Any = None
    micro_batches: int = 1


class Stepper:
    """Runs optimizer steps: batches from the feed, forward/backward on the engine, the
    learning rate from the schedule, the verdict from the guard."""

    def __init__(
        self,
        engine: Engine,
        feed: DataFeed,
        comm: Collectives,
        guard: RunGuard,
        layout: BatchLayout,
        train: TrainConfig,
        precision: str,
        lr_at: Callable[[int], float],
        rank: int,
    ) -> None:
        self.engine, self.feed, self.comm, self.guard = engine, feed, comm, guard
        self.rank = rank
        self.layout, self.train, self.precision, self.lr_at = layout, train, precision, lr_at

    def run(self, step: int) -> StepResult:
        """Optimizer step `step` (0-based): `grad_accum_steps` micro-batches on every rank."""
        start = time.perf_counter()
        rank, n = self.rank, step + 1
        self.guard.start_step(n)
        faults.sleep_in_step(rank, n)
        micro = self.feed.next_step()
        data_wait_s = time.perf_counter() - start
        global_tokens = self.feed.global_tokens(step, micro)
        lr = self.lr_at(step)
        self.engine.set_lr(lr)
        # DeepSpeed divides by accum steps and averages over ranks; undo both so the
        # gradient is d(sum of token losses)/d(w) / global_tokens (under sequence
        # parallelism each rank's loss is its shard's; the shards' gradients add up).
        scale = self.layout.grad_accum_steps * self.engine.grad_average / global_tokens
        loss_sum, spike, mean_loss, busy_s = None, False, None, 0.0
        aux_sum = load_max = None
        for i, batch in enumerate(micro):
            parts = self.engine.loss_parts(batch)
            token_loss, loss = parts["loss"], parts["ce_sum"]
            if faults.nan_loss(rank, n):
                token_loss, loss = token_loss * float("nan"), loss * float("nan")
            loss_sum = loss if loss_sum is None else loss_sum + loss
            if "expert_load_max" in parts:
                load = parts["expert_load_max"]
                load_max = load if load_max is None else load_max.maximum(load)
            if "aux_loss" in parts:
                aux_sum = parts["aux_loss"] if aux_sum is None else aux_sum + parts["aux_loss"]
            if i == len(micro) - 1 and self.train.spike_factor is not None:
                (mean_loss,) = self.comm.all_reduce_sum([float(loss_sum) / global_tokens])  # sync
                spike = self.guard.is_spike(mean_loss)
                if spike:  # DeepSpeed has no "skip this step": a NaN gradient makes every
                    token_loss = token_loss * float("nan")  # optimizer path drop it
            if i == 0:  # before this step's first collective: this rank's own pace
                busy_s = time.perf_counter() - start
            self.engine.backward_and_step(token_loss * scale)
        self.guard.record_busy(busy_s)
        self.engine.report_compile_once()
        skipped = self.guard.after_step(
            n,
            applied=self.engine.step_applied(self.precision),
            spike=spike,
            mean_loss=mean_loss,
            restore=self.engine.load,
            position=self.feed.state_dict,
        )
        return StepResult(
            local_loss_sum=loss_sum,
            tokens=int(global_tokens),
            samples=self.layout.global_batch_size,
            lr=lr,
            grad_norm=self.engine.grad_norm(),
            data_wait_s=data_wait_s,
            skipped=skipped,
            aux_loss_sum=aux_sum,
            expert_load_max=load_max,
            micro_batches=len(micro),
        )


def window_stats(
    results: list[StepResult], step_time_s: float, comm: Collectives, memory_gb: float
) -> dict[str, float]:
    """Loss over the window (all ranks' tokens), the slowest rank's step time and the
    largest memory, in one collective: rank 0 logs what every rank saw. The only place
    the steps' device results are read back (a CPU-GPU sync point, once per log line)."""
    loss_sum = float(sum(r.local_loss_sum for r in results))
    rows = comm.all_gather([loss_sum, step_time_s, memory_gb])
    grad_norm = results[-1].grad_norm
    return {
        "loss": sum(row[0] for row in rows) / sum(r.tokens for r in results),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "step_time_max_s": max(row[1] for row in rows),
        "memory_gb": max(row[2] for row in rows),
    }


def window_record(
    results: list[StepResult],
    elapsed_s: float,
    comm: Collectives,
    memory_gb: float,
    mfu: Callable[[float], float | None],
    seq_len: int,
) -> dict[str, Any]:
    """The metrics of a window of steps (`elapsed_s` in all), without step and position."""
    tokens = sum(r.tokens for r in results)
    samples = sum(r.samples for r in results)
    step_time_s = elapsed_s / len(results)
    stats = window_stats(results, step_time_s, comm, memory_gb)
    return {
        "loss": stats["loss"],
        "lr": results[-1].lr,
        "grad_norm": stats["grad_norm"],
        "tokens_per_s": tokens / elapsed_s,
        "tokens_per_s_per_device": tokens / elapsed_s / comm.world_size,
        "samples_per_s": samples / elapsed_s,
        "step_time_s": step_time_s,
        "data_wait_s": sum(r.data_wait_s for r in results) / len(results),
        "step_time_max_s": stats["step_time_max_s"],
        "memory_gb": stats["memory_gb"],
        # FLOPs are spent on every position, targets or not (masked prompts too).
        "mfu": mfu(samples * seq_len / elapsed_s),
        **moe_stats(results, comm),
    }


def moe_stats(results: list[StepResult], comm: Collectives) -> dict[str, float]:
    """An MoE's window figures over all ranks: `aux_loss` (the router's load-balancing
    loss, mean over micro-batches) and `expert_load_max` (the busiest expert's share of
    tokens, max over layers, micro-batches and ranks); empty for a dense model."""
    loads = [r.expert_load_max for r in results if r.expert_load_max is not None]
    if not loads:
        return {}
    auxes = [r.aux_loss_sum for r in results if r.aux_loss_sum is not None]
    aux_sum = float(sum(auxes)) if auxes else 0.0
    micro = sum(r.micro_batches for r in results if r.aux_loss_sum is not None)
    rows = comm.all_gather([aux_sum, float(micro), float(max(float(x) for x in loads))])
    stats = {"expert_load_max": max(row[2] for row in rows)}
    if auxes:
        stats["aux_loss"] = sum(row[0] for row in rows) / max(1.0, sum(row[1] for row in rows))
    return stats
