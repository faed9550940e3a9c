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
the same logits, only added up in chunks; a head that soft-caps or scales its logits
(`training.model_registry.logit_transform`) does so per chunk too.

A mixture-of-experts model adds its router's load-balancing loss, computed by the
model's own `load_balancing_loss_func` from the router logits, times its
`router_aux_loss_coef`, exactly once: per micro-batch `coef · aux · targets`, so the
objective over the global batch is mean cross-entropy + coef · (target-weighted) aux.
The forward also reports the expert load: the share of tokens routed to the busiest
expert, the maximum over layers (top_k / experts when balanced, 1.0 when collapsed).
"""

from __future__ import annotations

import types
from typing import Any

from training import model_registry as registry

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


def chunked_head_loss_sum(hidden: Any, labels: Any, head: Any, transform: Any = None) -> Any:
    """`token_loss_sum(transform(head(hidden)), labels)` without keeping the logits: hidden
    [B, L, H], labels [B, L], head the output-embedding module (called per chunk, so ZeRO-3
    gathers its weight through the module's own hooks), `transform` the model's post-head
    logit transform (None: none)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = labels.reshape(-1)
    rows = chunk_rows(head.weight.shape[0] if hasattr(head, "weight") else 1)
    total = torch.zeros((), dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], rows):
        h, y = flat[start : start + rows], targets[start : start + rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_loss_sum, h, y, head, transform, use_reentrant=False)
        else:
            total = total + _head_loss_sum(h, y, head, transform)
    return total


def chunk_rows(vocab_size: int) -> int:
    """Rows of logits per chunk: `LOSS_CHUNK_BYTES` of fp32 logits (at least one row)."""
    return max(1, LOSS_CHUNK_BYTES // (4 * max(1, vocab_size)))


def _head_loss_sum(hidden: Any, targets: Any, head: Any, transform: Any) -> Any:
    logits = head(hidden)
    return _cross_entropy_sum(logits if transform is None else transform(logits), targets)


def _cross_entropy_sum(logits: Any, targets: Any) -> Any:
    import torch.nn.functional as F

    from sharding.loader import IGNORE_INDEX

    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def attach_token_loss(lm: Any) -> None:
    """Let `lm(input_ids=..., labels=..., token_loss=True)` return the loss parts of a
    micro-batch as a dict of 0-d fp32 tensors: `loss` (what backward differentiates: the
    summed token loss, plus the router's weighted aux loss for an MoE), `ce_sum` (the
    summed token loss, detached) and, for an MoE, `aux_loss` and `expert_load_max`
    (detached). Without `token_loss` the model's own forward runs (generation, logits).
    Set on the instance, so the module tree, its parameter names and the checkpoints stay
    those of the HF model; DeepSpeed's engine and ZeRO-3's hooks see an ordinary forward
    call of the root module (a dict output is what they pass through unchanged)."""
    original = lm.forward
    transform = registry.logit_transform(lm.config)
    transform = None if transform.identity else transform
    sizes = registry.moe(lm.config)
    sizes = sizes if sizes is not None and sizes.router_logits else None
    aux_loss = registry.aux_loss_function(lm) if sizes is not None else None
    plain = registry.plain_head(lm)

    def forward(self: Any, *args: Any, token_loss: bool = False, **kwargs: Any) -> Any:
        if not token_loss:
            return original(*args, **kwargs)
        labels = kwargs.pop("labels")
        inputs = {k: v for k, v in kwargs.items() if k in _MODEL_INPUTS and v is not None}
        if not plain:  # the model's own head: whole logits, upcast a chunk at a time
            logits = original(*args, **inputs, use_cache=False).logits
            ce = token_loss_sum(logits, labels)
            return {"loss": ce, "ce_sum": ce.detach()}
        if sizes is not None:
            inputs["output_router_logits"] = True
        flat = flatten_windows(inputs) if _varlen(self.config) else None
        out = self.base_model(*args, **(flat or inputs), use_cache=False)
        hidden = out[0] if flat is None else out[0].reshape(*labels.shape, -1)
        ce = chunked_head_loss_sum(hidden, labels, self.get_output_embeddings(), transform)
        parts = {"loss": ce, "ce_sum": ce.detach()}
        router = [r for r in getattr(out, "router_logits", None) or () if r is not None]
        if sizes is not None and router:  # a model that records no router logits: neither
            parts["expert_load_max"] = busiest_expert_share(router, sizes.top_k).detach()
            if aux_loss is not None and sizes.aux_loss_coef:
                from sharding.loader import IGNORE_INDEX

                aux = aux_loss(tuple(router), sizes.n_experts, sizes.top_k, None).float()
                targets = (labels != IGNORE_INDEX).sum()
                parts["loss"] = ce + sizes.aux_loss_coef * aux * targets
                parts["aux_loss"] = aux.detach()
        return parts

    lm.forward = types.MethodType(forward, lm)


def _varlen(config: Any) -> bool:
    """flash_attention_2 honours document boundaries only as one flattened sequence."""
    return getattr(config, "_attn_implementation", None) == "flash_attention_2"


def flatten_windows(inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The micro-batch's windows as one row (`[B, L]` → `[1, B·L]`) when it carries
    per-document `position_ids`: flash-attention's variable-length path finds documents
    where the positions restart, and only in a batch of one (transformers' rule). Every
    window starts at position 0, so windows stay apart as documents do. None without
    positions (plain causal attention per window needs the batch as it is)."""
    positions = inputs.get("position_ids")
    if positions is None or positions.shape[0] == 1:
        return None
    flat = {k: v.reshape(1, -1) for k, v in inputs.items() if k in ("input_ids", "position_ids")}
    return {**{k: v for k, v in inputs.items() if k not in flat}, **flat}


def busiest_expert_share(router_logits: list[Any], top_k: int) -> Any:
    """The share of tokens whose top-k experts include the busiest expert, the maximum
    over layers: top_k / experts when the router is balanced, 1.0 when it collapsed."""
    import torch

    shares = []
    for logits in router_logits:
        flat = logits.reshape(-1, logits.shape[-1]).float()
        chosen = flat.topk(top_k, dim=-1).indices
        counts = torch.zeros(flat.shape[-1], device=flat.device).index_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=flat.device)
        )
        shares.append(counts.max() / max(1, flat.shape[0]))
    return torch.stack(shares).max() if shares else torch.zeros(())


def target_count(labels: Any) -> int:
    """How many labels are loss targets."""
    from sharding.loader import IGNORE_INDEX

    return int((labels != IGNORE_INDEX).sum())
