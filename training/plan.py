"""Memory, communication and time of a training run, computed before it runs (`gptrain plan`).

Pure arithmetic on the config sections and the model's shape; no torch. Every figure
is per rank unless its name says otherwise. Ψ = parameters, Ψt = trainable parameters,
N = data-parallel ranks, d = bytes of the model dtype (2 for bf16/fp16, 4 for fp32).

Model states, as DeepSpeed 0.19 allocates them (checked tensor by tensor on CPU,
`bench/plan_accuracy.py`; the ZeRO paper's 2Ψ + 2Ψ + 12Ψ = 16Ψ for mixed precision):

    stage  parameters       gradients   optimizer (fp32 master + Adam m, v)
    0      dΨ               dΨt         12Ψt (bf16/fp16) | 8Ψt (fp32: no master copy)
    1      dΨ               dΨt         12Ψt/N  (also fp32: DeepSpeed clones a master)
    2      dΨ               dΨt/N       12Ψt/N
    3      dΨ/N + dΨpers    dΨt/N       12Ψt/N

Ψpers: ZeRO-3 keeps tensors smaller than `stage3_param_persistence_threshold` whole on
every rank. `offload_optimizer` moves the optimizer column plus an fp32 gradient
partition (4Ψt/N) to CPU RAM (stage 2/3 then keep no gradient partition on the device);
`offload_params` moves the stage-3 parameter partition there too.

Activations per micro-batch follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models": sbh(34 + 5as/h) bytes per layer in 16-bit,
~2sbh with full recomputation), recounted for the HF models this trainer runs, with
s = seq_len, b = micro-batch, h = hidden, a = heads, f = MLP width, V = vocab:

- per layer kept for backward, in units of s·b·h bytes, dropout 0 (no masks), HF `sdpa`
  attention (flash / memory-efficient / CPU-flash kernels: no a·s² score matrix), by
  what the shape derives from the built model (`training.models.shape`): each of the
  block's n norms keeps its input, d, or 4 + d for RMSNorm, which upcasts to fp32;
  attention d·(1 + 2q/h + 2kv/h) (input, queries, keys and values, output; q = heads ×
  head dim, kv = kv heads × head dim: 5d for GPT-2, d·(3 + 2·kv_heads/heads) for
  Llama); a gated MLP d·(1 + 4f/h) (gate, up, activation, product), a plain one
  d·(1 + 5f/h) (HF's unfused `gelu_new` keeps four f-wide intermediates where the
  paper's fused GeLU keeps one). GPT-2: 2d + 5d + d + 5f/h·d = 28d for f = 4h. For a
  mixture of experts f is the width a token passes through (its top_k experts' plus a
  shared expert's); routing buffers are not counted. Eager attention adds d·a·s/h (the
  softmax output), dropout > 0 adds 2 (two 1-byte residual masks).
- outside the layers: the final norm and LM-head inputs (2d; 2d + 4 with RMSNorm). The loss
  head (`training.models.loss`) keeps no logits: it computes them a chunk of r = min(s·b,
  LOSS_CHUNK_BYTES / 4V) rows at a time and recomputes each chunk in backward, so the
  loss holds only one chunk's transient, r·V·(d + 12): the head's output, its fp32 upcast,
  the log-probabilities and, in backward, the logits' fp32 gradient.
- peak without checkpointing: L·layer + outside + max(loss transient, layer transient);
  with checkpointing of k = ⌊L·fraction⌋ blocks (`model.activation_checkpointing_fraction`):
  (L−k)·layer + k·d·sbh + outside + max(loss transient, one recomputed layer + transient),
  where the transient of a layer's backward is ~2f/h·d·sbh (gradients of MLP tensors).
  With `model.activation_checkpointing_offload` the k kept block inputs live in host
  memory: one, d·sbh, is back on the device while its block recomputes. With
  `model.tiled_mlp` an MLP keeps only its input (d; TiledMLP recomputes it slice by
  slice in backward), and the backward transient is one slice's: 2f/h·d·sbh / slices
  (`training.models.tiling.tile_count`).
  Against RSS high-water marks of real 2-rank runs on CPU (`bench/plan_accuracy.py`):
  within 13% for GPT-2 and Llama shapes, with and without checkpointing (measured with
  the earlier whole-batch loss head; the chunked head's transient is what the code does).
  torch.compile (`model.compile`) fuses elementwise ops and keeps fewer intermediates;
  that saving is not counted (the plan stays conservative).

Temporary buffers: the gradient reduce bucket (`reduce_bucket_size` elements, stages
1–3, doubled with `overlap_comm`). ZeRO-2 and 3 hold full-size gradients in backward
until they are reduced into the partition: the largest tensor (the embedding / LM head)
and one block's. ZeRO-3 also gathers whole parameters: the prefetch bucket
(`stage3_prefetch_bucket_size`) plus the same largest tensor and block.

The total adds states, buffers and activations, which need not peak at the same
moment (conservative). Not counted: the optimizer step's own transients (e.g. fp32
copies of a gradient partition), which come after the activations are freed.

Communication per optimizer step, bytes each rank sends over ring collectives
(all-reduce 2(N−1)/N·size, reduce-scatter and all-gather (N−1)/N·size), as in the ZeRO
paper: stage 0 all-reduces gradients once per step (2Ψt); stage 1 reduce-scatters
gradients and all-gathers updated parameters once per step (2Ψt); stage 2 reduce-scatters
on every micro-batch (accum·Ψt + Ψt); stage 3 gathers parameters for forward and
backward and reduce-scatters gradients on every micro-batch (accum·(2Ψ + Ψt)).

Step time: the model FLOPs of a step (`training.models.flops`: 6·Ψa + 12·L·q·s per token,
Ψa the active parameters without lookup-only embeddings: an MoE token multiplies by its
top_k of the routed experts only; q the query width) divided by ranks × peak FLOP/s × an
assumed MFU. Recomputation is not in the model FLOPs, so a checkpointed run should assume
a lower MFU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from training.models.flops import flops_per_token
from training.models.shape import ModelShape

GIB = 2**30
ADAM_BYTES_PER_PARAM = 8  # fp32 exp_avg + exp_avg_sq
MASTER_BYTES_PER_PARAM = 4  # fp32 master weights
# A loss chunk's fp32 upcast, log-probabilities and (backward) logits gradient, per logit,
# on top of the head's output in the model dtype.
LOSS_FP32_BYTES_PER_LOGIT = 12
# DeepSpeed's zero_optimization defaults (0.19) for keys our generated config leaves out.
DS_ZERO_DEFAULTS = {
    "reduce_bucket_size": 5e8,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_param_persistence_threshold": 1e5,
    "overlap_comm": False,
}


@dataclass(frozen=True)
class Setup:
    """How the trainer runs the model: what `training/config.py` and the generated
    DeepSpeed config decide, for one world size."""

    zero_stage: int
    precision: str
    world_size: int  # every rank: ZeRO partitions over all of them, SP ranks included
    ranks_per_node: int
    micro_batch_size: int
    grad_accum_steps: int
    seq_len: int
    activation_checkpointing: bool
    activation_checkpointing_fraction: float = 1.0
    offload_optimizer: bool = False
    offload_params: bool = False
    dropout: float = 0.0
    trainable_params: int | None = None  # None: all
    ds_zero: dict[str, Any] = field(default_factory=dict)  # the zero_optimization section
    sp_size: int = 1  # sequence parallel: each rank holds seq_len / sp_size of a window
    activation_checkpointing_offload: bool = False
    tiled_mlp: bool = False
    tiled_mlp_shards: int = 0  # 0: auto (training.models.tiling.tile_count)

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas (each SP group reads one batch stream)."""
        return self.world_size // self.sp_size

    @property
    def local_seq_len(self) -> int:
        """Tokens of a window on one rank."""
        return self.seq_len // self.sp_size

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    def zero(self, key: str) -> float:
        return float(self.ds_zero.get(key, DS_ZERO_DEFAULTS[key]))


def setup_from_sections(
    model: Any,
    data: Any,
    deepspeed: Any,
    layout: Any,
    ds_config: dict[str, Any],
    ranks_per_node: int,
    trainable_params: int | None = None,
) -> Setup:
    """`Setup` from the config sections (`ModelConfig`, `DataConfig`, `DeepSpeedConfig`),
    the resolved `BatchLayout` and the DeepSpeed config `build_deepspeed_config` made."""
    return Setup(
        zero_stage=deepspeed.zero_stage,
        precision=deepspeed.precision,
        world_size=layout.data_parallel_size * deepspeed.sequence_parallel_size,
        ranks_per_node=ranks_per_node,
        micro_batch_size=layout.micro_batch_size,
        grad_accum_steps=layout.grad_accum_steps,
        seq_len=data.seq_len,
        activation_checkpointing=model.activation_checkpointing,
        activation_checkpointing_fraction=model.activation_checkpointing_fraction,
        offload_optimizer=deepspeed.offload_optimizer,
        offload_params=deepspeed.offload_params,
        dropout=model.dropout,
        trainable_params=trainable_params,
        ds_zero=dict(ds_config.get("zero_optimization", {})),
        sp_size=deepspeed.sequence_parallel_size,
        activation_checkpointing_offload=model.activation_checkpointing_offload,
        tiled_mlp=model.tiled_mlp,
        tiled_mlp_shards=model.tiled_mlp_shards,
    )


# --- model states --------------------------------------------------------------------------


def persistent_params(shape: ModelShape, setup: Setup) -> int:
    """Parameters ZeRO-3 keeps whole on every rank (tensors under the threshold)."""
    threshold = setup.zero("stage3_param_persistence_threshold")
    return sum(n for n in shape.param_numels() if n < threshold)


def model_state_bytes(shape: ModelShape, setup: Setup) -> dict[str, int]:
    """Per-rank bytes of parameters, gradients and optimizer state on the device, and
    what offload puts in CPU RAM instead (`offload_cpu`)."""
    n, d, stage = setup.world_size, setup.dtype_bytes, setup.zero_stage
    total = shape.n_params
    trainable = total if setup.trainable_params is None else setup.trainable_params
    params = d * total if stage < 3 else d * total / n + d * persistent_params(shape, setup)
    grads = d * trainable if stage < 2 else d * trainable / n
    per_param = ADAM_BYTES_PER_PARAM + (
        0 if stage == 0 and setup.precision == "fp32" else MASTER_BYTES_PER_PARAM
    )
    optimizer = per_param * trainable / (n if stage >= 1 else 1)
    offload = 0.0
    if setup.offload_optimizer:
        offload += optimizer + 4 * trainable / n  # fp32 gradient partition for the CPU Adam
        optimizer = 0.0
        if stage >= 2:
            grads = 0.0
    if setup.offload_params and stage == 3:
        offload += d * total / n
        params -= d * total / n
    return {
        "params": round(params),
        "grads": round(grads),
        "optimizer": round(optimizer),
        "offload_cpu": round(offload),
    }


# --- activations ---------------------------------------------------------------------------


def _layer_bytes_per_sbh(shape: ModelShape, setup: Setup, mlp_slices: int = 1) -> float:
    """Bytes one layer keeps for backward, per s·b·h (no recomputation); a tiled MLP
    (`mlp_slices` > 1) keeps only its input."""
    d, h, f = setup.dtype_bytes, shape.hidden, shape.ffn_hidden
    norms = shape.block_norms * (4 + d if shape.rms_norm else d)
    kv = shape.n_kv_head * shape.head_dim
    attention = d * (1 + 2 * shape.query_width / h + 2 * kv / h)
    mlp = d * (1 + (4 if shape.gated_mlp else 5) * f / h) if mlp_slices == 1 else d
    per = norms + attention + mlp
    if shape.attention == "eager":
        per += d * shape.n_head * setup.seq_len / h
    if setup.dropout > 0:
        per += 2
    return per


def _mlp_slices(shape: ModelShape, setup: Setup, micro_batch_size: int) -> int:
    """How many slices a tiled MLP runs in (1: not tiled, or too few tokens to slice,
    and then it keeps everything, as the code does)."""
    from training.models.tiling import tile_count

    if not setup.tiled_mlp:
        return 1
    rows = setup.local_seq_len * micro_batch_size
    return tile_count(rows, shape.hidden, setup.tiled_mlp_shards)


def activation_bytes(
    shape: ModelShape,
    setup: Setup,
    micro_batch_size: int | None = None,
    checkpointing: bool | None = None,
) -> int:
    """Peak activation bytes of one micro-batch's forward + backward (see module doc).
    `checkpointing` True/False overrides the setup's choice (True: every block)."""
    from training.models.build import checkpointed_blocks
    from training.models.loss import chunk_rows

    b = setup.micro_batch_size if micro_batch_size is None else micro_batch_size
    ckpt = setup.activation_checkpointing if checkpointing is None else checkpointing
    fraction = setup.activation_checkpointing_fraction if checkpointing is None else 1.0
    d, h = setup.dtype_bytes, shape.hidden
    # Sequence parallel: a rank holds 1/sp of the tokens (an eager core's scores, full
    # length for 1/sp of the heads, scale the same way: see `_layer_bytes_per_sbh`).
    sbh = setup.local_seq_len * b * h
    slices = _mlp_slices(shape, setup, b)
    layer = _layer_bytes_per_sbh(shape, setup, slices) * sbh
    transient = 2 * shape.ffn_hidden / h * d * sbh / slices
    outside = (2 * d + (4 if shape.rms_norm else 0)) * sbh
    rows = min(setup.local_seq_len * b, chunk_rows(shape.vocab_size))
    loss = (d + LOSS_FP32_BYTES_PER_LOGIT) * rows * shape.vocab_size
    k = sum(checkpointed_blocks(shape.n_layer, fraction)) if ckpt else 0
    recomputed = layer if k else 0
    kept = min(k, 1) if setup.activation_checkpointing_offload else k  # block inputs on device
    peak = (shape.n_layer - k) * layer + kept * d * sbh + outside
    return round(peak + max(loss, recomputed + transient))


def offloaded_activation_bytes(shape: ModelShape, setup: Setup) -> int:
    """Host memory per rank of the block inputs `model.activation_checkpointing_offload`
    keeps there (pinned on a GPU), one micro-batch's."""
    from training.models.build import checkpointed_blocks

    if not (setup.activation_checkpointing and setup.activation_checkpointing_offload):
        return 0
    k = sum(checkpointed_blocks(shape.n_layer, setup.activation_checkpointing_fraction))
    sbh = setup.local_seq_len * setup.micro_batch_size * shape.hidden
    return k * setup.dtype_bytes * sbh


# --- buffers, communication, time ----------------------------------------------------------


def buffer_bytes(shape: ModelShape, setup: Setup) -> int:
    """Temporary buffers: reduce bucket(s); under ZeRO-2/3 full-size gradients in flight
    before they are reduced into the partition; under ZeRO-3 gathered parameters."""
    if setup.zero_stage == 0:
        return 0
    d = setup.dtype_bytes
    buckets = 2 if setup.ds_zero.get("overlap_comm", False) else 1
    total = buckets * setup.zero("reduce_bucket_size") * d
    in_flight = max(shape.param_numels()) + sum(shape.layer_numels())
    if setup.zero_stage == 2:
        total += in_flight * d
    if setup.zero_stage == 3:  # gathered parameters and their gradients
        total += setup.zero("stage3_prefetch_bucket_size") * d + 2 * in_flight * d
    return round(total)


def comm_bytes_per_step(shape: ModelShape, setup: Setup, zero_stage: int | None = None) -> int:
    """Bytes each rank sends per optimizer step under `zero_stage` (default: the setup's)."""
    stage = setup.zero_stage if zero_stage is None else zero_stage
    n, d, accum = setup.world_size, setup.dtype_bytes, setup.grad_accum_steps
    if n == 1:
        return 0
    psi = shape.n_params
    psi_t = psi if setup.trainable_params is None else setup.trainable_params
    ring = (n - 1) / n
    volume = {
        0: 2 * psi_t,
        1: 2 * psi_t,
        2: accum * psi_t + psi_t,
        3: accum * (2 * psi + psi_t),
    }[stage]
    return round(ring * volume * d)


def sequence_comm_bytes_per_step(shape: ModelShape, setup: Setup) -> int:
    """Bytes each rank sends per optimizer step in Ulysses' all-to-alls: per layer and
    micro-batch, q, k, v in and the attention output back (forward), the same again in
    backward; each sends (sp-1)/sp of its local tokens' activations. 0 without SP."""
    sp = setup.sp_size
    if sp == 1:
        return 0
    kv = shape.n_kv_head * shape.head_dim
    width = 2 * shape.query_width + 2 * kv  # q and output, k and v
    per_layer = setup.local_seq_len * setup.micro_batch_size * width * (sp - 1) / sp
    return round(2 * per_layer * shape.n_layer * setup.grad_accum_steps * setup.dtype_bytes)


def step_flops(shape: ModelShape, setup: Setup) -> float:
    """Model FLOPs of one optimizer step over all ranks (no recomputation): the active
    parameters that multiply (lookup-only embeddings aside; an MoE token uses its top_k
    experts only)."""
    tokens = setup.micro_batch_size * setup.grad_accum_steps * setup.dp_size * setup.seq_len
    per_token = flops_per_token(
        shape.active_params - shape.lookup_params, shape.n_layer, shape.query_width, setup.seq_len
    )
    return per_token * tokens


def step_time_s(shape: ModelShape, setup: Setup, peak_tflops: float, mfu: float) -> float:
    """Seconds per optimizer step at `mfu` of `peak_tflops` on every rank."""
    return step_flops(shape, setup) / (setup.world_size * peak_tflops * 1e12 * mfu)


# --- the plan ------------------------------------------------------------------------------


@dataclass
class Plan:
    """Per-rank bytes of a setup against a device, and the verdict."""

    n_params: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    buffers_bytes: int
    activations_bytes: int
    activations_no_ckpt_bytes: int
    activations_ckpt_bytes: int
    total_bytes: int
    offload_cpu_bytes_per_node: int
    comm_bytes_per_step: dict[int, int]
    device_bytes: int | None
    reserve_bytes: int
    fits: bool | None
    max_micro_batch_size: int | None
    step_time_s: float | None
    total_steps: int | None
    time_to_budget_s: float | None
    sequence_comm_bytes_per_step: int = 0  # Ulysses all-to-all (SP only)

    @property
    def model_state_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["comm_bytes_per_step"] = {str(k): v for k, v in self.comm_bytes_per_step.items()}
        return out


def max_micro_batch_size(shape: ModelShape, setup: Setup, budget_bytes: float) -> int:
    """Largest micro-batch whose activations fit in `budget_bytes` (0: not even one);
    activations grow linearly with the micro-batch."""
    per_sample = activation_bytes(shape, setup, micro_batch_size=1)
    return max(0, math.floor(budget_bytes / per_sample)) if budget_bytes > 0 else 0


def make_plan(
    shape: ModelShape,
    setup: Setup,
    *,
    device_bytes: int | None,
    reserve_bytes: int = 0,
    peak_tflops: float | None = None,
    mfu: float = 0.4,
    total_steps: int | None = None,
) -> Plan:
    """Everything `gptrain plan` prints. `device_bytes` None: no verdict; `peak_tflops`
    None: no time estimate."""
    states = model_state_bytes(shape, setup)
    buffers = buffer_bytes(shape, setup)
    activations = activation_bytes(shape, setup)
    fixed = states["params"] + states["grads"] + states["optimizer"] + buffers
    total = fixed + activations
    fits = max_batch = None
    if device_bytes is not None:
        fits = total + reserve_bytes <= device_bytes
        max_batch = max_micro_batch_size(shape, setup, device_bytes - reserve_bytes - fixed)
    step_s = step_time_s(shape, setup, peak_tflops, mfu) if peak_tflops else None
    return Plan(
        n_params=shape.n_params,
        params_bytes=states["params"],
        grads_bytes=states["grads"],
        optimizer_bytes=states["optimizer"],
        buffers_bytes=buffers,
        activations_bytes=activations,
        activations_no_ckpt_bytes=activation_bytes(shape, setup, checkpointing=False),
        activations_ckpt_bytes=activation_bytes(shape, setup, checkpointing=True),
        total_bytes=total,
        offload_cpu_bytes_per_node=(
            states["offload_cpu"] + offloaded_activation_bytes(shape, setup)
        )
        * setup.ranks_per_node,
        comm_bytes_per_step={s: comm_bytes_per_step(shape, setup, s) for s in range(4)},
        device_bytes=device_bytes,
        reserve_bytes=reserve_bytes,
        fits=fits,
        max_micro_batch_size=max_batch,
        step_time_s=step_s,
        total_steps=total_steps,
        time_to_budget_s=step_s * total_steps if step_s and total_steps else None,
        sequence_comm_bytes_per_step=sequence_comm_bytes_per_step(shape, setup),
    )


def alternatives(shape: ModelShape, setup: Setup, budget_bytes: int) -> list[str]:
    """Single changes that make a setup fit in `budget_bytes`, cheapest first, as
    `key=value (total GiB)`; empty when none does."""
    candidates: list[tuple[str, Setup]] = []
    if not setup.activation_checkpointing:
        candidates.append(
            ("model.activation_checkpointing=true", replace(setup, activation_checkpointing=True))
        )
    tiled = replace(setup, tiled_mlp=True)
    if (
        not setup.tiled_mlp
        and not shape.n_experts  # what tiling takes: dense MLPs without dropout
        and not setup.dropout
        and _mlp_slices(shape, tiled, setup.micro_batch_size) > 1  # else it saves nothing
    ):
        candidates.append(("model.tiled_mlp=true", tiled))
    if setup.activation_checkpointing and not setup.activation_checkpointing_offload:
        candidates.append(
            (
                "model.activation_checkpointing_offload=true",
                replace(setup, activation_checkpointing_offload=True),
            )
        )
    for stage in range(setup.zero_stage + 1, 4):
        candidates.append((f"deepspeed.zero_stage={stage}", replace(setup, zero_stage=stage)))
    if setup.zero_stage >= 1 and not setup.offload_optimizer:
        candidates.append(
            ("deepspeed.offload_optimizer=true", replace(setup, offload_optimizer=True))
        )
    if setup.zero_stage == 3 and not setup.offload_params:
        candidates.append(("deepspeed.offload_params=true", replace(setup, offload_params=True)))
    out = []
    for text, alt in candidates:
        plan = make_plan(shape, alt, device_bytes=budget_bytes)
        if plan.fits:
            out.append(f"{text} ({plan.total_bytes / GIB:.1f} GiB)")
    fixed = make_plan(shape, setup, device_bytes=budget_bytes)
    if fixed.max_micro_batch_size and fixed.max_micro_batch_size < setup.micro_batch_size:
        out.append(
            f"train.micro_batch_size<={fixed.max_micro_batch_size} (more grad_accum_steps "
            "keep the global batch)"
        )
    return out
