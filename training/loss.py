"""The training objective: summed next-token cross-entropy over target labels.

Labels equal to IGNORE_INDEX (prompt tokens of loss-masked data, see
`sharding.loader.targets`) contribute nothing; callers divide by the number of
target tokens of the whole global batch, so the loss does not depend on how
the batch is split over ranks and micro-batches.
"""

from __future__ import annotations

from typing import Any

from sharding.loader import IGNORE_INDEX


def token_loss_sum(logits: Any, labels: Any) -> Any:
    """Sum over target labels of -log p(label); logits [B, L, V], labels [B, L] (torch)."""
    import torch.nn.functional as F

    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def target_count(labels: Any) -> int:
    """How many labels are loss targets."""
    return int((labels != IGNORE_INDEX).sum())
