"""Sequence parallelism (DeepSpeed-Ulysses) that keeps packed documents apart.

Each rank of a sequence-parallel (SP) group holds 1/sp of every window's tokens. Before
attention, DeepSpeed's `UlyssesSPAttentionHF` swaps the sequence split for a head split
(all-to-all), so one core attention sees the whole window for heads/sp of the heads,
then swaps back. Its stock wrapper drops the attention mask (sdpa: plain causal), so
packed documents would attend across their boundaries. Here the core attention rebuilds
the document mask from the all-gathered `position_ids` instead (a document starts where
the position does not step by one: transformers' own packed-sequence rule).

    dims = ParallelDims(world_size=4, sp_size=2)         # dp_size 2
    mpu = sequence_parallel_mpu(dims)                    # deepspeed.initialize(mpu=mpu)
    check_heads(hf_config, dims.sp_size)
    register_ulysses_attention(mpu.get_sequence_parallel_group())
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=SP_ATTENTION)
    shard = shard_batch(batch, dims, rank)               # input_ids, position_ids, shift_labels
    logits = engine(input_ids=shard["input_ids"], position_ids=shard["position_ids"]).logits
    loss_sum = shard_loss_sum(logits, shard["shift_labels"])
    engine.backward(loss_sum * dims.backward_scale(accum, global_targets, ds_config))

Rank layout is DeepSpeed's (`parallel_state_sp`): SP groups are runs of `sp_size`
consecutive ranks; the data-parallel index of a rank is `rank // sp_size`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DOC_ATTENTION = "gptrain_doc_sdpa"  # document-aware sdpa core (also usable without SP)
SP_ATTENTION = "gptrain_ulysses"  # Ulysses all-to-all around a core: build the model with it
IGNORE_INDEX = -100  # sharding.loader.IGNORE_INDEX, torch's cross_entropy default


@dataclass(frozen=True)
class ParallelDims:
    """How the world splits into sequence-parallel groups and data-parallel replicas.

    The only place that answers "how many data-parallel ranks / which group am I in"."""

    world_size: int
    sp_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")
        if self.sp_size < 1 or self.world_size % self.sp_size:
            raise ValueError(
                f"deepspeed.sequence_parallel_size: {self.sp_size} does not divide the world "
                f"size {self.world_size}; use a divisor of it (1 turns SP off)"
            )

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: each SP group consumes one batch stream."""
        return self.world_size // self.sp_size

    def sp_rank(self, rank: int) -> int:
        """`rank`'s index inside its SP group (which slice of the sequence it holds)."""
        return self._check(rank) % self.sp_size

    def dp_rank(self, rank: int) -> int:
        """`rank`'s data-parallel index: the batch stream its SP group reads."""
        return self._check(rank) // self.sp_size

    def sp_group_ranks(self, rank: int) -> list[int]:
        """The global ranks of `rank`'s SP group (its members read the same batches)."""
        start = self.dp_rank(rank) * self.sp_size
        return list(range(start, start + self.sp_size))

    def grad_average_size(self, ds_config: dict[str, Any]) -> int:
        """How many ranks DeepSpeed averages gradients over under an SP mpu (measured,
        DeepSpeed 0.19.8): world/sp for ZeRO 0-2 (they divide by `dp_world_size /
        sequence_parallel_size`), the whole world for ZeRO-3, whose default coalesced
        reduce-scatter pre-divides by the group size and ignores SP."""
        zero = ds_config.get("zero_optimization") or {}
        if zero.get("stage", 0) != 3:
            return self.dp_size
        if self.sp_size > 1 and not zero.get("reduce_scatter", True):
            # then small buckets divide by world/sp and oversized ones by world
            raise ValueError(
                "deepspeed.extra.zero_optimization.reduce_scatter: must stay true with ZeRO-3 "
                "and sequence parallelism (DeepSpeed averages inconsistently without it)"
            )
        return self.world_size

    def backward_scale(
        self, grad_accum_steps: int, global_target_tokens: float, ds_config: dict[str, Any]
    ) -> float:
        """What to multiply a shard's summed token loss by before `engine.backward` so the
        gradient is d(sum of the global batch's token losses)/dw / global_target_tokens:
        DeepSpeed divides by the accumulation steps and averages over
        `grad_average_size` ranks; the SP ranks' partial gradients add up to their
        group's gradient."""
        average = self.grad_average_size(ds_config)
        return grad_accum_steps * average / global_target_tokens

    def _check(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {self.world_size}")
        return rank


# --- attention ------------------------------------------------------------------------


def document_ids(position_ids: Any) -> Any:
    """[B, L] index of each token's document in its row: a new document starts wherever
    the position does not grow by exactly one (the first token always starts one)."""
    import torch

    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def document_mask(position_ids: Any, sliding_window: int | None = None) -> Any:
    """[B, 1, L, L] bool: query i may attend key j (same document, j <= i, and within
    `sliding_window` tokens when set: i - j < window, transformers' convention)."""
    import torch

    docs = document_ids(position_ids)
    length = position_ids.shape[-1]
    ones = torch.ones(length, length, dtype=torch.bool, device=position_ids.device)
    causal = ones.tril()  # bool throughout: no L × L integer temporary
    if sliding_window:
        causal &= ones.triu(-(sliding_window - 1))
    return ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None]


def document_spans(position_ids: Any) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) token spans of its documents (one host sync)."""
    import torch

    rows = []
    length = position_ids.shape[-1]
    for row in position_ids:
        starts = [0, *((torch.diff(row) != 1).nonzero().flatten() + 1).tolist()]
        rows.append(list(zip(starts, [*starts[1:], length], strict=True)))
    return rows


def document_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention-interface function: causal attention inside each document
    of `position_ids` (kwargs; all-gathered by Ulysses), keeping the module's sliding
    window. query [B, H, L, D], key/value [B, Hkv, L, D]; returns ([B, L, H, D], None).

    The kernel, by where it runs: on a GPU flex_attention with a block mask of
    (L/128)^2 blocks (`flex_document_attention`: compiled, no L × L tensor; with
    attention dropout, which flex lacks, sdpa with an L × L bool mask); on the CPU sdpa
    per document without a mask (O(L) memory), or with a sliding window one L × L bool
    mask shared by the layers."""
    import torch
    import torch.nn.functional as F

    if attention_mask is not None:
        raise ValueError(
            f"{DOC_ATTENTION}: takes no attention_mask (documents come from position_ids); "
            "packed windows have no padding"
        )
    positions = kwargs.get("position_ids")
    if positions is None or positions.shape[-1] != query.shape[2]:
        raise ValueError(
            f"{DOC_ATTENTION}: needs position_ids of the query's length {query.shape[2]} "
            "(pass position_ids to the model's forward)"
        )
    if kwargs.get("softcap"):
        raise ValueError(f"{DOC_ATTENTION}: no attention soft-capping; use eager attention")
    # the model's own argument wins (a full-attention layer of a hybrid model passes None)
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    positions = positions.expand(query.shape[0], -1)
    if query.is_cuda and not dropout:
        out = flex_document_attention(query, key, value, positions, window, scaling)
        return out.transpose(1, 2).contiguous(), None
    groups = query.shape[1] // key.shape[1]  # grouped-query heads: query head h uses h // groups
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if window or query.is_cuda:
        # an L × L mask: the sliding window needs it, and a GPU run with dropout
        mask = _cached(positions, ("mask", window), lambda: document_mask(positions, window))
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
        )
        return out.transpose(1, 2).contiguous(), None
    # CPU: plain causal attention per document, no mask: memory O(L), not O(L^2) (a mask
    # becomes an L × L float kept for backward in every layer, whatever the head count)
    rows = []
    for b, spans in enumerate(_cached(positions, "spans", lambda: document_spans(positions))):
        parts = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                dropout_p=dropout,
                scale=scaling,
                is_causal=True,
            )
            for s, e in spans
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def flex_document_attention(
    query: Any,
    key: Any,
    value: Any,
    positions: Any,
    window: int | None,
    scaling: float | None,
    *,
    compiled: bool = True,
) -> Any:
    """[B, H, L, D]: causal flex_attention inside each document of `positions` [B, L]
    (and within `window` tokens when set), grouped-query heads as they are. Its block
    mask, built once per forward, holds (L/128)^2 block flags, not L × L: memory stays
    O(L) at 128K tokens. `compiled` false runs torch's eager reference (forward only on
    a CPU; for tests)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    docs = document_ids(positions)

    def same_document(b: Any, h: Any, q: Any, kv: Any) -> Any:
        keep = (docs[b, q] == docs[b, kv]) & (q >= kv)
        return keep & (q - kv < window) if window else keep

    batch, length = positions.shape
    block_mask = _cached(
        positions,
        ("flex", window),
        lambda: create_block_mask(
            same_document, batch, None, length, length, device=query.device, _compile=compiled
        ),
    )
    kernel = _compiled_flex() if compiled else flex_attention
    return kernel(
        query,
        key,
        value,
        block_mask=block_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )


_FLEX: list[Any] = []


def _compiled_flex() -> Any:
    """flex_attention compiled once per process (its eager form materialises L × L)."""
    if not _FLEX:
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


_CACHE: dict[Any, tuple[Any, Any]] = {}  # what was built, by kind: (positions, value)


def _cached(positions: Any, kind: Any, build: Any) -> Any:
    """`build()` once per forward, not per layer: every layer gets the same positions
    (Ulysses gathers them anew each time, so they are compared by value: O(L)). `kind`
    keys what is built (mask, spans or flex block mask, and the sliding window), so a
    model alternating windowed and full layers keeps one of each."""
    import torch

    hit = _CACHE.get(kind)
    if hit is not None:
        last, value = hit
        if (
            last.shape == positions.shape
            and last.device == positions.device
            and torch.equal(last, positions)
        ):
            return value
    value = build()
    _CACHE[kind] = (positions.detach().clone(), value)
    return value


def register_document_attention() -> str:
    """Register `document_attention` with transformers as DOC_ATTENTION; returns the name.
    It runs eager inside a compiled block (`model.compile`): its documents are data (host
    syncs, one kernel per document on a CPU), which dynamo would otherwise recompile for
    at every new layout; flex's kernel is compiled on its own (`_compiled_flex`)."""
    import torch
    from transformers import AttentionInterface

    AttentionInterface.register(DOC_ATTENTION, torch.compiler.disable(document_attention))
    return DOC_ATTENTION


def check_heads(hf_config: Any, sp_size: int) -> None:
    """Ulysses splits heads over the SP group: query heads must divide by sp, and kv heads
    divide by sp or sp by kv heads (then each kv head is replicated). One-line ValueError.
    (GPT-2's config has no num_key_value_heads: as many as heads.)"""
    text = hf_config.get_text_config()
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % sp_size or (kv % sp_size and sp_size % kv):
        raise ValueError(
            f"deepspeed.sequence_parallel_size: {sp_size} must divide the model's "
            f"{heads} attention heads and divide or be a multiple of its {kv} kv heads"
        )


def register_ulysses_attention(
    sp_group: Any, core: str = DOC_ATTENTION, name: str = SP_ATTENTION
) -> str:
    """Register `name`: DeepSpeed's Ulysses all-to-all around the attention `core` (an
    AttentionInterface name; default the document-aware one); build the model with
    `attn_implementation=name`. What `register_with_transformers` does, minus its config
    download, its global `core` override and its fixed sizes: head counts, head size and
    batch size are read from each call's tensors, so one registration serves any model
    (GPT-2 included) and any micro-batch size."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if core == DOC_ATTENTION:
        register_document_attention()
    core_fn = ALL_ATTENTION_FUNCTIONS[core]
    by_shape: dict[tuple[int, ...], Any] = {}  # UlyssesSPAttentionHF asserts fixed shapes

    def ulysses_attention(
        module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kw: Any
    ) -> tuple[Any, Any]:
        batch, heads, length, head_dim = query.shape
        shape = (batch, heads, key.shape[1], head_dim)
        if shape not in by_shape:
            by_shape[shape] = UlyssesSPAttentionHF(
                attn=core_fn,
                batch_size=batch,
                attn_head_count=heads,
                attn_head_size=head_dim,
                kv_head_count=key.shape[1],
                num_hidden_layers=1,  # only read by its skip-attention debug mode
                process_group=sp_group,
                seq_length_is_variable=True,
            )
            by_shape[shape].core_attn_implementation = core
        # the mask transformers built (if any) is for the local shard: meaningless after
        # the all-to-all, exactly what DeepSpeed's own wrapper drops
        out, weights = by_shape[shape](module, query, key, value, None, *args, **kw)
        # DeepSpeed returns [B, l, H*D]; the attention interface's contract is [B, l, H, D]
        # (GPT-2 merges the last two dims itself, Llama reshapes whatever comes)
        return out.view(batch, length, heads, head_dim), weights

    AttentionInterface.register(name, ulysses_attention)
    return name


# --- process groups ---------------------------------------------------------------------


def sequence_parallel_mpu(dims: ParallelDims) -> Any:
    """DeepSpeed's SP process groups (`parallel_state_sp`, built once per process) for
    `deepspeed.initialize(mpu=...)`; None when SP is off. Needs torch.distributed up."""
    if dims.sp_size == 1:
        return None
    import deepspeed.comm as dist
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    if dist.get_world_size() != dims.world_size:
        raise ValueError(
            f"ParallelDims says world size {dims.world_size}, the process group has "
            f"{dist.get_world_size()}"
        )
    try:
        built = mpu.get_sequence_parallel_world_size()
    except AssertionError:  # not built yet in this process
        mpu.initialize_sequence_parallel(sequence_parallel_size=dims.sp_size)
        built = dims.sp_size
    if built != dims.sp_size:
        raise ValueError(
            f"deepspeed.sequence_parallel_size: {dims.sp_size}, but this process already "
            f"built SP groups of {built} (DeepSpeed keeps one layout per process)"
        )
    if mpu.get_sequence_parallel_rank() != dims.sp_rank(dist.get_rank()):
        raise RuntimeError("DeepSpeed's SP group layout differs from ParallelDims'")
    return mpu


# --- data and loss ----------------------------------------------------------------------


def shift_labels(labels: Any) -> Any:
    """HF-style labels (label k is token k) → next-token targets aligned with the inputs
    (target k is label k+1; the last is IGNORE_INDEX): what each shard needs, since the
    shift crosses shard borders. UlyssesSPDataLoaderAdapter's rule."""
    import torch.nn.functional as F

    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous()


def shard_batch(
    batch: dict[str, Any], dims: ParallelDims, rank: int, *, labels_shifted: bool = False
) -> dict[str, Any]:
    """`rank`'s slice of a full-window batch that every rank of its SP group holds:
    `input_ids`, `position_ids` and `shift_labels` ([B, L/sp] each). `labels` are HF-style
    unless `labels_shifted` (gptrain's loader: label k is already token k+1)."""
    input_ids = batch["input_ids"]
    length = input_ids.shape[-1]
    if length % dims.sp_size:
        raise ValueError(
            f"data.seq_len: {length} is not divisible by deepspeed.sequence_parallel_size="
            f"{dims.sp_size}"
        )
    if batch.get("position_ids") is None:
        raise ValueError(
            "sequence parallelism needs position_ids in the batch (data.document_mask, or "
            "arange(seq_len)): each shard must know its tokens' positions"
        )
    labels = batch["labels"] if labels_shifted else shift_labels(batch["labels"])
    positions = batch["position_ids"].expand_as(input_ids)
    chunk = length // dims.sp_size
    start = dims.sp_rank(rank) * chunk
    pieces = {"input_ids": input_ids, "position_ids": positions, "shift_labels": labels}
    # contiguous: collectives (Ulysses all-gathers position_ids) want dense tensors
    return {k: v[:, start : start + chunk].contiguous() for k, v in pieces.items()}


def shard_loss_sum(logits: Any, shift_labels: Any) -> Any:
    """Summed next-token cross-entropy of a shard (fp32, targets only): [B, l, V], [B, l]."""
    import torch.nn.functional as F

    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(
        flat, shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def sequence_mean_loss(loss_sum: Any, shift_labels: Any, sp_group: Any) -> Any:
    """The SP group's mean token loss (detached): its shards' loss sums over their target
    counts, all-reduced over `sp_group`: the loss the unsharded window would give."""
    import torch
    import torch.distributed as dist

    parts = torch.stack([loss_sum.detach().float(), (shift_labels != IGNORE_INDEX).sum().float()])
    dist.all_reduce(parts, group=sp_group)
    return parts[0] / parts[1].clamp(min=1)
