"""Learning-rate schedule and training budget: pure functions of the step."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    max_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    decay: str,
) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup from max_lr/warmup_steps up to max_lr (never 0: a first step
    at lr 0 is wasted), then cosine or linear decay to min_lr at total_steps.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if decay == "constant":
        return max_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
    if decay == "linear":
        return max_lr - progress * (max_lr - min_lr)
    raise ValueError(f"lr_decay: unknown schedule {decay!r}")


def total_steps_for(
    *,
    max_steps: int | None,
    max_tokens: int | None,
    epochs: float | None,
    global_batch_size: int,
    seq_len: int,
    samples_per_epoch: int,
) -> int:
    """Optimizer steps for whichever budget is set (exactly one must be)."""
    if max_steps is not None:
        return max_steps
    if max_tokens is not None:
        return math.ceil(max_tokens / (global_batch_size * seq_len))
    if epochs is not None:
        return max(1, math.ceil(epochs * samples_per_epoch / global_batch_size))
    raise ValueError("max_steps: give a training budget: max_steps, max_tokens or epochs")
