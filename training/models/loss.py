"""The training objective: summed next-token cross-entropy over target labels.

Labels equal to IGNORE_INDEX (prompt tokens of loss-masked data, see
`sharding.loader.targets`) contribute nothing; callers divide by the number of
target tokens of the whole global batch, so the loss does not depend on how
the batch is split over ranks and micro-batches.

The LM head never materialises the logits of a whole micro-batch: `attach_token_loss`
gives the model a forward that returns the loss sum from the final hidden states,
computing fp32 logits a chunk of rows at a time. Each chunk runs under non-reentrant
activation checkpointing, so backward recomputes that chunk's logits instead of
keeping them: peak memory is one chunk's logits (`LOSS_CHUNK_BYTES`), not
micro-batch × seq_len × vocab × 4 bytes (3.3 GB for 16 × 1024 × 50257), for one extra
head matmul (~3% of a 1B model's FLOPs). The sum is exact: the same cross-entropy of
the same logits, only added up in chunks.
"""

from __future__ import annotations

import types
from typing import Any

LOSS_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk of rows
_MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask")  # what the loss forward passes


def token_loss_sum(logits: Any, labels: Any) -> Any:
    """Sum over target labels of -log p(label); logits [B, L, V], labels [B, L] (torch).

    Upcasts one chunk of rows at a time, so no fp32 copy of all logits exists."""
    import torch

    flat = logits.reshape(-1, logits.shape[-1])
    targets = labels.reshape(-1)
    rows = chunk_rows(flat.shape[-1])
    total = torch.zeros((), dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], rows):
        end = start + rows
        total = total + _cross_entropy_sum(flat[start:end], targets[start:end])
    return total


def chunked_head_loss_sum(hidden: Any, labels: Any, head: Any) -> Any:
    """`token_loss_sum(head(hidden), labels)` without keeping the logits: hidden [B, L, H],
    labels [B, L], head the output-embedding module (called per chunk, so ZeRO-3 gathers
    its weight through the module's own hooks)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = labels.reshape(-1)
    rows = chunk_rows(head.weight.shape[0] if hasattr(head, "weight") else 1)
    total = torch.zeros((), dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], rows):
        h, y = flat[start : start + rows], targets[start : start + rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_loss_sum, h, y, head, use_reentrant=False)
        else:
            total = total + _head_loss_sum(h, y, head)
    return total


def chunk_rows(vocab_size: int) -> int:
    """Rows of logits per chunk: `LOSS_CHUNK_BYTES` of fp32 logits (at least one row)."""
    return max(1, LOSS_CHUNK_BYTES // (4 * max(1, vocab_size)))


def _head_loss_sum(hidden: Any, targets: Any, head: Any) -> Any:
    return _cross_entropy_sum(head(hidden), targets)


def _cross_entropy_sum(logits: Any, targets: Any) -> Any:
    import torch.nn.functional as F

    from sharding.loader import IGNORE_INDEX

    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def attach_token_loss(lm: Any) -> None:
    """Let `lm(input_ids=..., labels=..., token_loss=True)` return the summed token loss
    (a 0-d fp32 tensor) through the chunked head; without `token_loss` the model's own
    forward runs (generation, logits). Set on the instance, so the module tree, its
    parameter names and the checkpoints stay those of the HF model; DeepSpeed's engine
    and ZeRO-3's hooks see an ordinary forward call of the root module. Every family
    `training.models.build` accepts has a plain head: logits are exactly
    `get_output_embeddings()(final hidden states)`, no scaling or soft-capping."""
    original = lm.forward

    def forward(self: Any, *args: Any, token_loss: bool = False, **kwargs: Any) -> Any:
        if not token_loss:
            return original(*args, **kwargs)
        labels = kwargs.pop("labels")
        inputs = {k: v for k, v in kwargs.items() if k in _MODEL_INPUTS and v is not None}
        out = self.base_model(*args, **inputs, use_cache=False)
        return chunked_head_loss_sum(out[0], labels, self.get_output_embeddings())

    lm.forward = types.MethodType(forward, lm)


def target_count(labels: Any) -> int:
    """How many labels are loss targets."""
    from sharding.loader import IGNORE_INDEX

    return int((labels != IGNORE_INDEX).sum())
