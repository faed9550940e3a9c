"""The DeepSpeed JSON, generated from our config by one pure function.

Batch sizes come only from `train.*` (resolved into a `BatchLayout`); the
DeepSpeed config never holds a second, possibly different, batch size.
"""

from __future__ import annotations

import copy
from typing import Any

from training.config import BatchLayout, DeepSpeedConfig, TrainConfig

# Keys that would let `deepspeed.extra` contradict the batch layout or our optimizer.
_OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
)
# Keys that rescale gradients behind our back: the loss is normalised by the global
# batch's target tokens (training/loop/step.py), which these would change.
_SCALING_KEYS = ("gradient_predivide_factor", "prescale_gradients")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values in `extra` win."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def cuda_available() -> bool:
    """Whether ranks here train on CUDA (DS_ACCELERATOR=cpu forces the CPU path)."""
    import os

    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        return False
    import torch

    return torch.cuda.is_available()


def build_deepspeed_config(
    ds: DeepSpeedConfig, train: TrainConfig, layout: BatchLayout, *, cuda: bool | None = None
) -> dict[str, Any]:
    """DeepSpeed config dict for ZeRO stage, precision, offload, clipping and batch.

    `cuda` (None: detect here) resolves `ds.overlap_comm: null`. `ds.extra` is merged
    last (recursively) for expert keys, except the batch and optimizer keys, which are
    owned by `train.*`.
    Raises ValueError("deepspeed.extra.KEY: ...") for a forbidden override.
    """
    g, m, a, dp = (
        layout.global_batch_size,
        layout.micro_batch_size,
        layout.grad_accum_steps,
        layout.data_parallel_size,
    )
    assert g == m * a * dp, f"batch layout inconsistent: {g} != {m} × {a} × {dp}"
    for key in _OWNED_KEYS:
        if key in ds.extra:
            raise ValueError(
                f"deepspeed.extra.{key}: set by gptrain from train.* — change it there instead"
            )
    for key in _SCALING_KEYS:
        if key in ds.extra:
            raise ValueError(
                f"deepspeed.extra.{key}: not supported; gptrain normalises the loss by the "
                "global batch's target tokens and this would rescale the gradients again"
            )
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        overlap = ds.overlap_comm
        if overlap is None:
            overlap = cuda_available() if cuda is None else cuda
        zero.update(
            overlap_comm=overlap,
            contiguous_gradients=ds.contiguous_gradients,
            reduce_bucket_size=ds.reduce_bucket_size,
        )
        if ds.zero_stage < 3:
            zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.zero_stage == 3:
        # export and save_16bit_model need the full weights gathered on save
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_batch_size": g,
        "train_micro_batch_size_per_gpu": m,
        "gradient_accumulation_steps": a,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if ds.sequence_parallel_size > 1:  # DeepSpeed's batch check counts world / this replicas
        config["sequence_parallel_size"] = ds.sequence_parallel_size
    return _merge(config, ds.extra)
